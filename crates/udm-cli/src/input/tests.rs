//! The CLI's table input, including the four points where its own parser used to disagree with
//! udmd's (issue 10): it now runs udmd's parser, so each test states the daemon's rule.

use super::*;
use udm_table::MAX_MINOR;

#[test]
fn dmsetup_parsing_rules() {
    let t = "  # comment\n\n0 100 linear /dev/vda 0   # trailing\n100 8 zero\n\t100+ \n";
    let err = parse_table(t, "f").unwrap_err();
    assert!(
        err.to_string()
            .starts_with("Invalid format on line 5 of table f"),
        "{err}"
    );
    assert!(err.to_string().ends_with("got '100+'"), "{err}");
    let t = "  # comment\n\n0 100 linear /dev/vda 0   # trailing\n100 8 zero\n";
    let l = parse_table(t, "f").unwrap();
    assert_eq!(l.lines.len(), 2);
    assert_eq!(l.lines[0].params, "/dev/vda 0");
}

#[test]
fn bad_numbers_and_missing_type() {
    assert!(parse_table("x 1 zero", "s").is_err());
    assert!(parse_table("0 -1 zero", "s").is_err());
    assert!(parse_table("0 8", "s").is_err());
    assert!(parse_table("", "s").unwrap().lines.is_empty());
}

#[test]
fn sources() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("t");
    std::fs::write(&f, "0 8 zero\n").unwrap();
    let mut empty: &[u8] = b"0 1 error\n";
    let len = |t: TableSpec| t.lines[0].len;
    assert_eq!(
        len(read_table(Some("0 2 zero"), Some(&f), &mut empty).unwrap()),
        2
    );
    assert_eq!(len(read_table(None, Some(&f), &mut empty).unwrap()), 8);
    assert_eq!(len(read_table(None, None, &mut empty).unwrap()), 1);
    assert!(read_table(None, Some(&dir.path().join("nope")), &mut empty).is_err());
}

#[test]
fn concise_format() {
    // The example of dmsetup's usage text.
    let d =
        parse_concise("dev1,,,,0 100 linear 253:1 0,100 100 error;dev2,,,ro,0 1 error").unwrap();
    assert_eq!(d.len(), 2);
    assert_eq!(d[0].name, "dev1");
    assert_eq!(
        d[0].table.to_string(),
        "0 100 linear 253:1 0\n100 100 error \n"
    );
    assert!(!d[0].read_only);
    assert!(d[1].read_only);
    assert_eq!(d[1].table.to_string(), "0 1 error \n");
    let d = parse_concise("a\\,b,U, 7, rw+interpose, 0 8 linear vda 0;").unwrap();
    assert_eq!(d[0].name, "a,b");
    assert_eq!(d[0].uuid.as_deref(), Some("U"));
    assert_eq!(d[0].minor, Some(7));
    assert!(d[0].interpose);
    assert!(parse_concise("a,,,xx,0 1 zero").is_err());
    assert!(parse_concise("a,,0 1 zero").is_err());
    assert!(parse_concise("").unwrap().is_empty());
}

/// Agreement 1: only C `isspace` separates; a Unicode space is part of a token, as in udmd.
#[test]
fn agrees_with_udmd_c_whitespace_only() {
    // U+00A0 (no-break space) is `char::is_whitespace` but not C whitespace.
    let e = parse_table("0\u{a0}8 zero", "--table").unwrap_err();
    assert!(matches!(e, InputError::Format { line: 1, .. }), "{e}");
    let t = parse_table("0 8 linear vda\u{2003}0", "--table").unwrap();
    assert_eq!(t.lines[0].params, "vda\u{2003}0");
    // Trimming is C trimming too: a leading U+00A0 is not blank, so the line is malformed.
    assert!(parse_table("\u{a0}0 8 zero", "--table").is_err());
}

/// Agreement 2: a target type name must fit the kernel's 16-byte buffer (at most 15).
#[test]
fn agrees_with_udmd_type_name_limit() {
    assert!(parse_table("0 8 abcdefghijklmno", "--table").is_ok());
    let e = parse_table("0 8 abcdefghijklmnop", "--table").unwrap_err();
    assert!(e.to_string().contains("too long"), "{e}");
    assert_eq!(e.errno(), udm_types::Errno::EINVAL);
}

/// Agreement 3: a concise minor above `MAX_MINOR` (20 bits) is refused.
#[test]
fn agrees_with_udmd_max_minor() {
    let ok = parse_concise(&format!("a,,{MAX_MINOR},,0 8 zero")).unwrap();
    assert_eq!(ok[0].minor, Some(MAX_MINOR));
    let e = parse_concise(&format!("a,,{},,0 8 zero", MAX_MINOR + 1)).unwrap_err();
    assert!(e.to_string().contains("invalid minor"), "{e}");
}

/// Agreement 4: the text sent to udmd keeps dmsetup's trailing space after a target without
/// parameters, which is how udmd prints and records it.
#[test]
fn agrees_with_udmd_trailing_space_kept() {
    let t = parse_table("0 8 zero\n8 8 linear vda 0", "--table").unwrap();
    assert_eq!(t.to_string(), "0 8 zero \n8 8 linear vda 0\n");
    let d = parse_concise("a,,,,0 8 error").unwrap();
    assert_eq!(d[0].table.to_string(), "0 8 error \n");
}
