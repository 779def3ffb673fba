//! Control operations through udmd never wait for a suspended device while holding what the
//! release path needs (issues "Trustworthy daemon" and "Architecture"): `create --interpose` over
//! a device whose NBD READ is parked in a suspended device below waits for that READ without
//! the registry lock, so `info`, `status`, `ls` and `table` answer, a conflicting change is
//! refused with EBUSY, and `resume` of the suspended device releases the READ and lets the
//! switch complete. Every wait is bounded: a hang fails the test.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::time::Duration;
use udm_export::nbd::client::Reply;
use udm_testkit::{
    fill_pattern, join_within, parked_below, udmsetup_bg, ParkedRead, Udmd, CREATE_IP_OVER_O,
};

/// `udmsetup ARGS`, which must succeed within `limit`; returns its stdout.
fn ok_within(d: &Udmd, args: &[&str], limit: Duration) -> String {
    let o = join_within(udmsetup_bg(d, args), limit, &format!("udmsetup {args:?}"));
    assert!(
        o.status.success(),
        "udmsetup {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `udmsetup ARGS`, which must fail with EBUSY within `limit`.
fn busy_within(d: &Udmd, args: &[&str], limit: Duration) {
    let o = join_within(udmsetup_bg(d, args), limit, &format!("udmsetup {args:?}"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("EBUSY"),
        "udmsetup {args:?} during the switch: {err}{}",
        String::from_utf8_lossy(&o.stdout)
    );
}

#[test]
fn create_interpose_over_parked_io_leaves_queries_and_resume_free() {
    let mut d = Udmd::start();
    let ParkedRead { mut client, handle } = parked_below(&d);

    let create = udmsetup_bg(&d, &CREATE_IP_OVER_O);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !create.is_finished(),
        "create --interpose did not wait for the parked READ: {:?}",
        create.join()
    );
    // The switch waits without the registry lock: queries answer.
    let quick = Duration::from_secs(3);
    let info = ok_within(&d, &["info", "ip"], quick);
    assert!(info.contains("ip"), "{info}");
    ok_within(&d, &["info", "o"], quick);
    ok_within(&d, &["status", "o"], quick);
    ok_within(&d, &["table", "ip"], quick);
    let ls = ok_within(&d, &["ls"], quick);
    assert!(ls.contains("ip") && ls.contains("low"), "{ls}");
    // Changes that conflict with the switch are refused, not queued behind it.
    busy_within(&d, &["suspend", "ip"], quick);
    busy_within(&d, &["remove", "ip"], quick);
    busy_within(
        &d,
        &[
            "create",
            "ip2",
            "--interpose",
            "--table",
            "0 8192 linear o 0",
        ],
        quick,
    );
    assert!(!create.is_finished(), "the switch ended before the resume");

    // The release path proceeds, and the switch then completes.
    ok_within(&d, &["resume", "low"], quick);
    let out = join_within(create, Duration::from_secs(10), "create --interpose");
    assert!(
        out.status.success(),
        "create --interpose failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (h, reply) = client.recv(|_| Some(4096)).unwrap();
    assert_eq!(h, handle);
    let mut want = vec![0u8; 4096];
    fill_pattern(&mut want, 0, 1);
    match reply {
        Reply::Ok(data) => assert!(data == want, "the parked READ returned wrong data"),
        other => panic!("the parked READ failed: {other:?}"),
    }
    let info = ok_within(&d, &["info", "ip"], quick);
    assert!(
        info.contains("ACTIVE") && !info.contains("SUSPENDED"),
        "{info}"
    );
    // I/O of the export now passes through the interposer.
    let data = client.read(4096, 4096).unwrap();
    fill_pattern(&mut want, 8, 1);
    assert!(matches!(data, Reply::Ok(ref v) if *v == want), "{data:?}");
    ok_within(&d, &["remove", "ip"], quick);
    drop(client);
    assert!(d.stop(), "udmd did not stop cleanly; log:\n{}", d.log());
}
