//! `linear <dev> <offset>`: maps the target onto a range of one device (dm-linear.c, v1.5.0).

use udm_io::{Bio, Extent, IoError};

use crate::args::{self, FromArgs, LinearParams};
use crate::target::{CtorContext, DevRef, Target, TargetCaps, TargetError, TargetType};

/// The `linear` target type.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinearType;

/// One linear mapping: target sector `s` is device sector `start + s`.
#[derive(Debug)]
pub struct Linear {
    dev: DevRef,
    start: u64,
}

impl Linear {
    /// The underlying device.
    pub fn device(&self) -> &DevRef {
        &self.dev
    }

    /// First device sector of the mapping.
    pub fn start(&self) -> u64 {
        self.start
    }
}

impl TargetType for LinearType {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn version(&self) -> [u32; 3] {
        [1, 5, 0]
    }

    fn construct(
        &self,
        ctx: &mut dyn CtorContext,
        argv: &[String],
    ) -> Result<Box<dyn Target>, TargetError> {
        let p = LinearParams::from_args(argv)?;
        let dev = args::get_device(ctx, &p.dev)?;
        dev.check_area(p.offset, ctx.len())?;
        Ok(Box::new(Linear {
            dev,
            start: p.offset,
        }))
    }
}

impl Target for Linear {
    fn map(&self, bio: Bio<'_>) -> Result<(), IoError> {
        if bio.is_empty_flush() {
            return self.dev.dev.submit(bio);
        }
        let sector = self.start + bio.sector;
        self.dev.dev.submit(bio.at(sector))
    }

    fn table_params(&self) -> String {
        LinearParams {
            dev: self.dev.id.to_string(),
            offset: self.start,
        }
        .to_string()
    }

    fn caps(&self) -> TargetCaps {
        let l = self.dev.dev.limits();
        TargetCaps {
            flush: true,
            discard: l.discard,
            write_zeroes: l.write_zeroes,
        }
    }

    fn devices(&self) -> Vec<DevRef> {
        vec![self.dev.clone()]
    }

    fn block_status(&self, sector: u64, sectors: u64) -> Result<Vec<Extent>, IoError> {
        self.dev.dev.block_status(self.start + sector, sectors)
    }
}
