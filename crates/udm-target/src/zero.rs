//! `zero`: reads return zeroes, writes and discards are dropped (dm-zero.c, v1.2.0).

use udm_io::{Bio, BioOp, Extent, ExtentKind, IoError};

use crate::args::{FromArgs, ZeroParams};
use crate::target::{CtorContext, DevRef, Target, TargetCaps, TargetError, TargetType};

/// The `zero` target type.
#[derive(Debug, Clone, Copy, Default)]
pub struct ZeroType;

/// A zero target instance.
#[derive(Debug, Clone, Copy, Default)]
pub struct Zero;

impl TargetType for ZeroType {
    fn name(&self) -> &'static str {
        "zero"
    }

    fn version(&self) -> [u32; 3] {
        [1, 2, 0]
    }

    fn construct(
        &self,
        _ctx: &mut dyn CtorContext,
        argv: &[String],
    ) -> Result<Box<dyn Target>, TargetError> {
        ZeroParams::from_args(argv)?;
        Ok(Box::new(Zero))
    }
}

impl Target for Zero {
    fn map(&self, bio: Bio<'_>) -> Result<(), IoError> {
        match bio.op {
            BioOp::Read(buf) => {
                buf.fill(0);
                Ok(())
            }
            BioOp::Write(_) | BioOp::Discard(_) | BioOp::Flush => Ok(()),
            // Never sent (no write-zeroes cap); the kernel kills other operations.
            BioOp::WriteZeroes(_) => Err(IoError::Unsupported {
                op: bio.kind(),
                device: "zero target".into(),
            }),
        }
    }

    fn table_params(&self) -> String {
        ZeroParams.to_string()
    }

    fn caps(&self) -> TargetCaps {
        TargetCaps {
            flush: false,
            discard: true,
            write_zeroes: false,
        }
    }

    fn devices(&self) -> Vec<DevRef> {
        Vec::new()
    }

    fn block_status(&self, _sector: u64, sectors: u64) -> Result<Vec<Extent>, IoError> {
        Ok(vec![Extent {
            sectors,
            kind: ExtentKind::HoleZero,
        }])
    }
}
