//! The configuration a registry records (`config`) and a fresh registry restores (`restore`):
//! every kind of device comes back as it was, an inactive table alone and a suspended device
//! with no table included. Written against the persist.rs mutants cargo-mutants found missed;
//! tests/restore.rs covers missing files.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use udm_core::registry::{DiskOptions, LoadFlags, ResumeOptions};
use udm_core::Registry;
use udm_target::table::TableSpec;

#[test]
fn every_device_state_survives_a_restore() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.img");
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(1 << 20))
        .unwrap();
    let reg = Registry::new();
    reg.add_disk("d", &path, &DiskOptions::default()).unwrap();
    let spec = TableSpec::parse("0 1024 linear d 0").unwrap();
    let none = ResumeOptions::default();
    // live, live + inactive, inactive only, nothing, nothing but suspended, live and suspended.
    reg.create(
        "live",
        Some("U-live"),
        None,
        Some((&spec, LoadFlags::default())),
        &none,
    )
    .unwrap();
    reg.create(
        "both",
        None,
        None,
        Some((&spec, LoadFlags::default())),
        &none,
    )
    .unwrap();
    reg.load(
        "both",
        &spec,
        LoadFlags {
            read_only: true,
            ..LoadFlags::default()
        },
    )
    .unwrap();
    reg.create("inactive", None, Some(9), None, &none).unwrap();
    reg.load("inactive", &spec, LoadFlags::default()).unwrap();
    reg.create("empty", None, None, None, &none).unwrap();
    reg.create("empty-susp", None, None, None, &none).unwrap();
    reg.suspend("empty-susp", Default::default()).unwrap();
    reg.create(
        "susp",
        None,
        None,
        Some((&spec, LoadFlags::default())),
        &none,
    )
    .unwrap();
    reg.suspend("susp", Default::default()).unwrap();
    let cfg = reg.config();

    let again = Registry::new();
    let problems = again.restore(&cfg);
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(
        again.config(),
        cfg,
        "restore changed the recorded configuration"
    );
    let info = |n: &str| again.info(n).unwrap();
    assert!(info("live").live_present && !info("live").inactive_present);
    assert_eq!(info("live").uuid.as_deref(), Some("U-live"));
    assert!(info("both").live_present && info("both").inactive_present);
    let inactive = info("inactive");
    assert!(
        !inactive.live_present && inactive.inactive_present,
        "{inactive:?}"
    );
    assert_eq!(inactive.minor, 9);
    assert!(!info("empty").suspended && !info("empty").live_present);
    assert!(
        info("empty-susp").suspended,
        "a suspended device without a table"
    );
    assert!(info("susp").suspended && info("susp").live_present);
    for n in ["live", "both", "inactive", "empty", "empty-susp", "susp"] {
        assert!(
            info(n).unavailable.is_none(),
            "{n}: {:?}",
            info(n).unavailable
        );
    }
}
