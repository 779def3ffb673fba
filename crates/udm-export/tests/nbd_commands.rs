//! What TRIM, CACHE, WRITE_ZEROES, split reads and writes, and BLOCK_STATUS do, not just their
//! replies: a TRIM discards exactly its range (nothing when the device cannot discard), a
//! device's EOPNOTSUPP is a success and any other error is the client's; a CACHE reads its
//! whole range, across the server's 1 MiB steps, and reports a read error; WRITE_ZEROES
//! passes NO_HOLE, FAST_ZERO and FUA on and falls back to writing zeroes unless FAST_ZERO
//! forbids it; a request longer than the device's largest is split in order; a uniform range
//! has one block-status descriptor. Written against mutants cargo-mutants found missed in
//! `Conn::run_request`, `write_zeroes`, `rw` and `block_status` (flags dropped, errors
//! swallowed, requests of the wrong sectors all answered success).

#![allow(clippy::unwrap_used)] // tests may unwrap (helpers included)

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;
use udm_export::nbd::client::{Client, Reply};
use udm_export::nbd::proto::*;
use udm_export::nbd::{NbdExportOptions, NbdServer};
use udm_io::backend::mem::{Fault, MemDevice};
use udm_io::{Bio, BioFlags, BioKind, BlockDevice, Extent, ExtentKind, IoError, Limits};
use udm_types::Errno;

const MIB: u64 = 1 << 20;

/// `dev`, filled with 0x5a, exported as `disk`; a connected client.
fn serve(dev: Arc<MemDevice>) -> (Arc<NbdServer>, Client<UnixStream>, tempfile::TempDir) {
    let size = dev.size();
    dev.submit(Bio::write(0, &vec![0x5a; (size * 512) as usize]))
        .unwrap();
    export(dev)
}

/// `dev` exported as `disk`; a connected client.
fn export(dev: Arc<dyn BlockDevice>) -> (Arc<NbdServer>, Client<UnixStream>, tempfile::TempDir) {
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

/// Sends WRITE_ZEROES of 8 KiB at `sector` with `flags`.
fn zeroes(c: &mut Client<UnixStream>, flags: u16, sector: u64) -> Reply {
    c.call(CMD_WRITE_ZEROES, flags, sector * 512, 8192, &[])
        .unwrap()
}

#[test]
fn write_zeroes_passes_its_flags_on_and_falls_back_unless_fast() {
    let dev = Arc::new(MemDevice::new(4 * MIB / 512));
    let (server, mut c, _dir) = serve(dev.clone());
    let count = |f| dev.flag_count(f);
    // Plain: a hole (the device may deallocate).
    assert_eq!(zeroes(&mut c, 0, 128), Reply::Ok(vec![]));
    assert_eq!(kinds(&dev, 128, 16), vec![(16, ExtentKind::HoleZero)]);
    assert_eq!(count(BioFlags::NO_UNMAP), 0);
    // NO_HOLE: allocated zeroes.
    assert_eq!(zeroes(&mut c, CMD_FLAG_NO_HOLE, 256), Reply::Ok(vec![]));
    assert_eq!(
        kinds(&dev, 256, 16),
        vec![(16, ExtentKind::Data)],
        "NO_HOLE lost"
    );
    assert_eq!(count(BioFlags::NO_UNMAP), 1);
    // FAST_ZERO and FUA reach the device.
    assert_eq!(zeroes(&mut c, CMD_FLAG_FAST_ZERO, 384), Reply::Ok(vec![]));
    assert_eq!(count(BioFlags::FAST_ZERO), 1, "FAST_ZERO lost");
    let fua = count(BioFlags::FUA);
    assert_eq!(
        zeroes(&mut c, CMD_FLAG_FUA | CMD_FLAG_NO_HOLE, 512),
        Reply::Ok(vec![])
    );
    assert_eq!(count(BioFlags::FUA), fua + 1, "FUA lost");
    assert_eq!(count(BioFlags::NO_UNMAP), 2, "NO_HOLE lost beside FUA");
    for at in [128u64, 256, 384, 512] {
        assert_eq!(c.read(at * 512, 8192).unwrap(), Reply::Ok(vec![0; 8192]));
    }
    // A device that cannot zero this range natively: written with zero buffers, unless
    // FAST_ZERO asks to fail instead (then nothing is written).
    dev.inject(Fault::range(1024, 2048, Errno::EOPNOTSUPP).ops(&[BioKind::WriteZeroes]));
    let writes = dev.count(BioKind::Write);
    assert_eq!(zeroes(&mut c, 0, 1024), Reply::Ok(vec![]));
    assert!(dev.count(BioKind::Write) > writes, "no fallback writes");
    assert_eq!(c.read(1024 * 512, 8192).unwrap(), Reply::Ok(vec![0; 8192]));
    assert_eq!(
        zeroes(&mut c, CMD_FLAG_FAST_ZERO, 1536),
        Reply::Err(NBD_ENOTSUP)
    );
    assert_eq!(
        c.read(1536 * 512, 8192).unwrap(),
        Reply::Ok(vec![0x5a; 8192])
    );
    // Any other failure is the client's.
    dev.inject(Fault::range(3000, 3100, Errno::EIO).ops(&[BioKind::WriteZeroes]));
    assert_eq!(zeroes(&mut c, 0, 3000), Reply::Err(NBD_EIO));
    server.shutdown();
}

#[test]
fn requests_longer_than_the_devices_largest_are_split_in_order() {
    let limits = Limits {
        max_io_sectors: 8,
        ..Limits::default()
    };
    let dev = Arc::new(MemDevice::with_limits(MIB / 512, limits));
    let (server, mut c, _dir) = serve(dev.clone());
    let data: Vec<u8> = (0..65536u32).map(|i| (i / 512) as u8 ^ (i as u8)).collect();
    dev.submit(Bio::write(64, &data)).unwrap();
    let reads = dev.count(BioKind::Read);
    assert_eq!(c.read(64 * 512, 65536).unwrap(), Reply::Ok(data.clone()));
    assert_eq!(dev.count(BioKind::Read), reads + 16, "not split at 4 KiB");
    // Writes likewise: each piece at its own sectors.
    let writes = dev.count(BioKind::Write);
    let other: Vec<u8> = data.iter().map(|b| b.wrapping_add(1)).collect();
    assert_eq!(c.write(256 * 512, &other).unwrap(), Reply::Ok(vec![]));
    assert_eq!(dev.count(BioKind::Write), writes + 16, "not split at 4 KiB");
    let mut back = vec![0u8; other.len()];
    dev.submit(Bio::read(256, &mut back)).unwrap();
    assert!(back == other, "split write landed at the wrong sectors");
    server.shutdown();
}

#[test]
fn block_status_describes_a_uniform_range_with_one_descriptor() {
    let dev = Arc::new(MemDevice::new(16 * MIB / 512));
    let (server, mut c, _dir) = serve(dev);
    // All data (serve wrote it): one descriptor for the whole 16 MiB, not pieces.
    assert_eq!(
        c.block_status(0, (16 * MIB) as u32, 0).unwrap(),
        Reply::Extents(vec![((16 * MIB) as u32, 0)])
    );
    server.shutdown();
}

/// A memory device with 4 KiB logical blocks whose block status comes in one-sector pieces
/// and runs past the range asked for: the last piece 64 sectors longer, then 64 sectors of
/// data (a device may report either).
struct Fragments(MemDevice);

impl BlockDevice for Fragments {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn limits(&self) -> Limits {
        Limits {
            logical_block_size: 4096,
            ..Limits::default()
        }
    }
    fn submit(&self, bio: Bio<'_>) -> Result<(), IoError> {
        self.0.submit(bio)
    }
    fn block_status(&self, sector: u64, sectors: u64) -> Result<Vec<Extent>, IoError> {
        let mut out = Vec::new();
        for e in self.0.block_status(sector, sectors)? {
            out.extend((0..e.sectors).map(|_| Extent {
                sectors: 1,
                kind: e.kind,
            }));
        }
        if let Some(last) = out.last_mut() {
            last.sectors += 64;
        }
        out.push(Extent {
            sectors: 64,
            kind: ExtentKind::Data,
        });
        Ok(out)
    }
}

#[test]
fn block_status_rounds_to_blocks_without_hiding_data() {
    let inner = MemDevice::new(MIB / 512);
    // 512 bytes of data inside the second 4 KiB block, the rest never written.
    inner.submit(Bio::write(9, &[7u8; 512])).unwrap();
    let (server, mut c, _dir) = export(Arc::new(Fragments(inner)));
    let hz = STATE_HOLE | STATE_ZERO;
    // The block with data is data (a client skips holes when copying); pieces merge; nothing
    // past the range is described.
    assert_eq!(
        c.block_status(0, MIB as u32, 0).unwrap(),
        Reply::Extents(vec![(4096, hz), (4096, 0), ((MIB - 8192) as u32, hz)])
    );
    assert_eq!(
        c.block_status(4096, 8192, 0).unwrap(),
        Reply::Extents(vec![(4096, 0), (4096, hz)])
    );
    assert_eq!(
        c.block_status(8192, 65536, CMD_FLAG_REQ_ONE).unwrap(),
        Reply::Extents(vec![(65536, hz)])
    );
    // REQ_ONE: the one descriptor no longer than the request (rounded down to a block).
    assert_eq!(
        c.block_status(8192, 5000, CMD_FLAG_REQ_ONE).unwrap(),
        Reply::Extents(vec![(4096, hz)])
    );
    server.shutdown();
}

/// An 8 GiB device that reads as zeroes and is one hole (nothing stored).
struct Huge;

impl BlockDevice for Huge {
    fn size(&self) -> u64 {
        16 << 20
    }
    fn submit(&self, bio: Bio<'_>) -> Result<(), IoError> {
        if let udm_io::BioOp::Read(buf) = bio.op {
            buf.fill(0);
        }
        Ok(())
    }
    fn block_status(&self, _sector: u64, sectors: u64) -> Result<Vec<Extent>, IoError> {
        Ok(vec![Extent {
            sectors,
            kind: ExtentKind::HoleZero,
        }])
    }
}

#[test]
fn block_status_of_4_gib_splits_descriptors_below_4_gib() {
    let (server, mut c, _dir) = export(Arc::new(Huge));
    let hz = STATE_HOLE | STATE_ZERO;
    // The largest length a request can carry, rounded up to the 512-byte block: 4 GiB, more
    // than one descriptor's 32 bits hold.
    assert_eq!(
        c.block_status(0, u32::MAX, 0).unwrap(),
        Reply::Extents(vec![(u32::MAX / 512 * 512, hz), (512, hz)])
    );
    server.shutdown();
}

#[test]
fn errors_without_an_nbd_meaning_reach_the_client_as_eio() {
    let dev = Arc::new(MemDevice::new(MIB / 512));
    let (server, mut c, _dir) = serve(dev.clone());
    // ENOTSUP is the reply to a FAST_ZERO that cannot be fast, and only to that.
    dev.inject(Fault::range(0, 8, Errno::EOPNOTSUPP).ops(&[BioKind::Write]));
    assert_eq!(c.write(0, &[1u8; 4096]).unwrap(), Reply::Err(NBD_EIO));
    // EOVERFLOW is for structured reads the client did not allow to be split.
    dev.inject(Fault::range(64, 72, Errno::EOVERFLOW).ops(&[BioKind::Read]));
    assert_eq!(c.read(64 * 512, 4096).unwrap(), Reply::Err(NBD_EIO));
    server.shutdown();
}

/// A memory device reporting a given logical block size.
struct Lbs(MemDevice, u32);

impl BlockDevice for Lbs {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn limits(&self) -> Limits {
        Limits {
            logical_block_size: self.1,
            ..Limits::default()
        }
    }
    fn submit(&self, bio: Bio<'_>) -> Result<(), IoError> {
        self.0.submit(bio)
    }
}

/// The smallest block advertised is the device's logical block size when NBD allows it (a
/// power of two from 512 bytes to 64 KiB), else 512; the export's size is rounded down to it.
#[test]
fn the_minimum_block_is_the_devices_when_nbd_allows_it() {
    // 17 sectors: 8704 bytes.
    for (lbs, min, size) in [
        (4096, 4096, 8192),
        (65536, 65536, 0),
        (3000, 512, 8704),
        (131072, 512, 8704),
        (256, 512, 8704),
    ] {
        let (server, c, _dir) = export(Arc::new(Lbs(MemDevice::new(17), lbs)));
        assert_eq!(c.export.size, size, "logical block size {lbs}");
        assert_eq!(
            c.export.block_size.map(|b| b.0),
            Some(min),
            "logical block size {lbs}"
        );
        assert_eq!(server.exports()[0].size_bytes, size);
        server.shutdown();
    }
}
