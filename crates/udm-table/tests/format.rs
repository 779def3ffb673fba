//! Print/parse round trips of the table text and the concise format, and the fuzz entry point
//! on random bytes.

// Test helpers unwrap as the tests themselves may.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use udm_table::{fuzz_parse, split_args, ConciseDevice, TableLine, TableSpec};

/// Target type names: what a kernel type name looks like (no whitespace, no '#').
fn type_name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9_-]{0,14}"
}

/// Parameters as written in a table: tokens (which may hold any printable character but '#',
/// including commas, semicolons and backslashes) separated by runs of spaces and tabs.
fn params() -> impl Strategy<Value = String> {
    let token = "[!-\"$-~]{1,12}";
    let sep = "[ \t]{1,3}";
    prop::collection::vec((token, sep), 0..6).prop_map(|v| {
        let mut s = String::new();
        for (i, (t, sep)) in v.iter().enumerate() {
            if i > 0 {
                s.push_str(sep);
            }
            s.push_str(t);
        }
        s
    })
}

fn target_spec() -> impl Strategy<Value = TableLine> {
    (any::<u64>(), any::<u64>(), type_name(), params()).prop_map(
        |(start, len, target_type, params)| TableLine {
            start,
            len,
            target_type,
            params,
        },
    )
}

fn table_spec(min: usize) -> impl Strategy<Value = TableSpec> {
    prop::collection::vec(target_spec(), min..8).prop_map(|lines| TableSpec { lines })
}

/// Names and uuids: anything printable, including the concise separators, but not starting
/// with whitespace (dmsetup skips whitespace after a separator).
fn field() -> impl Strategy<Value = String> {
    "[!-~][ -~]{0,20}"
}

fn concise_device() -> impl Strategy<Value = ConciseDevice> {
    (
        field(),
        prop::option::of(field()),
        prop::option::of(0u32..(1 << 20)),
        any::<bool>(),
        any::<bool>(),
        table_spec(0),
    )
        .prop_map(
            |(name, uuid, minor, read_only, interpose, table)| ConciseDevice {
                name,
                uuid,
                minor,
                read_only,
                interpose,
                table,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn table_text_round_trips(spec in table_spec(0)) {
        let text = spec.to_string();
        let back = TableSpec::parse(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&back, &spec);
        prop_assert_eq!(back.to_string(), text);
    }

    #[test]
    fn table_text_tolerates_decoration(spec in table_spec(1), indent in "[ \t]{0,3}") {
        // Comments, blank lines, indentation and trailing comments do not change the table.
        let mut text = String::from("# a table\n\n");
        for l in &spec.lines {
            text.push_str(&format!("{indent}{l}  # comment\r\n"));
        }
        let back = TableSpec::parse(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(back, spec);
    }

    #[test]
    fn concise_round_trips(devs in prop::collection::vec(concise_device(), 1..4)) {
        let text = ConciseDevice::format_list(&devs);
        let back = ConciseDevice::parse_list(&text)
            .map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
        prop_assert_eq!(&back, &devs);
        prop_assert_eq!(ConciseDevice::format_list(&back), text);
    }

    #[test]
    fn split_args_escapes_round_trip(words in prop::collection::vec("[ -~]{1,10}", 0..6)) {
        // Escaping every space and backslash of each word and joining with spaces gives the
        // words back, as the kernel splits them.
        let joined = words
            .iter()
            .map(|w| w.replace('\\', "\\\\").replace(' ', "\\ "))
            .collect::<Vec<_>>()
            .join(" ");
        prop_assert_eq!(split_args(&joined), words);
    }

    #[test]
    fn fuzz_parse_never_panics(data in prop::collection::vec(any::<u8>(), 0..512)) {
        fuzz_parse(&data);
    }

    #[test]
    fn fuzz_parse_never_panics_on_table_like_text(
        text in "[0-9 a-z,;#\\\\\t\n+-]{0,200}"
    ) {
        fuzz_parse(text.as_bytes());
    }
}

#[test]
fn fuzz_parse_edge_cases() {
    for s in [
        "",
        "\\",
        ",,,,",
        ";;;",
        "a,,,rw,\\",
        "0 18446744073709551616 zero",
        "99999999999999999999999 1 x",
        "0 1 \u{0} \u{0}",
        "\u{a0}0 1 zero\u{a0}",
        "a,b,4294967296,ro,0 1 zero",
    ] {
        fuzz_parse(s.as_bytes());
    }
    fuzz_parse(&[0xff, 0xfe, b'\n', b'0', b' ', b'1', b' ', 0x80]);
}

#[test]
fn dmsetup_man_page_concise_examples() {
    let one =
        "test-linear-small,,,ro,0 2097152 linear /dev/loop0 0, 2097152 2097152 linear /dev/loop1 0";
    let d = ConciseDevice::parse_list(one).unwrap();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].name, "test-linear-small");
    assert_eq!(
        (d[0].uuid.clone(), d[0].minor, d[0].read_only),
        (None, None, true)
    );
    assert_eq!(
        d[0].table.to_string(),
        "0 2097152 linear /dev/loop0 0\n2097152 2097152 linear /dev/loop1 0\n"
    );
    let two = "test-linear-small,,,,0 2097152 linear /dev/loop0 0;test-linear-large,,,, 0 2097152 linear /dev/loop1 0, 2097152 2097152 linear /dev/loop2 0";
    let d = ConciseDevice::parse_list(two).unwrap();
    assert_eq!(d.len(), 2);
    assert!(!d[0].read_only && !d[1].read_only);
    assert_eq!(d[1].table.lines.len(), 2);
    assert_eq!(d[1].table.lines[1].params, "/dev/loop2 0");
    // Printed as `dmsetup table --concise` prints (flags always spelled out).
    assert_eq!(
        ConciseDevice::format_list(&d),
        "test-linear-small,,,rw,0 2097152 linear /dev/loop0 0;test-linear-large,,,rw,0 2097152 linear /dev/loop1 0,2097152 2097152 linear /dev/loop2 0"
    );
}

#[test]
fn concise_interpose_flag_and_escapes() {
    let s = "snap\\;1,LVM-x\\,y,7,ro+interpose,0 8 linear [interpose]vda 0";
    let d = ConciseDevice::parse_list(s).unwrap();
    assert_eq!(d[0].name, "snap;1");
    assert_eq!(d[0].uuid.as_deref(), Some("LVM-x,y"));
    assert_eq!(d[0].minor, Some(7));
    assert!(d[0].read_only && d[0].interpose);
    assert_eq!(d[0].table.lines[0].params, "[interpose]vda 0");
    assert_eq!(d[0].to_string(), s);
    // Zero-length params print with dmsetup's trailing space.
    let z = ConciseDevice::parse_list("z,,,rw,0 8 zero").unwrap();
    assert_eq!(z[0].to_string(), "z,,,rw,0 8 zero ");
    assert_eq!(ConciseDevice::parse_list(&z[0].to_string()).unwrap(), z);
    // A trailing ';' and whitespace between devices are accepted.
    assert_eq!(
        ConciseDevice::parse_list("a,,,rw,0 1 zero;  b,,,rw,0 1 zero;")
            .unwrap()
            .len(),
        2
    );
}
