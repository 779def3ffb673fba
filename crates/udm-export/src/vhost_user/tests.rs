//! Tests of the virtio-blk translation and of whole requests built as descriptor chains in
//! test guest memory (no VMM needed), and of the export's socket lifecycle.

use super::backend::{BlkBackend, Mem};
use super::translate::{self, Shape, S_IOERR, S_OK, S_UNSUPP};
use super::*;
use parking_lot::Mutex;
use std::mem::offset_of;
use std::time::Instant;
use udm_io::backend::mem::{Fault, MemDevice};
use udm_io::{Bio, BioFlags, IoError, Limits};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const SECTORS: u64 = 64;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x11_0000;
const STATUS: u64 = 0x12_0000;

/// A device that remembers the flags of the last write, around a memory device.
struct Recorder {
    inner: MemDevice,
    last_flags: Mutex<BioFlags>,
}

impl BlockDevice for Recorder {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn limits(&self) -> Limits {
        self.inner.limits()
    }
    fn read_only(&self) -> bool {
        BlockDevice::read_only(&self.inner)
    }
    fn submit(&self, bio: Bio<'_>) -> Result<(), IoError> {
        *self.last_flags.lock() = bio.flags;
        self.inner.submit(bio)
    }
}

struct Guest {
    gm: GuestMemoryMmap,
    dev: Arc<Recorder>,
    backend: BlkBackend,
}

/// (address, length, device-writable) of one descriptor.
type D = (u64, u32, bool);

impl Guest {
    fn new(read_only: bool) -> Guest {
        let gm = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).expect("memory");
        let mut inner = MemDevice::new(SECTORS);
        if read_only {
            inner = inner.read_only();
        }
        let dev = Arc::new(Recorder {
            inner,
            last_flags: Mutex::new(BioFlags::empty()),
        });
        let backend = BlkBackend::new(
            dev.clone(),
            "vol",
            false,
            1,
            Mem::new(gm.clone()),
            Arc::new(Stats::default()),
        );
        Guest { gm, dev, backend }
    }

    fn header(&self, ty: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.gm.write_slice(&h, GuestAddress(HDR)).expect("header");
    }

    /// Runs one chain; returns (used length, status byte).
    fn run(&self, descs: &[D]) -> (u32, u8) {
        self.gm
            .write_slice(&[0xee], GuestAddress(STATUS))
            .expect("status");
        let q = MockSplitQueue::new(&self.gm, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(a, l, w)| {
                let f = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
                RawDescriptor::from(SplitDescriptor::new(a, l, f, 0))
            })
            .collect();
        let chain = q.build_desc_chain(&raw).expect("chain");
        let used = self.backend.process_chain(chain, &self.gm, &mut Vec::new());
        let mut s = [0u8];
        self.gm
            .read_slice(&mut s, GuestAddress(STATUS))
            .expect("status");
        (used, s[0])
    }

    /// A request with header `ty`/`sector`, the given data descriptors and a status byte.
    fn request(&self, ty: u32, sector: u64, data: &[D]) -> (u32, u8) {
        self.header(ty, sector);
        let mut d = vec![(HDR, 16, false)];
        d.extend_from_slice(data);
        d.push((STATUS, 1, true));
        self.run(&d)
    }

    fn segment(&self, sector: u64, sectors: u32, flags: u32) {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&sectors.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        self.gm
            .write_slice(&s, GuestAddress(DATA))
            .expect("segment");
    }
}

#[test]
fn write_then_read_across_descriptors() {
    let g = Guest::new(false);
    let data: Vec<u8> = (0..1024u32).map(|i| (i % 251) as u8).collect();
    g.gm.write_slice(&data, GuestAddress(DATA)).expect("data");
    // The write's data in two descriptors.
    let w = [(DATA, 512, false), (DATA + 512, 512, false)];
    assert_eq!(g.request(VIRTIO_BLK_T_OUT, 2, &w), (1, S_OK));
    assert_eq!(&g.dev.inner.contents()[1024..2048], &data[..]);
    let out = DATA + 0x1000;
    assert_eq!(
        g.request(VIRTIO_BLK_T_IN, 2, &[(out, 1024, true)]),
        (1025, S_OK)
    );
    let mut back = vec![0u8; 1024];
    g.gm.read_slice(&mut back, GuestAddress(out))
        .expect("read back");
    assert_eq!(back, data);
    assert_eq!(g.backend_stats(), (2, 0));
}

impl Guest {
    fn backend_stats(&self) -> (u64, u64) {
        let s = self.backend.stats();
        (
            s.requests.load(Ordering::Relaxed),
            s.errors.load(Ordering::Relaxed),
        )
    }
}

#[test]
fn malformed_requests_get_an_error_status_never_a_panic() {
    let g = Guest::new(false);
    // Header shorter than 16 bytes.
    g.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(g.run(&[(HDR, 8, false), (STATUS, 1, true)]), (1, S_IOERR));
    // A read whose data the device would have to read (wrong direction).
    assert_eq!(
        g.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, false)]),
        (1, S_IOERR)
    );
    // A write whose data is device-writable (wrong direction).
    assert_eq!(
        g.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, true)]),
        (1, S_IOERR)
    );
    // Data not a multiple of 512.
    assert_eq!(
        g.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 1000, false)]),
        (1, S_IOERR)
    );
    // Beyond the capacity, and a sector that overflows.
    assert_eq!(
        g.request(VIRTIO_BLK_T_IN, SECTORS - 1, &[(DATA, 1024, true)]),
        (1, S_IOERR)
    );
    assert_eq!(
        g.request(VIRTIO_BLK_T_OUT, u64::MAX, &[(DATA, 512, false)]),
        (1, S_IOERR)
    );
    // Unknown request type.
    assert_eq!(g.request(99, 0, &[]), (1, S_UNSUPP));
    // No writable byte for the status: completed with length 0.
    g.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(g.run(&[(HDR, 16, false)]).0, 0);
    // A descriptor outside guest memory.
    assert_eq!(
        g.request(VIRTIO_BLK_T_IN, 0, &[(0x40_0000, 512, true)]).0,
        0
    );
    assert_eq!(g.backend_stats(), (9, 9));
    // Nothing was written.
    assert!(g.dev.inner.contents().iter().all(|&b| b == 0));
}

#[test]
fn device_errors_become_ioerr() {
    let g = Guest::new(false);
    g.dev
        .inner
        .inject(Fault::range(0, 8, udm_types::Errno::EIO));
    assert_eq!(
        g.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, true)]),
        (1, S_IOERR)
    );
    assert_eq!(
        g.request(VIRTIO_BLK_T_IN, 8, &[(DATA, 512, true)]),
        (513, S_OK)
    );
}

#[test]
fn read_only_device_refuses_writes() {
    let g = Guest::new(true);
    assert_eq!(
        g.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, false)]),
        (1, S_IOERR)
    );
    g.segment(0, 8, 0);
    assert_eq!(
        g.request(VIRTIO_BLK_T_DISCARD, 0, &[(DATA, 16, false)]),
        (1, S_UNSUPP)
    );
    assert_eq!(g.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (1, S_OK));
    let f = g.backend.features();
    assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
}

#[test]
fn flush_get_id_discard_and_write_zeroes() {
    let g = Guest::new(false);
    assert_eq!(g.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (1, S_OK));
    assert_eq!(
        g.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, true)]),
        (21, S_OK)
    );
    let mut id = [0u8; 20];
    g.gm.read_slice(&mut id, GuestAddress(DATA)).expect("id");
    assert_eq!(&id[..4], b"vol\0");

    let ones = vec![1u8; 4096];
    g.gm.write_slice(&ones, GuestAddress(DATA + 0x1000))
        .expect("data");
    let w = [(DATA + 0x1000, 4096, false)];
    assert_eq!(g.request(VIRTIO_BLK_T_OUT, 0, &w), (1, S_OK));
    // Write zeroes over sectors 1..3 (keep allocated), then check.
    g.segment(1, 2, 0);
    let seg = [(DATA, 16, false)];
    assert_eq!(g.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &seg), (1, S_OK));
    assert!(g.dev.last_flags.lock().contains(BioFlags::NO_UNMAP));
    let c = g.dev.inner.contents();
    assert!(c[512..1536].iter().all(|&b| b == 0));
    assert!(c[1536..4096].iter().all(|&b| b == 1));
    g.segment(4, 2, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    assert_eq!(g.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &seg), (1, S_OK));
    assert!(!g.dev.last_flags.lock().contains(BioFlags::NO_UNMAP));
    g.segment(0, 8, 0);
    assert_eq!(g.request(VIRTIO_BLK_T_DISCARD, 0, &seg), (1, S_OK));

    // UNMAP on a discard and reserved flags are UNSUPP; a range past the end and a
    // truncated segment are IOERR.
    g.segment(0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    assert_eq!(g.request(VIRTIO_BLK_T_DISCARD, 0, &seg), (1, S_UNSUPP));
    g.segment(0, 8, 2);
    assert_eq!(g.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &seg), (1, S_UNSUPP));
    g.segment(SECTORS - 1, 2, 0);
    assert_eq!(g.request(VIRTIO_BLK_T_DISCARD, 0, &seg), (1, S_IOERR));
    g.segment(0, 1, 0);
    let short = [(DATA, 15, false)];
    assert_eq!(g.request(VIRTIO_BLK_T_DISCARD, 0, &short), (1, S_IOERR));
}

#[test]
fn write_through_cache_makes_writes_fua() {
    let g = Guest::new(false);
    let w = [(DATA, 512, false)];
    assert_eq!(g.request(VIRTIO_BLK_T_OUT, 0, &w), (1, S_OK));
    assert!(!g.dev.last_flags.lock().contains(BioFlags::FUA));
    // The driver turns the cache off through config space (writeback at offset 32).
    g.backend.set_config(32, &[0]).expect("set_config");
    assert_eq!(g.backend.get_config(32, 1), vec![0]);
    assert_eq!(g.request(VIRTIO_BLK_T_OUT, 0, &w), (1, S_OK));
    assert!(g.dev.last_flags.lock().contains(BioFlags::FUA));
}

#[test]
fn config_space_matches_the_virtio_layout() {
    let dev = MemDevice::new(2048);
    let shape = Shape::of(&dev, false, 4, 256);
    let c = shape.config(2048, true);
    let u32_at = |o: usize| u32::from_le_bytes([c[o], c[o + 1], c[o + 2], c[o + 3]]);
    assert_eq!(c.len(), std::mem::size_of::<virtio_blk_config>());
    let cap = offset_of!(virtio_blk_config, capacity);
    assert_eq!(&c[cap..cap + 8], &2048u64.to_le_bytes());
    assert_eq!(u32_at(offset_of!(virtio_blk_config, seg_max)), 126);
    assert_eq!(u32_at(offset_of!(virtio_blk_config, blk_size)), 512);
    assert_eq!(c[offset_of!(virtio_blk_config, physical_block_exp)], 3);
    assert_eq!(c[offset_of!(virtio_blk_config, wce)], 1);
    let nq = offset_of!(virtio_blk_config, num_queues);
    assert_eq!(&c[nq..nq + 2], &4u16.to_le_bytes());
    assert_eq!(u32_at(offset_of!(virtio_blk_config, max_discard_seg)), 32);
    assert_eq!(
        u32_at(offset_of!(virtio_blk_config, discard_sector_alignment)),
        8
    );
    assert_ne!(
        u32_at(offset_of!(virtio_blk_config, max_write_zeroes_sectors)),
        0
    );
    assert_eq!(c[offset_of!(virtio_blk_config, write_zeroes_may_unmap)], 1);

    // Windows: zero past the fields, refused past the vhost-user limit.
    assert_eq!(translate::config_window(&c, 0, 8), Some(c[..8].to_vec()));
    assert_eq!(translate::config_window(&c, 0x200, 4), Some(vec![0; 4]));
    assert_eq!(translate::config_window(&c, 0xfff, 2), None);
    assert_eq!(translate::config_window(&c, u32::MAX, 2), None);
    assert_eq!(translate::writeback_in(0, &[7; 40]), Some(true));
    assert_eq!(translate::writeback_in(32, &[0]), Some(false));
    assert_eq!(translate::writeback_in(33, &[0]), None);
    assert_eq!(translate::writeback_in(0, &[0; 8]), None);

    let f = shape.features();
    for bit in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_CONFIG_WCE,
    ] {
        assert_ne!(f & (1 << bit), 0, "feature bit {bit}");
    }
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    let no_discard = MemDevice::with_limits(
        8,
        Limits {
            discard: false,
            write_zeroes: false,
            ..Limits::default()
        },
    );
    let f = Shape::of(&no_discard, false, 1, 256).features();
    assert_eq!(
        f & (1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES),
        0
    );
}

#[test]
fn queue_completes_every_chain_in_the_used_ring() {
    let g = Guest::new(false);
    let q = MockSplitQueue::new(&g.gm, 16);
    let vring = VringRwLock::new(Mem::new(g.gm.clone()), 16).expect("vring");
    vring.set_queue_size(16);
    vring
        .set_queue_info(q.desc_table_addr().0, q.avail_addr().0, q.used_addr().0)
        .expect("queue info");
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    // Two chains: a flush and a read of one sector.
    g.header(VIRTIO_BLK_T_IN, 0);
    let mut flush = [0u8; 16];
    flush[0..4].copy_from_slice(&VIRTIO_BLK_T_FLUSH.to_le_bytes());
    g.gm.write_slice(&flush, GuestAddress(HDR + 64))
        .expect("header");
    let d = |a, l, f, n| RawDescriptor::from(SplitDescriptor::new(a, l, f, n));
    let (next, wr) = (1u16, VRING_DESC_F_WRITE as u16);
    q.add_desc_chains(
        &[
            d(HDR + 64, 16, next, 1),
            d(STATUS + 8, 1, wr, 0),
            d(HDR, 16, next, 3),
            d(DATA, 512, next | wr, 4),
            d(STATUS, 1, wr, 0),
        ],
        0,
    )
    .expect("chains");
    g.backend
        .process_queue(&vring, &mut Vec::new())
        .expect("queue");
    assert_eq!(vring.queue_used_idx().expect("used idx"), 2);
    let used = q.used_addr().0;
    let len_at = |i: u64| {
        g.gm.read_obj::<u32>(GuestAddress(used + 4 + 8 * i + 4))
            .expect("len")
    };
    assert_eq!((len_at(0), len_at(1)), (1, 513));
}

#[test]
fn export_socket_lifecycle_is_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("vol.sock");
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(SECTORS));
    let opts = VhostUserOptions {
        read_only: false,
        num_queues: 2,
    };
    assert!(matches!(
        VhostUserExport::start(
            "vol",
            &sock,
            dev.clone(),
            VhostUserOptions {
                num_queues: 0,
                ..opts
            }
        ),
        Err(VhostUserError::Queues(0))
    ));
    std::fs::write(dir.path().join("file"), b"x").expect("file");
    assert!(matches!(
        VhostUserExport::start("vol", &dir.path().join("file"), dev.clone(), opts),
        Err(VhostUserError::NotASocket(_))
    ));
    let x = VhostUserExport::start("vol", &sock, dev.clone(), opts).expect("start");
    assert!(matches!(
        VhostUserExport::start("vol", &sock, dev.clone(), opts),
        Err(VhostUserError::InUse(_))
    ));
    // A client that connects and then says nothing must not hold the stop.
    let _idle = UnixStream::connect(&sock).expect("connect");
    let t = Instant::now();
    while x.stats().clients.load(Ordering::Relaxed) == 0 && t.elapsed() < STOP_TIMEOUT {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(x.stats().clients.load(Ordering::Relaxed), 1);
    let t = Instant::now();
    assert!(x.stop());
    assert!(t.elapsed() < STOP_TIMEOUT);
    assert!(!sock.exists());
    // A stale socket file (no server) is replaced.
    let stale = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
    drop(stale);
    let x = VhostUserExport::start("vol", &sock, dev, opts).expect("restart on a stale socket");
    assert!(x.stop());
}

#[test]
fn decode_checks_ranges_at_the_exact_end() {
    let shape = Shape::of(&MemDevice::new(64), false, 1, 256);
    let hdr = |ty: u32, sector: u64| {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        Some(h)
    };
    let read = |sector, bytes| {
        let chain = translate::Chain {
            readable: 0,
            writable: bytes,
        };
        translate::decode(hdr(VIRTIO_BLK_T_IN, sector), chain, &shape, 64)
    };
    assert!(read(63, 512).is_ok());
    assert_eq!(read(63, 1024), Err(S_IOERR));
    assert_eq!(read(64, 512), Err(S_IOERR));
    assert_eq!(read(u64::MAX, 512), Err(S_IOERR));
    let seg = |sector: u64, sectors: u32, flags: u32| {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&sectors.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        s
    };
    assert!(translate::decode_range(&seg(60, 4, 0), false, 64).is_ok());
    assert_eq!(
        translate::decode_range(&seg(61, 4, 0), true, 64),
        Err(S_IOERR)
    );
    assert_eq!(
        translate::decode_range(&seg(0, 1, 4), true, 64),
        Err(S_UNSUPP)
    );
    let r = translate::decode_range(&seg(0, 1, 0), true, 64).unwrap();
    assert!(!r.unmap);
}
