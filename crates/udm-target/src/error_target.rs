//! `error`: every request fails with EIO, discards included (dm-target.c `io_err`, v1.7.0).
//! With exactly two arguments they name a device and start like linear (for limits and
//! `deps`); any other arguments are ignored. Table and status output are empty.

use udm_io::{Bio, IoError};
use udm_types::Errno;

use crate::args::{self, ErrorParams, FromArgs};
use crate::target::{CtorContext, DevRef, Target, TargetCaps, TargetError, TargetType};

/// The `error` target type.
#[derive(Debug, Clone, Copy, Default)]
pub struct ErrorType;

/// An error target instance.
#[derive(Debug, Default)]
pub struct ErrorTarget {
    dev: Option<(DevRef, u64)>,
}

impl TargetType for ErrorType {
    fn name(&self) -> &'static str {
        "error"
    }

    fn version(&self) -> [u32; 3] {
        [1, 7, 0]
    }

    fn construct(
        &self,
        ctx: &mut dyn CtorContext,
        argv: &[String],
    ) -> Result<Box<dyn Target>, TargetError> {
        let dev = match ErrorParams::from_args(argv)?.dev {
            Some((path, start)) => {
                let dev = args::get_device(ctx, &path)?;
                dev.check_area(start, ctx.len())?;
                Some((dev, start))
            }
            None => None,
        };
        Ok(Box::new(ErrorTarget { dev }))
    }
}

impl Target for ErrorTarget {
    fn map(&self, bio: Bio<'_>) -> Result<(), IoError> {
        Err(IoError::errno(
            bio.kind(),
            bio.sector,
            Errno::EIO,
            "error target",
        ))
    }

    fn table_params(&self) -> String {
        String::new()
    }

    fn caps(&self) -> TargetCaps {
        TargetCaps {
            flush: false,
            discard: true,
            write_zeroes: false,
        }
    }

    fn devices(&self) -> Vec<DevRef> {
        self.dev.iter().map(|(d, _)| d.clone()).collect()
    }
}
