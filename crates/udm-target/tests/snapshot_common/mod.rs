//! Shared helpers for the snapshot tests: a tiny constructor context over named devices and
//! byte-level read/write helpers on targets.
#![allow(dead_code, clippy::unwrap_used)]

pub mod gate;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use udm_io::backend::mem::MemDevice;
use udm_io::{Bio, BlockDevice, IoError};
use udm_target::snapshot::origin::OriginType;
use udm_target::snapshot::snap::SnapshotType;
use udm_target::{CtorContext, DevRef, EventSink, Target, TargetEnv, TargetError, TargetType};
use udm_types::DevId;

/// Devices by name, one shared environment, an event counter.
pub struct Ctx {
    pub devs: HashMap<String, DevRef>,
    pub env: Arc<TargetEnv>,
    pub events: Arc<AtomicU64>,
    pub len: u64,
    /// The next target's first sector in its table (0 unless a test sets it).
    pub begin: u64,
    next_minor: u32,
}

impl Ctx {
    pub fn new() -> Self {
        Ctx {
            devs: HashMap::new(),
            env: Arc::new(TargetEnv::default()),
            events: Arc::new(AtomicU64::new(0)),
            len: 0,
            begin: 0,
            next_minor: 0,
        }
    }

    pub fn add(&mut self, name: &str, dev: Arc<dyn BlockDevice>) {
        self.next_minor += 16;
        let r = DevRef {
            id: DevId::new(7, self.next_minor),
            name: name.into(),
            dev,
        };
        self.devs.insert(name.into(), r);
    }

    pub fn mem(&mut self, name: &str, sectors: u64) -> Arc<MemDevice> {
        let m = Arc::new(MemDevice::new(sectors));
        self.add(name, m.clone());
        m
    }

    pub fn id(&self, name: &str) -> DevId {
        self.devs[name].id
    }

    pub fn events(&self) -> u64 {
        self.events.load(Ordering::SeqCst)
    }

    fn build(
        &mut self,
        ty: &dyn TargetType,
        len: u64,
        args: &str,
    ) -> Result<Box<dyn Target>, TargetError> {
        self.len = len;
        let args: Vec<String> = args.split_whitespace().map(String::from).collect();
        ty.construct(self, &args)
    }

    pub fn origin(&mut self, len: u64, args: &str) -> Result<Box<dyn Target>, TargetError> {
        self.build(&OriginType, len, args)
    }

    pub fn snapshot(&mut self, len: u64, args: &str) -> Result<Box<dyn Target>, TargetError> {
        self.build(&SnapshotType { merge: false }, len, args)
    }

    pub fn merge(&mut self, len: u64, args: &str) -> Result<Box<dyn Target>, TargetError> {
        self.build(&SnapshotType { merge: true }, len, args)
    }
}

impl CtorContext for Ctx {
    fn begin(&self) -> u64 {
        self.begin
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn read_only(&self) -> bool {
        false
    }
    fn get_device(&mut self, path: &str) -> Result<DevRef, TargetError> {
        self.devs
            .get(path)
            .cloned()
            .ok_or_else(|| TargetError::new(udm_types::Errno::ENODEV, format!("no device {path}")))
    }
    fn events(&self) -> EventSink {
        let e = self.events.clone();
        EventSink::new(move || {
            e.fetch_add(1, Ordering::SeqCst);
        })
    }
    fn env(&self) -> Arc<TargetEnv> {
        self.env.clone()
    }
}

pub fn write(t: &dyn Target, sector: u64, data: &[u8]) -> Result<(), IoError> {
    t.map(Bio::write(sector, data))
}

/// A flush through `t`: for an origin, every write acknowledged before it is then on the
/// origin device (write-back) and its copies committed.
pub fn flush(t: &dyn Target) -> Result<(), IoError> {
    t.map(Bio::flush())
}

pub fn read(t: &dyn Target, sector: u64, sectors: u64) -> Result<Vec<u8>, IoError> {
    let mut b = vec![0u8; (sectors * 512) as usize];
    t.map(Bio::read(sector, &mut b))?;
    Ok(b)
}

pub fn dev_write(d: &dyn BlockDevice, sector: u64, data: &[u8]) {
    d.submit(Bio::write(sector, data)).unwrap();
}

pub fn dev_read(d: &dyn BlockDevice, sector: u64, sectors: u64) -> Vec<u8> {
    let mut b = vec![0u8; (sectors * 512) as usize];
    d.submit(Bio::read(sector, &mut b)).unwrap();
    b
}

/// Deterministic pattern: every byte depends on (seed, sector, offset).
pub fn pattern(seed: u64, sector: u64, sectors: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity((sectors * 512) as usize);
    for s in sector..sector + sectors {
        for i in 0..512u64 {
            v.push((seed.wrapping_mul(31).wrapping_add(s * 7 + i / 8) & 0xff) as u8);
        }
    }
    v
}

/// Suspend/resume hooks in the order the core calls them for a fresh table.
pub fn activate(t: &dyn Target) {
    t.preresume().unwrap();
    t.resume();
}

/// Waits (10 s at most) until a merge target reports every exception merged; its status.
pub fn wait_merged(t: &dyn Target) -> String {
    for _ in 0..2000 {
        let st = t.status();
        let mut it = st.split(['/', ' ']);
        let a = it.next().unwrap_or("");
        let _ = it.next();
        let m = it.next().unwrap_or("x");
        if a == m {
            return st;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    t.status()
}

/// Merges snapshot `s` (COW `c`, chunk `chunk`) back into origin `o` of `len` sectors after
/// `org` rewrote it: the lvconvert --merge table swap, then the merge target, activated.
pub fn start_merge_of(
    c: &mut Ctx,
    org: Box<dyn Target>,
    s: &dyn Target,
    len: u64,
    chunk: u64,
) -> Box<dyn Target> {
    org.presuspend();
    org.postsuspend();
    s.presuspend();
    s.postsuspend();
    drop(org);
    let m = c.merge(len, &format!("o c P {chunk}")).unwrap();
    activate(&*m);
    m
}

/// Fast deterministic fill (xorshift), for large buffers in debug builds.
pub fn fill(seed: u64, buf: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for c in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
}

/// Panics on udm's background threads (the merge, copy, commit and wait workers), as a
/// process-wide panic hook sees them. Such a panic never reaches the test thread by itself:
/// the product catches it (the merge reports "Merge failed") or it is lost at a join, so a test
/// that demands "nothing panics" checks here. Start before the work, check after it.
pub struct PanicWatch {
    seen_before: usize,
}

static BACKGROUND_PANICS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

impl PanicWatch {
    pub fn start() -> PanicWatch {
        static HOOK: std::sync::Once = std::sync::Once::new();
        HOOK.call_once(|| {
            let default = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                let name = std::thread::current().name().unwrap_or("").to_string();
                if name == "snapshot-merge" || name.starts_with("udm-") {
                    let mut v = BACKGROUND_PANICS.lock().unwrap_or_else(|e| e.into_inner());
                    v.push(format!("thread {name}: {info}"));
                }
                default(info);
            }));
        });
        PanicWatch {
            seen_before: Self::all().len(),
        }
    }

    fn all() -> Vec<String> {
        BACKGROUND_PANICS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Fails the calling test if a background thread panicked since [`PanicWatch::start`].
    pub fn assert_none(&self) {
        let all = Self::all();
        assert!(
            all.len() == self.seen_before,
            "a background thread panicked: {:?}",
            &all[self.seen_before..]
        );
    }
}
