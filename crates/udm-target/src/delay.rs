//! `delay <dev> <off> <ms> [<wdev> <woff> <wms> [<fdev> <foff> <fms>]]`: holds reads, writes
//! and flushes for a time, optionally sending each class to its own device (dm-delay.c,
//! v1.5.0).
//!
//! The data path is synchronous, so a held request is the submitting thread waiting on a
//! condition variable until its deadline. `presuspend` releases every held request at once
//! and lets new ones pass undelayed until `resume`, as the kernel flushes its delay list.

use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use udm_io::{Bio, BioKind, IoError};

use crate::args::{self, DelayParams, DelayStatus, FromArgs};
use crate::target::{CtorContext, DevRef, Target, TargetCaps, TargetError, TargetType};

/// The `delay` target type.
#[derive(Debug, Clone, Copy, Default)]
pub struct DelayType;

#[derive(Debug)]
struct DelayClass {
    dev: DevRef,
    start: u64,
    delay_ms: u32,
}

impl DelayClass {
    /// The class as the table prints it (the device by number).
    fn params(&self) -> args::DelayClass {
        args::DelayClass {
            dev: self.dev.id.to_string(),
            offset: self.start,
            delay_ms: self.delay_ms,
        }
    }
}

#[derive(Debug, Default)]
struct HoldState {
    may_delay: bool,
    /// Bumped by presuspend: every request waiting under an older value leaves at once.
    release_gen: u64,
    /// Requests currently held, by class (read, write, flush).
    held: [u32; 3],
}

/// A delay target instance.
#[derive(Debug)]
pub struct Delay {
    /// Read, write, flush.
    classes: [DelayClass; 3],
    argc: usize,
    state: Mutex<HoldState>,
    cv: Condvar,
}

/// Opens the device of one class (once per class, shared classes included, as the kernel).
fn class_ctr(ctx: &mut dyn CtorContext, c: &args::DelayClass) -> Result<DelayClass, TargetError> {
    let dev = args::get_device(ctx, &c.dev)?;
    dev.check_area(c.offset, ctx.len())?;
    Ok(DelayClass {
        dev,
        start: c.offset,
        delay_ms: c.delay_ms,
    })
}

impl TargetType for DelayType {
    fn name(&self) -> &'static str {
        "delay"
    }

    fn version(&self) -> [u32; 3] {
        [1, 5, 0]
    }

    fn construct(
        &self,
        ctx: &mut dyn CtorContext,
        argv: &[String],
    ) -> Result<Box<dyn Target>, TargetError> {
        let p = DelayParams::from_args(argv)?;
        let [read, write, flush] = p.classes();
        let classes = [
            class_ctr(ctx, read)?,
            class_ctr(ctx, write)?,
            class_ctr(ctx, flush)?,
        ];
        Ok(Box::new(Delay {
            classes,
            argc: argv.len(),
            state: Mutex::new(HoldState {
                may_delay: true,
                ..HoldState::default()
            }),
            cv: Condvar::new(),
        }))
    }
}

impl Delay {
    /// Holds the calling thread for the class delay unless released earlier.
    fn hold(&self, class: usize) {
        let ms = self.classes[class].delay_ms;
        if ms == 0 {
            return;
        }
        let mut st = self.state.lock();
        if !st.may_delay {
            return;
        }
        st.held[class] += 1;
        let gen = st.release_gen;
        let deadline = Instant::now() + Duration::from_millis(u64::from(ms));
        while st.release_gen == gen && Instant::now() < deadline {
            self.cv.wait_until(&mut st, deadline);
        }
        st.held[class] -= 1;
    }

    /// Requests currently held, by class (read, write, flush).
    pub fn held(&self) -> [u32; 3] {
        self.state.lock().held
    }
}

impl Target for Delay {
    fn map(&self, bio: Bio<'_>) -> Result<(), IoError> {
        let class = match bio.kind() {
            BioKind::Read => 0,
            BioKind::Flush => 2,
            BioKind::Write | BioKind::Discard | BioKind::WriteZeroes => 1,
        };
        self.hold(class);
        let c = &self.classes[class];
        if bio.is_empty_flush() {
            return c.dev.dev.submit(bio);
        }
        let sector = c.start + bio.sector;
        c.dev.dev.submit(bio.at(sector))
    }

    fn table_params(&self) -> String {
        DelayParams {
            read: self.classes[0].params(),
            write: (self.argc >= 6).then(|| self.classes[1].params()),
            flush: (self.argc >= 9).then(|| self.classes[2].params()),
        }
        .to_string()
    }

    fn status(&self) -> String {
        DelayStatus { held: self.held() }.to_string()
    }

    fn caps(&self) -> TargetCaps {
        TargetCaps {
            flush: true,
            discard: self.classes[1].dev.dev.limits().discard,
            write_zeroes: false,
        }
    }

    fn presuspend(&self) {
        let mut st = self.state.lock();
        st.may_delay = false;
        st.release_gen += 1;
        self.cv.notify_all();
    }

    fn resume(&self) {
        self.state.lock().may_delay = true;
    }

    fn devices(&self) -> Vec<DevRef> {
        self.classes.iter().map(|c| c.dev.clone()).collect()
    }

    // Block status: the trait's default, everything data. An NBD client reads ranges reported
    // as zeroes from the block status alone (hole replies), which would skip this target's
    // read delay.
}
