//! `ls` and `ls --tree` (lvm2 `libdm/dm-tools/dmsetup.c` `_display_name`, `_display_dev`, the
//! tree drawing code `_out_char` .. `_display_tree_walk_children`, and libdm's dependency tree
//! `libdm/libdm-deptree.c` `_add_dev` / `_link_tree_nodes` / `dm_tree_node_num_children`, whose
//! link order decides the order of the branches).

use super::deps::DevNameStyle;
use std::collections::HashMap;
use udm_proto::{DeviceKindRecord, DeviceRecord, InfoRecord};

/// What dmsetup prints when there is no mapped device.
pub const NO_DEVICES: &str = "No devices found\n";

fn mapped_sorted(devs: &[DeviceRecord]) -> Vec<&DeviceRecord> {
    let mut v: Vec<&DeviceRecord> = devs
        .iter()
        .filter(|d| d.kind == DeviceKindRecord::Mapped)
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// `ls`: `printf("%s\t(%d:%d)\n")` per mapped device in name order, or `%s\t(%s)` with
/// `-o blkdevname` (`dm-MINOR`) / `-o devname`.
pub fn ls_names(devs: &[DeviceRecord], style: DevNameStyle) -> String {
    let v = mapped_sorted(devs);
    if v.is_empty() {
        return NO_DEVICES.into();
    }
    v.iter()
        .map(|d| {
            let line = match style {
                // A device without a block device yet has no name to show but its number.
                DevNameStyle::DevNo | DevNameStyle::BlkDevName | DevNameStyle::DevName
                    if d.no_block_device =>
                {
                    format!("{}\t({}:{})", d.name, d.major, d.minor)
                }
                DevNameStyle::DevNo => format!("{}\t({}:{})", d.name, d.major, d.minor),
                DevNameStyle::BlkDevName => format!("{}\t(dm-{})", d.name, d.minor),
                DevNameStyle::DevName => format!("{}\t({})", d.name, d.name),
            };
            // udm: a device whose recorded tables cannot be rebuilt says why.
            match &d.unavailable {
                Some(r) => format!("{line}\tunavailable: {r}\n"),
                None => format!("{line}\n"),
            }
        })
        .collect()
}

/// `ls --target T`: dmsetup routes this through `_status`, whose `_display_dev` prints
/// `"%s\t(%u, %u)\n"` (with a comma, unlike plain `ls`) for each device having such a target.
pub fn ls_with_target(devs: &[(String, u32, u32)]) -> String {
    devs.iter()
        .map(|(n, ma, mi)| format!("{n}\t({ma}, {mi})\n"))
        .collect()
}

/// The six drawing strings of a tree style (dmsetup.c `_tsym_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TreeSymbols {
    empty_2: &'static str,
    branch_2: &'static str,
    vert_2: &'static str,
    last_2: &'static str,
    single_3: &'static str,
    first_3: &'static str,
}

/// `_tsym_ascii`.
pub const TREE_ASCII: TreeSymbols = TreeSymbols {
    empty_2: "  ",
    branch_2: "|-",
    vert_2: "| ",
    last_2: "`-",
    single_3: "---",
    first_3: "-+-",
};

/// `_tsym_utf`: U+251C U+2500, U+2502, U+2514 U+2500, U+2500 x3, U+2500 U+252C U+2500.
pub const TREE_UTF8: TreeSymbols = TreeSymbols {
    empty_2: "  ",
    branch_2: "\u{251c}\u{2500}",
    vert_2: "\u{2502} ",
    last_2: "\u{2514}\u{2500}",
    single_3: "\u{2500}\u{2500}\u{2500}",
    first_3: "\u{2500}\u{252c}\u{2500}",
};

/// `_tsym_vt100` (DEC line drawing between `ESC(0 SI` and `ESC(B`).
pub const TREE_VT100: TreeSymbols = TreeSymbols {
    empty_2: "  ",
    branch_2: "\x1b(0\x0ftq\x1b(B",
    vert_2: "\x1b(0\x0fx\x1b(B ",
    last_2: "\x1b(0\x0fmq\x1b(B",
    single_3: "\x1b(0\x0fqqq\x1b(B",
    first_3: "\x1b(0\x0fqwq\x1b(B",
};

/// dmsetup's default symbol set: UTF-8 when the locale's codeset is UTF-8
/// (`nl_langinfo(CODESET)`), ASCII otherwise. The locale is the first non-empty of `LC_ALL`,
/// `LC_CTYPE`, `LANG`.
pub fn locale_is_utf8(lc_all: Option<&str>, lc_ctype: Option<&str>, lang: Option<&str>) -> bool {
    let loc = [lc_all, lc_ctype, lang]
        .into_iter()
        .flatten()
        .find(|s| !s.is_empty())
        .unwrap_or("");
    let l = loc.to_ascii_lowercase();
    l.contains("utf-8") || l.contains("utf8")
}

/// `ls --tree -o ...` switches (dmsetup.c `_process_tree_options`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeOptions {
    /// `(maj:min)` after each node (default on; `nodevice` turns it off).
    pub device: bool,
    /// `<blkdevname>`.
    pub blkdevname: bool,
    /// `[ACTIVE|SUSPENDED]`.
    pub active: bool,
    /// `[RO|RW]`.
    pub rw: bool,
    /// `[open count]`.
    pub open: bool,
    /// `[uuid]`.
    pub uuid: bool,
    /// Several nodes per line.
    pub compact: bool,
    /// Truncate lines at the terminal width (default on; `notrunc` turns it off).
    pub truncate: bool,
    /// Bottom-up (`inverted`).
    pub inverted: bool,
    /// Drawing characters.
    pub symbols: TreeSymbols,
    /// Truncation width (80, or the terminal's columns minus 3).
    pub termwidth: usize,
}

impl TreeOptions {
    /// Defaults for a locale, then the comma-separated `-o` words (prefixes accepted, as
    /// dmsetup compares with `strncmp(s, word, len)`).
    pub fn parse(spec: Option<&str>, utf8: bool) -> Result<TreeOptions, String> {
        let mut o = TreeOptions {
            device: true,
            blkdevname: false,
            active: false,
            rw: false,
            open: false,
            uuid: false,
            compact: false,
            truncate: true,
            inverted: false,
            symbols: if utf8 { TREE_UTF8 } else { TREE_ASCII },
            termwidth: 80,
        };
        for w in spec.unwrap_or("").split(',').filter(|w| !w.is_empty()) {
            let is = |word: &str| word.starts_with(w);
            if is("device") {
                o.device = true;
            } else if is("blkdevname") {
                o.blkdevname = true;
            } else if is("nodevice") {
                o.device = false;
            } else if is("active") {
                o.active = true;
            } else if is("open") {
                o.open = true;
            } else if is("uuid") {
                o.uuid = true;
            } else if is("rw") {
                o.rw = true;
            } else if is("utf") {
                o.symbols = TREE_UTF8;
            } else if is("vt100") {
                o.symbols = TREE_VT100;
            } else if is("ascii") {
                o.symbols = TREE_ASCII;
            } else if is("inverted") {
                o.inverted = true;
            } else if is("compact") {
                o.compact = true;
            } else if is("notrunc") {
                o.truncate = false;
            } else {
                return Err(format!(
                    "Tree options not recognised: {w}. (Tree options are: ascii, utf, vt100; \
                     compact, inverted, notrunc; blkdevname, [no]device, active, open, rw, uuid.)"
                ));
            }
        }
        Ok(o)
    }

    fn print_attribute(&self) -> bool {
        self.active || self.rw || self.open || self.uuid
    }

    fn print_compact(&self) -> bool {
        self.compact && !self.print_attribute()
    }
}

const ROOT: usize = 0;

struct Node {
    major: u32,
    minor: u32,
    /// Empty for devices that are not mapped devices (dm_tree names only dm devices).
    name: String,
    /// Disk name for `<blkdevname>`.
    blk: String,
    uses: Vec<usize>,
    used_by: Vec<usize>,
    interposes: Vec<String>,
    /// udm: its recorded tables wait for an unavailable device.
    unavailable: bool,
}

/// libdm's dependency tree, built the way `dm_tree_add_dev` builds it.
struct DepTree {
    nodes: Vec<Node>,
    by_dev: HashMap<(u32, u32), usize>,
}

fn parse_devno(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once(':')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

impl DepTree {
    fn new() -> Self {
        DepTree {
            nodes: vec![Node {
                major: 0,
                minor: 0,
                name: String::new(),
                blk: String::new(),
                uses: vec![],
                used_by: vec![],
                interposes: vec![],
                unavailable: false,
            }],
            by_dev: HashMap::new(),
        }
    }

    fn linked(&self, from: usize, to: usize) -> bool {
        self.nodes[from].uses.contains(&to)
    }

    fn link(&mut self, from: usize, to: usize) {
        if !self.linked(from, to) {
            self.nodes[from].uses.push(to);
            self.nodes[to].used_by.push(from);
        }
    }

    fn unlink(&mut self, from: usize, to: usize) {
        self.nodes[from].uses.retain(|&n| n != to);
        self.nodes[to].used_by.retain(|&n| n != from);
    }

    /// `dm_tree_node_num_children`.
    fn num_children(&self, n: usize, inverted: bool) -> usize {
        if inverted {
            if self.linked(ROOT, n) {
                return 0;
            }
            self.nodes[n].used_by.len()
        } else {
            if self.linked(n, ROOT) {
                return 0;
            }
            self.nodes[n].uses.len()
        }
    }

    /// `_link_tree_nodes`.
    fn link_tree_nodes(&mut self, parent: usize, child: usize) {
        if parent == ROOT {
            if self.num_children(child, true) > 0 {
                return;
            }
        } else {
            self.unlink(ROOT, child);
        }
        if child != ROOT {
            self.unlink(parent, ROOT);
        }
        self.link(parent, child);
    }

    /// `_add_dev`.
    fn add_dev(
        &mut self,
        parent: usize,
        dev: (u32, u32),
        all: &HashMap<(u32, u32), &DeviceRecord>,
        depth: usize,
    ) {
        let (idx, new) = match self.by_dev.get(&dev) {
            Some(&i) => (i, false),
            None => {
                let rec = all.get(&dev);
                let mapped = rec.is_some_and(|r| r.kind == DeviceKindRecord::Mapped);
                let blk = match rec {
                    Some(r) if mapped && r.no_block_device => String::new(),
                    Some(r) if mapped => format!("dm-{}", r.minor),
                    Some(r) => r.name.clone(),
                    None => String::new(),
                };
                let interposes = rec
                    .map(|r| {
                        r.interposes
                            .iter()
                            .map(|d| {
                                parse_devno(d)
                                    .and_then(|k| all.get(&k))
                                    .map(|x| x.name.clone())
                                    .unwrap_or_else(|| d.clone())
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                self.nodes.push(Node {
                    major: dev.0,
                    minor: dev.1,
                    name: if mapped {
                        rec.map(|r| r.name.clone()).unwrap_or_default()
                    } else {
                        String::new()
                    },
                    blk,
                    uses: vec![],
                    used_by: vec![],
                    interposes,
                    unavailable: rec.is_some_and(|r| r.unavailable.is_some()),
                });
                let i = self.nodes.len() - 1;
                self.by_dev.insert(dev, i);
                (i, true)
            }
        };
        self.link_tree_nodes(parent, idx);
        if !new {
            return;
        }
        let deps: Vec<(u32, u32)> = all
            .get(&dev)
            .filter(|r| r.kind == DeviceKindRecord::Mapped)
            .map(|r| r.deps.iter().filter_map(|d| parse_devno(d)).collect())
            .unwrap_or_default();
        if deps.is_empty() || depth > 100 {
            self.link(idx, ROOT);
            return;
        }
        for d in deps {
            self.add_dev(idx, d, all, depth + 1);
        }
    }
}

/// Output with dmsetup's truncation at the terminal width (`_out_char`, `_out_newline`).
struct TreeOut<'a> {
    o: &'a TreeOptions,
    buf: Vec<u8>,
    cur_x: usize,
    last_char: u8,
    width: Vec<usize>,
    more: Vec<bool>,
}

impl TreeOut<'_> {
    fn out_char(&mut self, c: u8) {
        if c & 0xc0 != 0x80 {
            self.cur_x += 1;
        }
        if !self.o.truncate {
            self.buf.push(c);
            return;
        }
        let tw = self.o.termwidth;
        if self.cur_x <= tw {
            self.buf.push(c);
        }
        if self.cur_x == tw + 1 && c & 0xc0 != 0x80 {
            if self.last_char != 0 || c & 0x80 != 0 {
                self.buf.extend_from_slice(b"...");
            } else {
                self.last_char = c;
                self.cur_x -= 1;
            }
        }
    }

    fn out_str(&mut self, s: &str) {
        for b in s.bytes() {
            self.out_char(b);
        }
    }

    fn newline(&mut self) {
        if self.last_char != 0 && self.cur_x == self.o.termwidth {
            self.buf.push(self.last_char);
        }
        self.last_char = 0;
        self.buf.push(b'\n');
        self.cur_x = 1;
    }

    fn prefix(&mut self, depth: usize) {
        for d in 0..depth {
            for _ in 0..self.width[d] + 1 {
                self.out_char(b' ');
            }
            let s = if d == depth - 1 {
                if self.more[depth] {
                    self.o.symbols.branch_2
                } else {
                    self.o.symbols.last_2
                }
            } else if self.more[d + 1] {
                self.o.symbols.vert_2
            } else {
                self.o.symbols.empty_2
            };
            self.out_str(s);
        }
    }
}

/// `ls --tree`: every mapped device with the devices it uses below it (or, `inverted`, the
/// devices using it). udm marks interposition after the node: ` [interposes vda]`.
pub fn ls_tree(devs: &[DeviceRecord], infos: &[InfoRecord], o: &TreeOptions) -> String {
    let mapped = mapped_sorted(devs);
    if mapped.is_empty() {
        return NO_DEVICES.into();
    }
    let all: HashMap<(u32, u32), &DeviceRecord> =
        devs.iter().map(|d| ((d.major, d.minor), d)).collect();
    let info: HashMap<&str, &InfoRecord> = infos.iter().map(|i| (i.name.as_str(), i)).collect();
    let mut t = DepTree::new();
    for d in &mapped {
        t.add_dev(ROOT, (d.major, d.minor), &all, 0);
    }
    let mut out = TreeOut {
        o,
        buf: Vec::new(),
        cur_x: 1,
        last_char: 0,
        width: vec![0; 104],
        more: vec![false; 104],
    };
    walk(&t, &info, &mut out, ROOT, 0);
    String::from_utf8_lossy(&out.buf).into_owned()
}

fn walk(
    t: &DepTree,
    info: &HashMap<&str, &InfoRecord>,
    out: &mut TreeOut<'_>,
    node: usize,
    depth: usize,
) {
    let inverted = out.o.inverted;
    let children = if inverted {
        t.nodes[node].used_by.clone()
    } else {
        t.nodes[node].uses.clone()
    };
    for (i, &child) in children.iter().enumerate() {
        let has_children = t.num_children(child, inverted) > 0;
        display_node(
            t,
            info,
            out,
            child,
            depth,
            i + 1 == children.len(),
            has_children,
        );
        if has_children && depth < 98 {
            walk(t, info, out, child, depth + 1);
        }
    }
}

fn display_node(
    t: &DepTree,
    info: &HashMap<&str, &InfoRecord>,
    out: &mut TreeOut<'_>,
    n: usize,
    depth: usize,
    last_child: bool,
    has_children: bool,
) {
    let node = &t.nodes[n];
    let o = out.o;
    if node.name.is_empty() && !o.device && !o.blkdevname {
        return;
    }
    out.more[depth] = !last_child;
    out.width[depth] = 0;
    let first_on_line = out.cur_x == 1;
    if !o.print_compact() || first_on_line {
        out.prefix(depth);
    }
    let offset = out.cur_x;
    if o.print_compact() && !first_on_line {
        let s = if out.more[depth] {
            o.symbols.first_3
        } else {
            o.symbols.single_3
        };
        out.out_str(s);
    }
    // dm_tree_node_get_name is never NULL: "" for devices that are not mapped devices, so
    // they print as " (8:16)" with a leading space, exactly as dmsetup does.
    out.out_str(&node.name);
    if o.blkdevname && !node.blk.is_empty() {
        out.out_str(" <");
        out.out_str(&node.blk);
        out.out_char(b'>');
    }
    if o.device {
        out.out_str(&format!(" ({}:{})", node.major, node.minor));
    }
    if o.print_attribute() {
        if let Some(i) = info.get(node.name.as_str()) {
            let mut attrs: Vec<String> = Vec::new();
            if o.active {
                attrs.push(if i.suspended { "SUSPENDED" } else { "ACTIVE" }.into());
            }
            if o.rw {
                attrs.push(if i.read_only { "RO" } else { "RW" }.into());
            }
            if o.open {
                attrs.push(i.open_count.max(0).to_string());
            }
            if o.uuid {
                attrs.push(i.uuid.clone().unwrap_or_default());
            }
            out.out_str(&format!(" [{}]", attrs.join(", ")));
        }
    }
    if !node.interposes.is_empty() {
        out.out_str(&format!(" [interposes {}]", node.interposes.join(", ")));
    }
    if node.unavailable {
        out.out_str(" [unavailable]");
    }
    if o.print_compact() {
        out.width[depth] = out.cur_x - offset;
    }
    if !o.print_compact() || !has_children {
        out.newline();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(name: &str, kind: DeviceKindRecord, mm: (u32, u32), deps: &[&str]) -> DeviceRecord {
        DeviceRecord {
            name: name.into(),
            major: mm.0,
            minor: mm.1,
            kind,
            deps: deps.iter().map(|s| s.to_string()).collect(),
            interposes: vec![],
            unavailable: None,
            no_block_device: false,
        }
    }

    fn lvm_like() -> Vec<DeviceRecord> {
        use DeviceKindRecord::*;
        vec![
            dev("vda", Disk, (254, 0), &[]),
            dev("vdb", Disk, (254, 16), &[]),
            dev("vg-root", Mapped, (253, 0), &["254:0"]),
            dev("vg-snap", Mapped, (253, 3), &["253:1", "253:2"]),
            dev("vg-base-real", Mapped, (253, 1), &["254:0"]),
            dev("vg-snap-cow", Mapped, (253, 2), &["254:16"]),
        ]
    }

    #[test]
    fn ls_plain_sorted_and_empty() {
        assert_eq!(
            ls_names(&lvm_like(), DevNameStyle::DevNo),
            "vg-base-real\t(253:1)\nvg-root\t(253:0)\nvg-snap\t(253:3)\nvg-snap-cow\t(253:2)\n"
        );
        assert_eq!(ls_names(&[], DevNameStyle::DevNo), "No devices found\n");
        assert_eq!(
            ls_names(&lvm_like()[2..3], DevNameStyle::BlkDevName),
            "vg-root\t(dm-0)\n"
        );
        assert_eq!(ls_with_target(&[("a".into(), 253, 0)]), "a\t(253, 0)\n");
    }

    #[test]
    fn tree_ascii_matches_dmsetup_shape() {
        // Real dmsetup: " `- (8:2)" for a leaf that is not a dm device; "|-name (maj:min)"
        // for a dm device in the middle of a branch.
        let o = TreeOptions::parse(None, false).unwrap();
        let out = ls_tree(&lvm_like(), &[], &o);
        assert_eq!(
            out,
            "vg-root (253:0)\n \
             `- (254:0)\n\
             vg-snap (253:3)\n \
             |-vg-base-real (253:1)\n \
             |  `- (254:0)\n \
             `-vg-snap-cow (253:2)\n    \
             `- (254:16)\n"
        );
    }

    #[test]
    fn tree_utf8_and_interposition_marker() {
        use DeviceKindRecord::*;
        let mut o_dev = dev("o", Mapped, (253, 0), &["254:0"]);
        o_dev.interposes = vec!["254:0".into()];
        let devs = vec![dev("vda", Disk, (254, 0), &[]), o_dev];
        let o = TreeOptions::parse(None, true).unwrap();
        assert_eq!(
            ls_tree(&devs, &[], &o),
            "o (253:0) [interposes vda]\n \u{2514}\u{2500} (254:0)\n"
        );
        let o = TreeOptions::parse(Some("blkdevname"), false).unwrap();
        assert_eq!(
            ls_tree(&devs, &[], &o),
            "o <dm-0> (253:0) [interposes vda]\n `- <vda> (254:0)\n"
        );
    }

    #[test]
    fn unavailable_devices_say_so() {
        use DeviceKindRecord::*;
        let mut v = dev("v", Mapped, (253, 0), &[]);
        v.unavailable = Some("/srv/d.img: no such file or block device".into());
        let devs = vec![v, dev("w", Mapped, (253, 1), &[])];
        assert_eq!(
            ls_names(&devs, DevNameStyle::DevNo),
            "v\t(253:0)\tunavailable: /srv/d.img: no such file or block device\nw\t(253:1)\n"
        );
        let o = TreeOptions::parse(None, false).unwrap();
        assert_eq!(
            ls_tree(&devs, &[], &o),
            "v (253:0) [unavailable]\nw (253:1)\n"
        );
    }

    #[test]
    fn tree_inverted_and_truncation() {
        let o = TreeOptions::parse(Some("inverted"), false).unwrap();
        let out = ls_tree(&lvm_like(), &[], &o);
        assert_eq!(
            out,
            " (254:0)\n \
             |-vg-base-real (253:1)\n \
             |  `-vg-snap (253:3)\n \
             `-vg-root (253:0)\n \
             (254:16)\n \
             `-vg-snap-cow (253:2)\n    \
             `-vg-snap (253:3)\n"
        );
        let long = "x".repeat(100);
        let devs = vec![dev(&long, DeviceKindRecord::Mapped, (253, 0), &[])];
        let mut o = TreeOptions::parse(None, false).unwrap();
        let out = ls_tree(&devs, &[], &o);
        assert_eq!(out, format!("{}...\n", "x".repeat(79)));
        o.truncate = false;
        assert_eq!(ls_tree(&devs, &[], &o), format!("{long} (253:0)\n"));
    }

    #[test]
    fn locale_detection() {
        assert!(locale_is_utf8(None, None, Some("en_US.UTF-8")));
        assert!(locale_is_utf8(Some("C.utf8"), None, Some("C")));
        assert!(!locale_is_utf8(Some("C"), None, Some("en_US.UTF-8")));
        assert!(!locale_is_utf8(None, None, None));
        assert!(TreeOptions::parse(Some("bogus"), false).is_err());
    }
}
