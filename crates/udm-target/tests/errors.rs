//! Every error path of table parsing, validation and the basic targets' constructors: the
//! errno, the line and the kernel's message.

// Test helpers unwrap as the tests themselves may.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use udm_io::backend::mem::MemDevice;
use udm_io::Limits;
use udm_target::table::{ConciseDevice, TableLine, TableSpec, DM_MAX_TARGETS};
use udm_target::testing::TestContext;
use udm_types::Errno;

fn ctx() -> TestContext {
    let mut c = TestContext::new();
    c.add_mem("d0", 100);
    c.add_mem("d1", 100);
    c.add_device(
        "big",
        Arc::new(MemDevice::with_limits(
            64,
            Limits {
                logical_block_size: 4096,
                ..Limits::default()
            },
        )),
    );
    c
}

#[track_caller]
fn fails(table: &str, errno: Errno, line: Option<usize>, msg: &str) {
    let e = match ctx().build(table) {
        Ok(_) => panic!("table {table:?} was accepted"),
        Err(e) => e,
    };
    assert_eq!(e.errno, errno, "errno of {table:?}: {e}");
    assert_eq!(e.line, line, "line of {table:?}: {e}");
    assert!(
        e.msg.contains(msg),
        "message of {table:?} is {:?}, expected it to contain {msg:?}",
        e.msg
    );
}

const EINVAL: Errno = Errno::EINVAL;

#[test]
fn text_format_errors() {
    fails("0 10", EINVAL, Some(1), "invalid format");
    fails(
        "# c\n0 10 zero\n\nx 10 zero",
        EINVAL,
        Some(4),
        "bad start sector",
    );
    fails("0 -1 zero", EINVAL, Some(1), "bad length");
    fails("0 18446744073709551616 zero", EINVAL, Some(1), "bad length");
    fails("0 10 averyveryverylongname", EINVAL, Some(1), "too long");
}

#[test]
fn layout_errors() {
    fails("", EINVAL, None, "no targets specified");
    fails("# only a comment", EINVAL, None, "no targets specified");
    fails(
        "0 10 nosuch",
        EINVAL,
        Some(1),
        "nosuch: unknown target type",
    );
    fails("0 0 zero", EINVAL, Some(1), "zero-length target");
    fails("5 10 zero", EINVAL, Some(1), "zero: Gap in table");
    fails(
        "0 10 zero\n20 10 error",
        EINVAL,
        Some(2),
        "error: Gap in table",
    );
    fails("0 10 zero\n5 10 zero", EINVAL, Some(2), "Gap in table");
    fails(
        "0 18446744073709551615 zero",
        EINVAL,
        Some(1),
        "too large device",
    );
    fails(
        "0 18014398509481984 zero",
        EINVAL,
        Some(1),
        "too large device",
    );
    // The largest device the kernel allows is accepted.
    ctx().build("0 18014398509481983 zero").unwrap();
}

#[test]
fn too_many_targets_is_eoverflow() {
    let spec = TableSpec {
        lines: vec![TableLine::default(); DM_MAX_TARGETS + 1],
    };
    let e = spec.validate_layout().unwrap_err();
    assert_eq!(e.errno, Errno::EOVERFLOW);
    let e = TableSpec::default().validate_layout().unwrap_err();
    assert_eq!(e.errno, EINVAL);
}

#[test]
fn linear_errors() {
    fails(
        "0 10 linear d0",
        EINVAL,
        Some(1),
        "linear: Invalid argument count",
    );
    fails(
        "0 10 linear d0 0 1",
        EINVAL,
        Some(1),
        "Invalid argument count",
    );
    fails("0 10 linear d0 x", EINVAL, Some(1), "Invalid device sector");
    fails(
        "0 10 linear d0 -1",
        EINVAL,
        Some(1),
        "Invalid device sector",
    );
    fails(
        "0 10 zero\n10 10 linear nodev 0",
        Errno::ENOENT,
        Some(2),
        "Device lookup failed: nodev",
    );
    fails(
        "0 10 linear 99:99 0",
        Errno::ENXIO,
        Some(1),
        "Device lookup failed",
    );
    fails("0 10 linear d0 95", EINVAL, Some(1), "too small for target");
    fails(
        "0 10 linear d0 100",
        EINVAL,
        Some(1),
        "too small for target",
    );
    fails(
        "0 4 linear big 0",
        EINVAL,
        Some(1),
        "not aligned to h/w logical block size",
    );
}

#[test]
fn alignment_of_target_boundaries() {
    // A 4096-byte device in the middle makes every boundary a multiple of 8 sectors: the
    // zero target's 3 sectors push the linear target off that grid.
    fails(
        "0 3 zero\n3 8 linear big 0\n11 5 zero",
        EINVAL,
        Some(2),
        "start sect 3 len 8 not aligned to h/w logical block size 4096",
    );
    fails(
        "0 8 linear big 0\n8 3 zero",
        EINVAL,
        Some(2),
        "not aligned to h/w logical block size 4096",
    );
    let t = ctx().build("0 8 linear big 0\n8 8 zero").unwrap();
    assert_eq!(t.limits().logical_block_size, 4096);
}

#[test]
fn zero_and_error_arguments() {
    fails(
        "0 10 zero 1",
        EINVAL,
        Some(1),
        "zero: No arguments required",
    );
    fails(
        "0 10 error d0 x",
        EINVAL,
        Some(1),
        "error: Invalid device sector",
    );
    fails(
        "0 10 error nodev 0",
        Errno::ENOENT,
        Some(1),
        "Device lookup failed",
    );
    // Other argument counts are ignored.
    ctx().build("0 10 error a b c").unwrap();
    ctx().build("0 10 error d0 0").unwrap();
}

#[test]
fn striped_errors() {
    fails(
        "0 10 striped 1",
        EINVAL,
        Some(1),
        "striped: Not enough arguments",
    );
    fails(
        "0 10 striped 0 2 d0 0",
        EINVAL,
        Some(1),
        "Invalid stripe count",
    );
    fails(
        "0 10 striped x 2 d0 0",
        EINVAL,
        Some(1),
        "Invalid stripe count",
    );
    fails(
        "0 10 striped 2 0 d0 0 d1 0",
        EINVAL,
        Some(1),
        "Invalid chunk_size",
    );
    fails(
        "0 9 striped 2 1 d0 0 d1 0",
        EINVAL,
        Some(1),
        "Target length not divisible by number of stripes",
    );
    fails(
        "0 12 striped 2 4 d0 0 d1 0",
        EINVAL,
        Some(1),
        "Target length not divisible by chunk size",
    );
    fails(
        "0 8 striped 2 2 d0 0",
        EINVAL,
        Some(1),
        "Not enough destinations specified",
    );
    fails(
        "0 8 striped 2 2 d0 0 d1 0 d1 0",
        EINVAL,
        Some(1),
        "Not enough destinations specified",
    );
    fails(
        "0 8 striped 2 2 d0 0 d1 x",
        EINVAL,
        Some(1),
        "Couldn't parse stripe destination",
    );
    fails(
        "0 8 striped 2 2 d0 0 nodev 0",
        Errno::ENOENT,
        Some(1),
        "Couldn't parse stripe destination",
    );
    fails(
        "0 8 striped 2 2 d0 0 d1 97",
        EINVAL,
        Some(1),
        "too small for target",
    );
}

#[test]
fn delay_errors() {
    fails(
        "0 10 delay d0 0",
        EINVAL,
        Some(1),
        "delay: Requires exactly 3, 6 or 9 arguments",
    );
    fails(
        "0 10 delay d0 0 1 d1 0",
        EINVAL,
        Some(1),
        "Requires exactly 3, 6 or 9",
    );
    fails(
        "0 10 delay d0 x 1",
        EINVAL,
        Some(1),
        "Invalid device sector",
    );
    fails("0 10 delay d0 0 x", EINVAL, Some(1), "Invalid delay");
    fails(
        "0 10 delay d0 0 4294967296",
        EINVAL,
        Some(1),
        "Invalid delay",
    );
    fails(
        "0 10 delay d0 0 1 d1 0 -5",
        EINVAL,
        Some(1),
        "Invalid delay",
    );
    fails(
        "0 10 delay d0 0 1 nodev 0 1",
        Errno::ENOENT,
        Some(1),
        "Device lookup failed",
    );
    fails(
        "0 10 delay d0 0 1 d1 0 1 d1 95 0",
        EINVAL,
        Some(1),
        "too small for target",
    );
}

#[test]
fn flakey_errors() {
    let f = |rest: &str| format!("0 10 flakey d0 0 {rest}");
    fails(&f("1"), EINVAL, Some(1), "flakey: Invalid argument count");
    fails(&f("x 1"), EINVAL, Some(1), "Invalid up interval");
    fails(&f("1 x"), EINVAL, Some(1), "Invalid down interval");
    fails(
        &f("0 0"),
        EINVAL,
        Some(1),
        "Total (up + down) interval is zero",
    );
    fails(
        &f("4294967295 1"),
        EINVAL,
        Some(1),
        "Total (up + down) interval is zero",
    );
    fails(&f("4294967295 2"), EINVAL, Some(1), "Interval overflow");
    fails(
        "0 10 flakey d0 y 1 1",
        EINVAL,
        Some(1),
        "Invalid device sector",
    );
    fails(
        &f("1 1 12"),
        EINVAL,
        Some(1),
        "Invalid number of feature args",
    );
    fails(
        &f("1 1 3 error_reads x"),
        EINVAL,
        Some(1),
        "Invalid number of feature args",
    );
    fails(
        &f("1 1 1 bogus"),
        EINVAL,
        Some(1),
        "Unrecognised flakey feature requested",
    );
    fails(
        &f("1 1 2 error_reads ERROR_READS"),
        EINVAL,
        Some(1),
        "Feature error_reads duplicated",
    );
    fails(
        &f("1 1 2 drop_writes drop_writes"),
        EINVAL,
        Some(1),
        "Feature drop_writes duplicated",
    );
    fails(
        &f("1 1 2 drop_writes error_writes"),
        EINVAL,
        Some(1),
        "Feature error_writes conflicts with feature drop_writes",
    );
    fails(
        &f("1 1 2 error_writes drop_writes"),
        EINVAL,
        Some(1),
        "Feature drop_writes conflicts with feature error_writes",
    );
    fails(
        &f("1 1 2 corrupt_bio_byte 1"),
        EINVAL,
        Some(1),
        "Feature corrupt_bio_byte requires 4 parameters",
    );
    fails(
        &f("1 1 5 corrupt_bio_byte 0 r 0 0"),
        EINVAL,
        Some(1),
        "Invalid corrupt bio byte",
    );
    fails(
        &f("1 1 5 corrupt_bio_byte 1 x 0 0"),
        EINVAL,
        Some(1),
        "Invalid corrupt bio direction (r or w)",
    );
    fails(
        &f("1 1 5 corrupt_bio_byte 1 r 256 0"),
        EINVAL,
        Some(1),
        "Invalid corrupt value to write into bio byte (0-255)",
    );
    fails(
        &f("1 1 5 corrupt_bio_byte 1 r 0 x"),
        EINVAL,
        Some(1),
        "Invalid corrupt bio flags mask",
    );
    fails(
        &f("1 1 10 corrupt_bio_byte 1 r 0 0 corrupt_bio_byte 2 w 0 0"),
        EINVAL,
        Some(1),
        "Feature corrupt_bio_byte duplicated",
    );
    fails(
        &f("1 1 2 random_read_corrupt 1000000001"),
        EINVAL,
        Some(1),
        "Invalid random corrupt argument",
    );
    fails(
        &f("1 1 1 random_write_corrupt"),
        EINVAL,
        Some(1),
        "Feature random_write_corrupt requires a parameter",
    );
    fails(
        &f("1 1 4 random_read_corrupt 5 random_read_corrupt 6"),
        EINVAL,
        Some(1),
        "Feature random_read_corrupt duplicated",
    );
    fails(
        &f("1 1 3 drop_writes random_write_corrupt 5"),
        EINVAL,
        Some(1),
        "drop_writes is incompatible with random_write_corrupt or corrupt_bio_byte with the WRITE flag set",
    );
    fails(
        &f("1 1 6 error_writes corrupt_bio_byte 1 w 0 0"),
        EINVAL,
        Some(1),
        "error_writes is incompatible",
    );
    fails(
        &f("1 1 3 error_reads random_read_corrupt 1"),
        EINVAL,
        Some(1),
        "error_reads is incompatible with random_read_corrupt or corrupt_bio_byte with the READ flag set",
    );
    fails(
        "0 10 flakey nodev 0 1 1",
        Errno::ENOENT,
        Some(1),
        "Device lookup failed",
    );
}

#[test]
fn concise_errors() {
    let err = |s: &str| ConciseDevice::parse_list(s).unwrap_err();
    let e = err("a,,,xx,0 1 zero");
    assert_eq!(e.errno, EINVAL);
    assert!(e.msg.contains("invalid flags parameter 'xx'"), "{e}");
    assert!(err("a,,,rw").msg.contains("five comma-separated fields"));
    assert!(err("a,,,rw,0 1 zero;b,,").msg.contains("device 2"));
    assert!(err("a,,abc,rw,0 1 zero").msg.contains("invalid minor"));
    assert!(err("a,,1048576,rw,0 1 zero").msg.contains("invalid minor"));
    assert!(err("a,,,rw,0 1 zero\\").msg.contains("backslash"));
    assert!(err(",,,rw,0 1 zero").msg.contains("empty device name"));
    let e = err("a,,,rw,0 1 zero,x 1 zero");
    assert_eq!(e.line, Some(2));
    assert!(e.msg.contains("device 1 (a)"), "{e}");
}

#[test]
fn message_outside_the_device_is_einval() {
    let t = ctx().build("0 10 zero").unwrap();
    let e = t.message(10, &["x".into()]).unwrap_err();
    assert_eq!(e.errno, EINVAL);
    assert!(e.msg.contains("outside device"));
    let e = t.message(0, &["x".into()]).unwrap_err();
    assert_eq!(e.errno, EINVAL);
}

#[test]
fn error_display_names_the_line() {
    let e = ctx().build("0 10 zero\n10 10 linear d0").unwrap_err();
    assert_eq!(e.to_string(), "line 2: linear: Invalid argument count");
}
