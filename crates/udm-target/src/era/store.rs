//! The metadata device as a persistent-data block store: block `n` is sectors `8n..8n+8`.

use std::sync::Arc;

use udm_io::{Bio, BlockDevice};
use udm_pdata::block::{self, Block};
use udm_pdata::{BlockStore, Error, Result, BLOCK_SIZE};
use udm_types::errno::HasErrno;

/// The kernel caps the metadata space map at 255 index entries of 16320 blocks
/// (`DM_SM_METADATA_MAX_BLOCKS`); the status line's total shows the cap.
pub const MAX_METADATA_BLOCKS: u64 = 255 * 16320;

const SECTORS_PER_BLOCK: u64 = (BLOCK_SIZE / 512) as u64;

/// A block device seen as 4 KiB metadata blocks.
pub struct DevStore {
    dev: Arc<dyn BlockDevice>,
}

impl DevStore {
    pub fn new(dev: Arc<dyn BlockDevice>) -> DevStore {
        DevStore { dev }
    }
}

fn io(block: u64, e: &udm_io::IoError) -> Error {
    Error::Io {
        block,
        source: std::io::Error::from_raw_os_error(e.errno().0),
    }
}

impl BlockStore for DevStore {
    fn nr_blocks(&self) -> u64 {
        (self.dev.size() / SECTORS_PER_BLOCK).min(MAX_METADATA_BLOCKS)
    }

    fn read(&self, b: u64) -> Result<Box<Block>> {
        if b >= self.nr_blocks() {
            return Err(Error::OutOfRange {
                block: b,
                nr_blocks: self.nr_blocks(),
            });
        }
        let mut data = block::zeroed();
        self.dev
            .submit(Bio::read(b * SECTORS_PER_BLOCK, &mut data[..]))
            .map_err(|e| io(b, &e))?;
        Ok(data)
    }

    fn write(&mut self, b: u64, data: &Block) -> Result<()> {
        if b >= self.nr_blocks() {
            return Err(Error::OutOfRange {
                block: b,
                nr_blocks: self.nr_blocks(),
            });
        }
        self.dev
            .submit(Bio::write(b * SECTORS_PER_BLOCK, &data[..]))
            .map_err(|e| io(b, &e))
    }

    fn flush(&mut self) -> Result<()> {
        self.dev.submit(Bio::flush()).map_err(|e| io(0, &e))
    }
}
