//! Tests of the ublk translations and ABI layout (no driver needed).

use super::abi::*;
use super::translate::{self, Request};
use super::*;
use std::mem::{offset_of, size_of};
use udm_io::backend::mem::{Fault, MemDevice};
use udm_io::{BioKind, Limits};

#[test]
fn abi_layout_matches_the_kernel_header() {
    assert_eq!(size_of::<CtrlCmd>(), 32);
    assert_eq!(size_of::<DevInfo>(), 64);
    assert_eq!(size_of::<IoDesc>(), 24);
    assert_eq!(size_of::<IoCmd>(), 16);
    assert_eq!(size_of::<ParamBasic>(), 32);
    assert_eq!(size_of::<ParamDiscard>(), 20);
    assert_eq!(offset_of!(Params, basic), 8);
    assert_eq!(offset_of!(Params, discard), 40);
    assert_eq!(offset_of!(DevInfo, dev_id), 12);
    assert_eq!(offset_of!(DevInfo, flags), 24);
    assert_eq!(offset_of!(ParamBasic, dev_sectors), 16);
    // _IOWR('u', 0x04, 32) and _IOWR('u', 0x20, 16), as in ublk_cmd.h.
    assert_eq!(U_CMD_ADD_DEV, 0xc020_7504);
    assert_eq!(U_CMD_DEL_DEV, 0xc020_7505);
    assert_eq!(U_CMD_START_DEV, 0xc020_7506);
    assert_eq!(U_CMD_STOP_DEV, 0xc020_7507);
    assert_eq!(U_CMD_SET_PARAMS, 0xc020_7508);
    assert_eq!(U_IO_FETCH_REQ, 0xc010_7520);
    assert_eq!(U_IO_COMMIT_AND_FETCH_REQ, 0xc010_7521);
    assert_eq!(UBLK_IO_RES_ABORT, -19);
}

#[test]
fn command_payloads_are_encoded_in_place() {
    let c = CtrlCmd {
        dev_id: 7,
        queue_id: u16::MAX,
        len: 64,
        addr: 0x1122_3344_5566_7788,
        data: [42],
        ..CtrlCmd::default()
    };
    let b = c.to_cmd80();
    assert_eq!(&b[0..4], &7u32.to_ne_bytes());
    assert_eq!(&b[4..6], &[0xff, 0xff]);
    assert_eq!(&b[6..8], &64u16.to_ne_bytes());
    assert_eq!(&b[8..16], &0x1122_3344_5566_7788u64.to_ne_bytes());
    assert_eq!(&b[16..24], &42u64.to_ne_bytes());
    assert!(b[32..].iter().all(|&x| x == 0));
    let io = IoCmd {
        q_id: 2,
        tag: 5,
        result: -5,
        addr: 4096,
    }
    .to_cmd16();
    assert_eq!(&io[0..2], &2u16.to_ne_bytes());
    assert_eq!(&io[2..4], &5u16.to_ne_bytes());
    assert_eq!(&io[4..8], &(-5i32).to_ne_bytes());
    assert_eq!(&io[8..16], &4096u64.to_ne_bytes());
}

#[test]
fn parameters_follow_device_limits_and_size() {
    let d = MemDevice::new(2048);
    let p = translate::params_for(&d, false);
    assert_eq!(p.basic.dev_sectors, 2048);
    assert_eq!(p.basic.logical_bs_shift, 9);
    assert_eq!(p.basic.physical_bs_shift, 12);
    assert_eq!(p.basic.max_sectors, translate::MAX_IO_BYTES / 512);
    assert_eq!(p.basic.attrs & UBLK_ATTR_READ_ONLY, 0);
    assert_ne!(p.basic.attrs & UBLK_ATTR_VOLATILE_CACHE, 0);
    assert_eq!(p.types, UBLK_PARAM_TYPE_BASIC | UBLK_PARAM_TYPE_DISCARD);
    assert_eq!(p.discard.discard_granularity, 4096);
    assert_eq!(p.discard.max_discard_segments, 1);
    assert!(p.discard.max_write_zeroes_sectors > 0);
    assert_eq!(p.len as usize, size_of::<Params>());

    let ro = translate::params_for(&MemDevice::new(8).read_only(), false);
    assert_ne!(ro.basic.attrs & UBLK_ATTR_READ_ONLY, 0);
    let ro = translate::params_for(&MemDevice::new(8), true);
    assert_ne!(ro.basic.attrs & UBLK_ATTR_READ_ONLY, 0);

    let d4k = MemDevice::with_limits(
        64,
        Limits {
            logical_block_size: 4096,
            physical_block_size: 4096,
            max_io_sectors: 16,
            discard: false,
            write_zeroes: false,
            volatile_cache: false,
        },
    );
    let p = translate::params_for(&d4k, false);
    assert_eq!(
        (p.basic.logical_bs_shift, p.basic.physical_bs_shift),
        (12, 12)
    );
    assert_eq!(p.basic.max_sectors, 16);
    assert_eq!(p.types, UBLK_PARAM_TYPE_BASIC);
    assert_eq!(p.basic.attrs, 0);
    // Nonsense sizes fall back to sectors.
    let odd = MemDevice::with_limits(
        8,
        Limits {
            logical_block_size: 1000,
            physical_block_size: 3,
            ..Limits::default()
        },
    );
    let p = translate::params_for(&odd, false);
    assert_eq!(
        (p.basic.logical_bs_shift, p.basic.physical_bs_shift),
        (9, 9)
    );
}

fn desc(op: u8, flags: u32, sector: u64, sectors: u32) -> IoDesc {
    IoDesc {
        op_flags: u32::from(op) | flags,
        nr_sectors: sectors,
        start_sector: sector,
        addr: 0,
    }
}

#[test]
fn descriptors_decode_into_requests() {
    let buf = 4096;
    assert_eq!(
        translate::decode(&desc(UBLK_IO_OP_READ, 0, 10, 8), buf),
        Ok(Request::Read {
            sector: 10,
            sectors: 8
        })
    );
    assert_eq!(
        translate::decode(&desc(UBLK_IO_OP_WRITE, UBLK_IO_F_FUA, 3, 1), buf),
        Ok(Request::Write {
            sector: 3,
            sectors: 1,
            fua: true
        })
    );
    assert_eq!(
        translate::decode(&desc(UBLK_IO_OP_READ, 0, 0, 9), buf),
        Err(Errno::EINVAL)
    );
    assert_eq!(
        translate::decode(&desc(UBLK_IO_OP_FLUSH, 0, 0, 0), buf),
        Ok(Request::Flush)
    );
    assert_eq!(
        translate::decode(&desc(UBLK_IO_OP_DISCARD, 0, 4, 1 << 20), buf),
        Ok(Request::Discard {
            sector: 4,
            sectors: 1 << 20
        })
    );
    assert_eq!(
        translate::decode(&desc(UBLK_IO_OP_WRITE_ZEROES, UBLK_IO_F_NOUNMAP, 4, 2), buf),
        Ok(Request::WriteZeroes {
            sector: 4,
            sectors: 2,
            no_unmap: true
        })
    );
    assert_eq!(
        translate::decode(&desc(UBLK_IO_OP_WRITE_SAME, 0, 0, 1), buf),
        Err(Errno::EOPNOTSUPP)
    );
    assert_eq!(
        translate::decode(&desc(0x42, 0, 0, 1), buf),
        Err(Errno::EOPNOTSUPP)
    );
}

#[test]
fn requests_run_on_the_device_and_results_are_committed() {
    let d = MemDevice::new(64);
    let mut buf = vec![0u8; 8192];
    buf[..1024].fill(0xab);
    // Write 2 sectors at 5: result is the byte count.
    assert_eq!(
        translate::handle(&d, &desc(UBLK_IO_OP_WRITE, 0, 5, 2), &mut buf),
        1024
    );
    assert_eq!(&d.contents()[5 * 512..7 * 512], &[0xab; 1024][..]);
    let mut out = vec![0u8; 8192];
    assert_eq!(
        translate::handle(&d, &desc(UBLK_IO_OP_READ, 0, 5, 2), &mut out),
        1024
    );
    assert_eq!(&out[..1024], &[0xab; 1024][..]);
    assert_eq!(
        translate::handle(&d, &desc(UBLK_IO_OP_FLUSH, 0, 0, 0), &mut out),
        0
    );
    assert_eq!(
        translate::handle(&d, &desc(UBLK_IO_OP_WRITE_ZEROES, 0, 5, 1), &mut out),
        0
    );
    assert_eq!(&d.contents()[5 * 512..6 * 512], &[0u8; 512][..]);
    assert_eq!(
        translate::handle(&d, &desc(UBLK_IO_OP_DISCARD, 0, 6, 1), &mut out),
        0
    );
    assert_eq!(d.count(BioKind::Discard), 1);
    assert_eq!(d.count(BioKind::WriteZeroes), 1);
    assert_eq!(d.count(BioKind::Flush), 1);
}

#[test]
fn device_errors_become_negative_errnos() {
    let d = MemDevice::new(64);
    d.inject(Fault::range(10, 11, Errno::EIO));
    let mut buf = vec![0u8; 4096];
    assert_eq!(
        translate::handle(&d, &desc(UBLK_IO_OP_READ, 0, 10, 1), &mut buf),
        -libc::EIO
    );
    // Past the end: a write is ENOSPC, a read EINVAL (IoError's mapping).
    assert_eq!(
        translate::handle(&d, &desc(UBLK_IO_OP_WRITE, 0, 63, 2), &mut buf),
        -libc::ENOSPC
    );
    assert_eq!(
        translate::handle(&d, &desc(UBLK_IO_OP_READ, 0, 64, 1), &mut buf),
        -libc::EINVAL
    );
    let ro = MemDevice::new(8).read_only();
    assert_eq!(
        translate::handle(&ro, &desc(UBLK_IO_OP_WRITE, 0, 0, 1), &mut buf),
        -libc::EROFS
    );
    assert_eq!(
        translate::handle(&d, &desc(0x42, 0, 0, 1), &mut buf),
        -libc::EOPNOTSUPP
    );
    // A request larger than the buffer is refused, not truncated.
    assert_eq!(
        translate::handle(&d, &desc(UBLK_IO_OP_READ, 0, 0, 9), &mut buf),
        -libc::EINVAL
    );
}

#[test]
fn errors_have_errnos() {
    assert_eq!(UblkError::NoDriver.errno(), Errno::ENODEV);
    let e = UblkError::Control {
        cmd: "ADD_DEV",
        dev_id: 3,
        errno: Errno::EPERM,
    };
    assert_eq!(e.errno(), Errno::EPERM);
    assert!(e.to_string().contains("ADD_DEV"));
    if !Path::new(CONTROL_PATH).exists() {
        let e = UblkExport::start("t", Arc::new(MemDevice::new(8)), &UblkOptions::default())
            .err()
            .map(|e| e.errno());
        assert_eq!(e, Some(Errno::ENODEV));
    }
}

#[test]
fn sqe128_command_ring_round_trips() {
    // A URING_CMD on a file without a command handler completes with an error, which proves the
    // SQE128 ring, the command encoding and the completion path work on this kernel.
    let f = tempfile::tempfile().unwrap();
    let mut c = match Control::with_file(f) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("SKIPPED: io_uring unavailable here: {e}");
            return;
        }
    };
    let e = c.simple(U_CMD_STOP_DEV, "STOP_DEV", 0).unwrap_err();
    match e {
        UblkError::Control { cmd, errno, .. } => {
            assert_eq!(cmd, "STOP_DEV");
            assert!(
                [libc::EOPNOTSUPP, libc::EINVAL, libc::ENOTTY, libc::EBADF].contains(&errno.0),
                "{errno}"
            );
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn queue_loop_ends_when_every_fetch_is_refused() {
    // On a file that is not a ublk char device every FETCH completes with an error at once:
    // the queue thread must report ready, count them all as gone, end by itself and hand its
    // buffers back.
    let depth = 8;
    let f = tempfile::tempfile().unwrap();
    f.set_len(1 << 20).unwrap();
    let descs = queue::DescArea::map(&f, 0, depth).unwrap();
    let bufs = queue::IoBufs::new(depth, 4096).unwrap();
    let (tx, rx) = mpsc::channel();
    let queue = queue::Queue {
        cdev: Arc::new(f),
        q: 0,
        depth,
        descs,
        bufs,
        dev: Arc::new(MemDevice::new(8)),
        stop: Arc::new(AtomicBool::new(false)),
        stats: Arc::new(queue::Stats::default()),
    };
    let h = std::thread::spawn(move || queue.run(tx));
    match rx.recv_timeout(Duration::from_secs(10)).unwrap() {
        Ok(()) => {}
        Err(e) => {
            eprintln!("SKIPPED: io_uring unavailable here: {e}");
            return;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !h.is_finished() {
        assert!(Instant::now() < deadline, "queue loop did not end");
        std::thread::sleep(Duration::from_millis(10));
    }
    h.join().unwrap();
}

#[test]
fn queue_descriptor_areas_sit_at_the_drivers_per_queue_slots() {
    // ublk_drv places queue q's descriptors at q * round_up(4096 * 24, PAGE_SIZE), whatever the
    // depth: with 4 KiB pages, 98304 bytes apart.
    assert_eq!(cmd_buf_slot(4096), 98304);
    assert_eq!(cmd_buf_slot(65536), 131072);
}

#[test]
fn queue_options_are_checked() {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(8));
    for (opts, what) in [
        (
            UblkOptions {
                queues: Some(0),
                ..UblkOptions::default()
            },
            "queues",
        ),
        (
            UblkOptions {
                depth: Some(0),
                ..UblkOptions::default()
            },
            "queue depth",
        ),
        (
            UblkOptions {
                depth: Some(4097),
                ..UblkOptions::default()
            },
            "queue depth",
        ),
    ] {
        match UblkExport::start("t", dev.clone(), &opts) {
            Err(UblkError::BadOption { what: w, .. }) => assert_eq!(w, what),
            Err(e) => panic!("{opts:?}: {e}"),
            Ok(_) => panic!("{opts:?} accepted"),
        }
    }
}
