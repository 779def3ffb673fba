//! How a constructed table dispatches: splitting, target-relative sectors, flush fan-out,
//! PREFLUSH/FUA handling, unsupported operations, messages, suspend hooks, devices, limits,
//! block status, striped error accounting and concurrent use.

// Test helpers unwrap as the tests themselves may.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use udm_io::backend::mem::{Fault, MemDevice};
use udm_io::{Bio, BioFlags, BioKind, Extent, ExtentKind, IoError, Limits};
use udm_target::catalog::TargetCatalog;
use udm_target::table::{Table, TableSpec};
use udm_target::testing::TestContext;
use udm_target::{CtorContext, DevRef, Target, TargetCaps, TargetError, TargetType};
use udm_types::errno::HasErrno;
use udm_types::Errno;

const SS: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rec {
    begin: u64,
    sector: u64,
    sectors: u64,
    kind: BioKind,
    flags: BioFlags,
}

#[derive(Default)]
struct Log {
    bios: Mutex<Vec<Rec>>,
    hooks: Mutex<Vec<String>>,
}

/// `spy <max_io_len> <flush> <discard> <write_zeroes> [fail]`: records what it receives.
struct SpyType(Arc<Log>);

struct Spy {
    begin: u64,
    max_io_len: u64,
    caps: TargetCaps,
    fail_preresume: bool,
    log: Arc<Log>,
}

impl TargetType for SpyType {
    fn name(&self) -> &'static str {
        "spy"
    }
    fn version(&self) -> [u32; 3] {
        [0, 0, 1]
    }
    fn construct(
        &self,
        ctx: &mut dyn CtorContext,
        args: &[String],
    ) -> Result<Box<dyn Target>, TargetError> {
        let n = |i: usize| -> Result<u64, TargetError> {
            args.get(i)
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| TargetError::invalid("bad spy argument"))
        };
        Ok(Box::new(Spy {
            begin: ctx.begin(),
            max_io_len: n(0)?,
            caps: TargetCaps {
                flush: n(1)? == 1,
                discard: n(2)? == 1,
                write_zeroes: n(3)? == 1,
            },
            fail_preresume: args.get(4).is_some_and(|a| a == "fail"),
            log: self.0.clone(),
        }))
    }
}

impl Target for Spy {
    fn map(&self, bio: Bio<'_>) -> Result<(), IoError> {
        self.log.bios.lock().push(Rec {
            begin: self.begin,
            sector: bio.sector,
            sectors: bio.sectors(),
            kind: bio.kind(),
            flags: bio.flags,
        });
        Ok(())
    }
    fn table_params(&self) -> String {
        String::from("spy")
    }
    fn message(&self, argv: &[String]) -> Result<Option<String>, TargetError> {
        Ok(Some(format!("{}:{}", self.begin, argv.join(" "))))
    }
    fn max_io_len(&self) -> u64 {
        self.max_io_len
    }
    fn caps(&self) -> TargetCaps {
        self.caps
    }
    fn presuspend(&self) {
        self.log
            .hooks
            .lock()
            .push(format!("presuspend {}", self.begin));
    }
    fn postsuspend(&self) {
        self.log
            .hooks
            .lock()
            .push(format!("postsuspend {}", self.begin));
    }
    fn preresume(&self) -> Result<(), TargetError> {
        self.log
            .hooks
            .lock()
            .push(format!("preresume {}", self.begin));
        if self.fail_preresume {
            return Err(TargetError::new(Errno::EIO, "spy refuses"));
        }
        Ok(())
    }
    fn resume(&self) {
        self.log.hooks.lock().push(format!("resume {}", self.begin));
    }
    fn devices(&self) -> Vec<DevRef> {
        Vec::new()
    }
    fn block_status(&self, _sector: u64, sectors: u64) -> Result<Vec<Extent>, IoError> {
        // Answers only part of the range, as a device may.
        Ok(vec![Extent {
            sectors: sectors.min(3),
            kind: ExtentKind::Zero,
        }])
    }
}

fn spy_table(text: &str) -> (Table, Arc<Log>) {
    let log = Arc::new(Log::default());
    let mut reg = TargetCatalog::with_builtins();
    reg.register(Arc::new(SpyType(log.clone())));
    let mut ctx = TestContext::new();
    let t = ctx.build_with(text, &reg).unwrap();
    (t, log)
}

fn rec(begin: u64, sector: u64, sectors: u64, kind: BioKind, flags: BioFlags) -> Rec {
    Rec {
        begin,
        sector,
        sectors,
        kind,
        flags,
    }
}

fn take(log: &Log) -> Vec<Rec> {
    std::mem::take(&mut *log.bios.lock())
}

const NONE: BioFlags = BioFlags::empty();

#[test]
fn splits_at_boundaries_and_max_io_len_from_target_start() {
    let (t, log) = spy_table("0 10 spy 0 1 1 1\n10 20 spy 8 1 1 1");
    let mut buf = vec![0u8; 30 * SS];
    t.submit(Bio::read(0, &mut buf)).unwrap();
    assert_eq!(
        take(&log),
        [
            rec(0, 0, 10, BioKind::Read, NONE),
            rec(10, 0, 8, BioKind::Read, NONE),
            rec(10, 8, 8, BioKind::Read, NONE),
            rec(10, 16, 4, BioKind::Read, NONE),
        ]
    );
    let mut buf = vec![0u8; 10 * SS];
    t.submit(Bio::read(13, &mut buf)).unwrap();
    assert_eq!(
        take(&log),
        [
            rec(10, 3, 5, BioKind::Read, NONE),
            rec(10, 8, 5, BioKind::Read, NONE),
        ]
    );
    // Discards split like data by default.
    t.submit(Bio::discard(5, 20)).unwrap();
    assert_eq!(
        take(&log),
        [
            rec(0, 5, 5, BioKind::Discard, NONE),
            rec(10, 0, 8, BioKind::Discard, NONE),
            rec(10, 8, 7, BioKind::Discard, NONE),
        ]
    );
}

#[test]
fn flushes_go_to_every_flush_target_and_preflush_is_sent_first() {
    let (t, log) = spy_table("0 10 spy 0 1 0 0\n10 10 spy 0 0 0 0\n20 10 spy 0 1 0 0");
    t.submit(Bio::flush()).unwrap();
    assert_eq!(
        take(&log),
        [
            rec(0, 0, 0, BioKind::Flush, BioFlags::PREFLUSH),
            rec(20, 0, 0, BioKind::Flush, BioFlags::PREFLUSH),
        ]
    );
    let data = vec![0u8; 12 * SS];
    t.submit(Bio::write(4, &data).with_flags(BioFlags::PREFLUSH | BioFlags::FUA))
        .unwrap();
    assert_eq!(
        take(&log),
        [
            rec(0, 0, 0, BioKind::Flush, BioFlags::PREFLUSH),
            rec(20, 0, 0, BioKind::Flush, BioFlags::PREFLUSH),
            rec(0, 4, 6, BioKind::Write, BioFlags::FUA),
            rec(10, 0, 6, BioKind::Write, BioFlags::FUA),
        ]
    );
}

#[test]
fn missing_caps_give_eopnotsupp_and_other_pieces_still_run() {
    let (t, log) = spy_table("0 10 spy 0 1 0 1\n10 10 spy 0 1 1 0");
    let e = t.submit(Bio::discard(5, 10)).unwrap_err();
    assert_eq!(e.errno(), Errno::EOPNOTSUPP);
    assert_eq!(take(&log), [rec(10, 0, 5, BioKind::Discard, NONE)]);
    let e = t.submit(Bio::write_zeroes(5, 10)).unwrap_err();
    assert_eq!(e.errno(), Errno::EOPNOTSUPP);
    assert_eq!(take(&log), [rec(0, 5, 5, BioKind::WriteZeroes, NONE)]);
    assert!(!t.limits().discard && !t.limits().write_zeroes);
}

#[test]
fn bad_requests() {
    let (t, log) = spy_table("0 10 spy 0 1 1 1");
    let mut odd = vec![0u8; 100];
    let e = t.submit(Bio::read(0, &mut odd)).unwrap_err();
    assert!(matches!(e, IoError::Misaligned { .. }));
    let mut buf = vec![0u8; 2 * SS];
    assert_eq!(
        t.submit(Bio::read(9, &mut buf)).unwrap_err().errno(),
        Errno::EINVAL
    );
    assert_eq!(
        t.submit(Bio::write(9, &buf)).unwrap_err().errno(),
        Errno::ENOSPC
    );
    t.submit(Bio::read(3, &mut [])).unwrap();
    assert!(take(&log).is_empty());
    assert!(t.block_status(10, 1).is_err());
}

#[test]
fn messages_hooks_and_block_status() {
    let (t, log) = spy_table("0 10 spy 0 1 1 1\n10 10 spy 0 1 1 1 fail\n20 10 spy 0 1 1 1");
    assert_eq!(
        t.message(12, &["hello".into(), "world".into()]).unwrap(),
        Some("10:hello world".into())
    );
    assert_eq!(t.message(29, &["x".into()]).unwrap(), Some("20:x".into()));
    t.presuspend();
    t.postsuspend();
    let e = t.preresume().unwrap_err();
    assert_eq!(e.errno, Errno::EIO);
    t.resume();
    assert_eq!(
        *log.hooks.lock(),
        [
            "presuspend 0",
            "presuspend 10",
            "presuspend 20",
            "postsuspend 0",
            "postsuspend 10",
            "postsuspend 20",
            "preresume 0",
            "preresume 10",
            "resume 0",
            "resume 10",
            "resume 20",
        ]
    );
    // The spy answers 3 sectors of each query: the table goes on to the next target after a
    // complete answer (2 sectors of the first) and stops at the first short one (3 of 8).
    assert_eq!(
        t.block_status(8, 10).unwrap(),
        [Extent {
            sectors: 5,
            kind: ExtentKind::Zero
        }]
    );
    assert_eq!(
        t.block_status(0, 10).unwrap(),
        [Extent {
            sectors: 3,
            kind: ExtentKind::Zero
        }]
    );
    assert_eq!(t.target_count(), 3);
    assert_eq!(t.targets()[1].type_name, "spy");
}

#[test]
fn block_status_walks_targets_and_merges() {
    let mut ctx = TestContext::new();
    let m = ctx.add_mem("m", 64);
    m.set_latency(std::time::Duration::ZERO);
    let t = ctx
        .build("0 8 linear m 0\n8 8 zero\n16 8 linear m 8")
        .unwrap();
    t.submit(Bio::write(4, &vec![1u8; 2 * SS])).unwrap();
    assert_eq!(
        t.block_status(0, 24).unwrap(),
        [
            Extent {
                sectors: 4,
                kind: ExtentKind::HoleZero
            },
            Extent {
                sectors: 2,
                kind: ExtentKind::Data
            },
            Extent {
                sectors: 18,
                kind: ExtentKind::HoleZero
            },
        ]
    );
}

#[test]
fn devices_limits_and_spec() {
    let mut ctx = TestContext::new();
    let d0 = ctx.add_mem("d0", 256);
    ctx.add_device(
        "d1",
        Arc::new(MemDevice::with_limits(
            256,
            Limits {
                logical_block_size: 4096,
                physical_block_size: 4096,
                max_io_sectors: 128,
                discard: false,
                write_zeroes: true,
                volatile_cache: false,
            },
        )),
    );
    let text = "0 64 linear d1 0\n64 64 linear d0 0\n128 64 striped 2 8 d0 64 d1 64";
    let t = ctx.build(text).unwrap();
    let ids: Vec<String> = t.devices().iter().map(|d| d.id.to_string()).collect();
    assert_eq!(ids, ["8:16", "8:0"]);
    let l = t.limits();
    assert_eq!(l.logical_block_size, 4096);
    assert_eq!(l.physical_block_size, 4096);
    assert_eq!(l.max_io_sectors, 128);
    assert!(!l.discard && l.write_zeroes && l.volatile_cache);
    assert_eq!(
        t.spec().to_string(),
        "0 64 linear 8:16 0\n64 64 linear 8:0 0\n128 64 striped 2 8 8:0 64 8:16 64\n"
    );
    // The printed table builds again into the same table.
    let again = Table::build(
        &TableSpec::parse(&t.spec().to_string()).unwrap(),
        &TargetCatalog::with_builtins(),
        &mut ctx,
    )
    .unwrap();
    assert_eq!(again.table_lines(), t.table_lines());
    // Discard reaches linear over d0 but not over d1.
    assert_eq!(
        t.submit(Bio::discard(0, 8)).unwrap_err().errno(),
        Errno::EOPNOTSUPP
    );
    t.submit(Bio::discard(64, 8)).unwrap();
    assert_eq!(d0.count(BioKind::Discard), 1);
}

#[test]
fn striped_errors_mark_the_stripe_and_raise_events() {
    let mut ctx = TestContext::new();
    ctx.add_mem("a", 64);
    let b = ctx.add_mem("b", 64);
    let t = ctx.build("0 64 striped 2 4 a 0 b 0").unwrap();
    assert_eq!(t.status_lines()[0].params, "2 8:0 8:16 1 AA");
    b.inject(Fault::range(0, 64, Errno::EIO).ops(&[BioKind::Read]));
    let mut buf = vec![0u8; 4 * SS];
    t.submit(Bio::read(0, &mut buf)).unwrap();
    let e = t.submit(Bio::read(4, &mut buf)).unwrap_err();
    assert_eq!(e.errno(), Errno::EIO);
    assert_eq!(t.status_lines()[0].params, "2 8:0 8:16 1 AD");
    assert_eq!(ctx.events_raised(), 1);
    for _ in 0..20 {
        let _ = t.submit(Bio::read(4, &mut buf));
    }
    // Events stop at DM_IO_ERROR_THRESHOLD errors.
    assert_eq!(ctx.events_raised(), 14);
    // EOPNOTSUPP is not a stripe failure.
    b.clear_faults();
    b.inject(Fault::range(0, 64, Errno::EOPNOTSUPP));
    let _ = t.submit(Bio::read(4, &mut buf));
    assert_eq!(ctx.events_raised(), 14);
}

#[test]
fn striped_flush_reaches_every_stripe_and_write_zeroes_is_clipped() {
    let mut ctx = TestContext::new();
    let a = ctx.add_mem("a", 64);
    let b = ctx.add_mem("b", 64);
    let c = ctx.add_mem("c", 64);
    let t = ctx.build("0 96 striped 3 8 a 0 b 0 c 0").unwrap();
    t.submit(Bio::flush()).unwrap();
    for d in [&a, &b, &c] {
        assert_eq!(d.count(BioKind::Flush), 1);
    }
    t.submit(Bio::write(0, &vec![9u8; 96 * SS])).unwrap();
    // Sectors 10..30: a gets chunk-3 part 24..30 -> a 8..14; b gets 10..16 -> b 2..8;
    // c gets 16..24 -> c 0..8.
    t.submit(Bio::write_zeroes(10, 20)).unwrap();
    for d in [&a, &b, &c] {
        assert_eq!(d.count(BioKind::WriteZeroes), 1);
    }
    let zeroed = |m: &MemDevice| -> Vec<usize> {
        m.contents()
            .chunks(SS)
            .enumerate()
            .filter(|(_, s)| s.iter().all(|x| *x == 0))
            .map(|(i, _)| i)
            .filter(|i| *i < 32)
            .collect()
    };
    assert_eq!(zeroed(&a), (8..14).collect::<Vec<_>>());
    assert_eq!(zeroed(&b), (2..8).collect::<Vec<_>>());
    assert_eq!(zeroed(&c), (0..8).collect::<Vec<_>>());
}

#[test]
fn concurrent_submitters_see_their_own_data() {
    let mut ctx = TestContext::new();
    ctx.add_mem("a", 512);
    ctx.add_mem("b", 512);
    let t = Arc::new(
        ctx.build("0 512 striped 2 8 a 0 b 0\n512 256 linear a 256\n768 256 linear b 256")
            .unwrap(),
    );
    let failures = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..8u64)
        .map(|i| {
            let t = t.clone();
            let failures = failures.clone();
            std::thread::spawn(move || {
                // Each thread owns 128 sectors straddling target boundaries.
                let base = i * 128;
                for round in 0..20u8 {
                    let data = vec![(i as u8) ^ round; 128 * SS];
                    t.submit(Bio::write(base, &data)).unwrap();
                    let mut back = vec![0u8; 128 * SS];
                    t.submit(Bio::read(base, &mut back)).unwrap();
                    if back != data {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(failures.load(Ordering::Relaxed), 0);
}

#[test]
fn test_context_resolves_names_paths_numbers_and_interpose_prefix() {
    let mut ctx = TestContext::new();
    ctx.add_mem("vda", 64);
    for path in ["vda", "/dev/vda", "8:0", "[interpose]vda"] {
        let t = ctx.build(&format!("0 8 linear {path} 0")).unwrap();
        assert_eq!(t.table_lines()[0].params, "8:0 0");
    }
    assert_eq!(ctx.opened.len(), 4);
    assert_eq!(ctx.opened[3], (0, 8, "[interpose]vda".to_string()));
}
