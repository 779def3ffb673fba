//! What TRIM and CACHE requests do to the device, not just their replies: a TRIM discards
//! exactly its range (nothing when the device cannot discard), a device's EOPNOTSUPP is a
//! success and any other error is the client's error; a CACHE reads its whole range, across
//! the server's 1 MiB steps, and reports a read error. Written against mutants cargo-mutants
//! found missed in `Conn::run_request` (a TRIM of no sectors, errors swallowed, a CACHE that
//! read nothing or the wrong sectors all still answered success).

#![allow(clippy::unwrap_used)] // tests may unwrap (helpers included)

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;
use udm_export::nbd::client::{Client, Reply};
use udm_export::nbd::proto::*;
use udm_export::nbd::{NbdExportOptions, NbdServer};
use udm_io::backend::mem::{Fault, MemDevice};
use udm_io::{Bio, BioKind, BlockDevice, ExtentKind, Limits};
use udm_types::Errno;

const MIB: u64 = 1 << 20;

/// `dev`, filled with 0x5a, exported as `disk`; a connected client.
fn serve(dev: Arc<MemDevice>) -> (Arc<NbdServer>, Client<UnixStream>, tempfile::TempDir) {
    let size = dev.size();
    dev.submit(Bio::write(0, &vec![0x5a; (size * 512) as usize]))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = NbdServer::new();
    server
        .add_export("disk", dev, NbdExportOptions::default())
        .unwrap();
    let sock = dir.path().join("nbd.sock");
    server.listen_unix(&sock).unwrap();
    let s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let c = Client::connect(s, "disk", true).unwrap();
    (server, c, dir)
}

fn kinds(dev: &MemDevice, sector: u64, sectors: u64) -> Vec<(u64, ExtentKind)> {
    dev.block_status(sector, sectors)
        .unwrap()
        .into_iter()
        .map(|e| (e.sectors, e.kind))
        .collect()
}

#[test]
fn trim_discards_its_range_and_reports_errors() {
    let dev = Arc::new(MemDevice::new(4 * MIB / 512));
    let (server, mut c, _dir) = serve(dev.clone());
    let before = dev.count(BioKind::Discard);
    assert_eq!(
        c.call(CMD_TRIM, 0, 64 * 1024, 8192, &[]).unwrap(),
        Reply::Ok(vec![])
    );
    assert_eq!(
        dev.count(BioKind::Discard),
        before + 1,
        "TRIM sent no discard"
    );
    assert_eq!(
        kinds(&dev, 0, 256),
        vec![
            (128, ExtentKind::Data),
            (16, ExtentKind::HoleZero),
            (112, ExtentKind::Data)
        ],
        "TRIM discarded the wrong range"
    );
    // A device that cannot discard this range (EOPNOTSUPP): TRIM is advisory, so success.
    dev.inject(Fault::range(1024, 1032, Errno::EOPNOTSUPP).ops(&[BioKind::Discard]));
    assert_eq!(
        c.call(CMD_TRIM, 0, 1024 * 512, 4096, &[]).unwrap(),
        Reply::Ok(vec![])
    );
    // Any other failure is the client's to know.
    dev.inject(Fault::range(2048, 2056, Errno::EIO).ops(&[BioKind::Discard]));
    assert_eq!(
        c.call(CMD_TRIM, 0, 2048 * 512, 4096, &[]).unwrap(),
        Reply::Err(NBD_EIO)
    );
    server.shutdown();
}

#[test]
fn trim_on_a_device_without_discard_leaves_the_data() {
    let limits = Limits {
        discard: false,
        ..Limits::default()
    };
    let dev = Arc::new(MemDevice::with_limits(MIB / 512, limits));
    let (server, mut c, _dir) = serve(dev.clone());
    let before = dev.count(BioKind::Discard);
    assert_eq!(
        c.call(CMD_TRIM, 0, 0, 8192, &[]).unwrap(),
        Reply::Ok(vec![])
    );
    assert_eq!(
        dev.count(BioKind::Discard),
        before,
        "a discard the device does not do"
    );
    assert_eq!(c.read(0, 8192).unwrap(), Reply::Ok(vec![0x5a; 8192]));
    server.shutdown();
}

#[test]
fn cache_reads_its_whole_range_and_reports_a_read_error() {
    let dev = Arc::new(MemDevice::new(4 * MIB / 512));
    let (server, mut c, _dir) = serve(dev.clone());
    let reads = dev.count(BioKind::Read);
    // 2.5 MiB from 512 KiB: three steps of at most 1 MiB.
    assert_eq!(
        c.call(CMD_CACHE, 0, MIB / 2, (5 * MIB / 2) as u32, &[])
            .unwrap(),
        Reply::Ok(vec![])
    );
    assert!(
        dev.count(BioKind::Read) >= reads + 3,
        "CACHE read {} times",
        dev.count(BioKind::Read) - reads
    );
    // A bad sector just past a CACHE's end: not read (the last step is what remains).
    let past = (3 * MIB + 4096) / 512;
    dev.inject(Fault::range(past, past + 1, Errno::EIO).ops(&[BioKind::Read]));
    assert_eq!(
        c.call(CMD_CACHE, 0, MIB / 2, (9 * MIB / 4) as u32, &[])
            .unwrap(),
        Reply::Ok(vec![]),
        "CACHE read past its range"
    );
    // A bad sector in the last step only (past 2.5 MiB): the CACHE fails, and one that
    // ends before it succeeds.
    let bad = (5 * MIB / 2 + 4096) / 512;
    dev.inject(Fault::range(bad, bad + 1, Errno::EIO).ops(&[BioKind::Read]));
    assert_eq!(
        c.call(CMD_CACHE, 0, MIB / 2, (5 * MIB / 2) as u32, &[])
            .unwrap(),
        Reply::Err(NBD_EIO),
        "a read error inside a CACHE's range was not reported"
    );
    assert_eq!(
        c.call(CMD_CACHE, 0, MIB / 2, (2 * MIB) as u32, &[])
            .unwrap(),
        Reply::Ok(vec![])
    );
    server.shutdown();
}
