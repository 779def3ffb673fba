#!/usr/bin/env python3
"""Fails if the modules of any crate under crates/*/src import each other in a loop.

A module is a file (`lib.rs`/`main.rs` is the crate root, `a/mod.rs` and `a.rs` are `a`);
inline `mod x { .. }` blocks (tests) belong to their file. An edge A -> B is any path in A's
code that names B: `use crate::b::X`, `use super::b`, `crate::b::f()`, `self::b::X`, or a
child module's name (`b::f()` in b's parent). `mod b;` declarations are not edges, nor is
a path from a module to one that contains it (`super::Shared` in a child of the module that
defines `Shared`): that is the module tree; a parent using its children is an edge. A path
is resolved to the longest known module prefix, and through that module's named re-exports
(`pub use x::Y;`), so `crate::Y` re-exported by lib.rs leads to the module that defines Y.
Usage: scripts/check-import-loops.py [ROOT]   (ROOT defaults to the repository)
       scripts/check-import-loops.py --self-test (checks that a known loop is reported)
"""

import os
import re
import sys

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def strip_code(text):
    """Removes comments, strings and char literals, keeping newlines and braces of code."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            out.append(" ")
        elif m := re.match(r'b?r(#*)"', text[i:i + 20]):
            end = '"' + m.group(1)
            j = text.find(end, i + len(m.group(0)))
            i = n if j < 0 else j + len(end)
            out.append('""')
        elif c == '"' or (c == "b" and text.startswith('b"', i)):
            i += 2 if c == "b" else 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
            out.append('""')
        elif c == "'":
            # a char literal ('a', '\n', '\u{..}') or a lifetime ('a)
            m = re.match(r"'(\\u\{[0-9a-fA-F]+\}|\\.|[^\\'])'", text[i:i + 12])
            if m:
                i += len(m.group(0))
                out.append("' '")
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def expand_use(tree):
    """`a::{b, c::{d, e as f}, self}` -> [(['a','b'], 'b'), ...] with the bound name."""
    tree = re.sub(r"\s+as\s+", "@", tree)  # `X as Y` -> `X@Y`
    tree = re.sub(r"\s+", "", tree)
    res = []

    def walk(prefix, s):
        # split top-level commas
        parts, depth, cur = [], 0, ""
        for ch in s:
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += ch
        if cur:
            parts.append(cur)
        for p in parts:
            if "{" in p:
                head, inner = p.split("{", 1)
                inner = inner[: inner.rfind("}")]
                head = [x for x in head.split("::") if x]
                walk(prefix + head, inner)
            else:
                alias = None
                if "@" in p:
                    p, alias = p.split("@", 1)
                segs = [x for x in p.split("::") if x]
                if not segs:
                    continue
                if segs == ["self"]:
                    res.append((prefix, prefix[-1] if prefix else None))
                else:
                    res.append((prefix + segs, alias or segs[-1]))

    walk([], tree)
    return res


def crate_modules(src):
    """{module path tuple: file} for the files of one crate's src directory."""
    mods = {}
    for dirpath, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), src)
            parts = rel[:-3].split(os.sep)
            if parts[0] == "bin":
                continue  # each bin is its own crate root; checked separately below
            if parts[-1] == "mod":
                parts = parts[:-1]
            if parts in (["lib"], ["main"]):
                parts = []
            mods[tuple(parts)] = os.path.join(dirpath, f)
    return mods


def parse(path):
    """(uses, paths): `use` trees with their scope depth, and other `a::b` paths in code."""
    code = strip_code(open(path, encoding="utf-8").read())
    # Inline modules: positions of `mod x {` blocks, to resolve `super` inside them.
    uses, paths = [], []
    inline = []  # stack of brace depths where an inline mod began
    depth = 0
    i = 0
    n = len(code)
    token_re = re.compile(
        r"(?P<use>\b(?:pub(?:\([^)]*\))?\s+)?use\s+(?P<tree>[^;]+);)"
        r"|(?P<mod>\bmod\s+" + IDENT + r"\s*\{)"
        r"|(?P<path>(?<![A-Za-z0-9_:])(?:" + IDENT + r"\s*::\s*)+" + IDENT + r")"
        r"|(?P<open>\{)|(?P<close>\})"
    )
    while i < n:
        m = token_re.search(code, i)
        if not m:
            break
        i = m.end()
        if m.group("use"):
            public = m.group("use").lstrip().startswith("pub")
            for segs, name in expand_use(m.group("tree")):
                uses.append((segs, name, len(inline), public and not inline))
        elif m.group("mod"):
            depth += 1
            inline.append(depth)
        elif m.group("path"):
            segs = re.sub(r"\s+", "", m.group("path")).split("::")
            paths.append((segs, len(inline)))
        elif m.group("open"):
            depth += 1
        elif m.group("close"):
            if inline and inline[-1] == depth:
                inline.pop()
            depth -= 1
    return uses, paths


def check_crate(name, mods):
    parsed = {m: parse(f) for m, f in mods.items()}
    # Named re-exports: module -> {name: absolute path}
    reexports = {m: {} for m in mods}

    def absolute(mod, segs, inline_depth):
        """Absolute module path of `segs` seen from `mod`, or None if outside the crate."""
        if not segs:
            return None
        base = list(mod)
        head = segs[0]
        if head == "crate":
            return segs[1:]
        if head == "self":
            return base + segs[1:]
        if head == "super":
            k = 0
            while k < len(segs) and segs[k] == "super":
                k += 1
            ups = max(k - inline_depth, 0)  # `super` inside an inline mod is the file first
            if ups > len(base):
                return None
            return base[: len(base) - ups] + segs[k:]
        if tuple(base + [head]) in mods:
            return base + segs
        return None

    for m, (uses, _) in parsed.items():
        for segs, bound, idepth, public in uses:
            if public and bound and bound not in ("*", "self"):
                a = absolute(m, segs, idepth)
                if a is not None:
                    reexports[m][bound] = a

    def resolve(a, seen=None):
        """The module a path leads to: longest module prefix, through named re-exports."""
        seen = seen or set()
        for k in range(len(a), -1, -1):
            prefix = tuple(a[:k])
            if prefix in mods:
                if k < len(a):
                    target = reexports[prefix].get(a[k])
                    key = (prefix, a[k])
                    if target is not None and key not in seen:
                        seen.add(key)
                        return resolve(target + a[k + 1:], seen)
                return prefix
        return None

    def is_ancestor(t, m):
        """`t` is `m` or a module containing it: using it is the module tree, not a loop."""
        return m[: len(t)] == t

    edges = {m: set() for m in mods}
    for m, (uses, paths) in parsed.items():
        for segs, _, idepth, _ in uses:
            a = absolute(m, segs, idepth)
            if a is not None:
                t = resolve(a)
                if t is not None and not is_ancestor(t, m):
                    edges[m].add(t)
        for segs, idepth in paths:
            a = absolute(m, segs, idepth)
            if a is not None:
                t = resolve(a)
                if t is not None and not is_ancestor(t, m):
                    edges[m].add(t)
    return strongly_connected(edges)


def strongly_connected(edges):
    """Tarjan's algorithm; returns the components with more than one module."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.remove(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append((sorted(comp), edges))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def show(mod):
    return "crate::" + "::".join(mod) if mod else "crate"


SELF_TEST = {
    # a <-> b through `use`, c -> d through an inline path, d -> c through a parent's re-export;
    # e uses its parent's items only (the module tree, not a loop).
    "lib.rs": "mod a; mod b; mod c; mod d; pub mod e; pub use d::Thing;\n",
    "a.rs": "use crate::b::{self, B};\n",
    "b.rs": "// use crate::a; in a comment is ignored\nuse super::a::A as Other;\n",
    "c.rs": "fn f() { let s = \"crate::e::x\"; crate::d::g(); }\n",
    "d.rs": "pub struct Thing; fn g() -> crate::Thing { crate::c::f() }\n",
    "e/mod.rs": "mod inner; use inner::X;\n",
    "e/inner.rs": "use super::Y; #[cfg(test)] mod tests { use super::*; }\n",
}


def self_test():
    """The checker finds the loops of a small crate written for it, and only those."""
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        for name, text in SELF_TEST.items():
            path = os.path.join(root, "crates", "t", "src", name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        found = sorted(comp for comp, _ in check_crate("t", crate_modules(os.path.join(root, "crates", "t", "src"))))
    want = [[("a",), ("b",)], [("c",), ("d",)]]
    if found != want:
        print(f"self-test failed: found {found}, want {want}")
        sys.exit(1)
    print("self-test: the known loops are reported")


def main():
    if sys.argv[1:] == ["--self-test"]:
        self_test()
        return
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..")
    crates = os.path.join(root, "crates")
    failed = False
    for name in sorted(os.listdir(crates)):
        src = os.path.join(crates, name, "src")
        if not os.path.isdir(src):
            continue
        for comp, edges in check_crate(name, crate_modules(src)):
            failed = True
            members = set(comp)
            print(f"import loop in {name}: {len(comp)} modules")
            for m in comp:
                inside = sorted(show(t) for t in edges[m] if t in members)
                print(f"  {show(m)} -> {', '.join(inside)}")
    if failed:
        sys.exit(1)
    print("no import loops among the modules of crates/*/src")


if __name__ == "__main__":
    main()
