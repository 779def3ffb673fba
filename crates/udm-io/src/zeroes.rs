//! Write-zeroes emulated with plain writes, for issuers above a device that lacks native
//! write-zeroes (the kernel's `blkdev_issue_zeroout` falls back the same way).

use crate::IoError;
use udm_types::SECTOR_SIZE;

/// Largest zero buffer handed to one write.
const CHUNK_SECTORS: u64 = 2048;

/// Zeroes shared by every fallback, so emulating a large write-zeroes allocates nothing.
static ZEROES: [u8; (CHUNK_SECTORS * SECTOR_SIZE) as usize] =
    [0; (CHUNK_SECTORS * SECTOR_SIZE) as usize];

/// Zeroes `count` sectors from `sector` by calling `write(sector, zeroes)` over the range in
/// chunks of at most 1 MiB, in order, stopping at the first error. The caller's `write` decides
/// the path (direct, redirected, split to the device's limits) and the flags (FUA on each chunk).
pub fn write_zeroes_fallback(
    sector: u64,
    count: u64,
    mut write: impl FnMut(u64, &[u8]) -> Result<(), IoError>,
) -> Result<(), IoError> {
    let end = sector.saturating_add(count);
    let mut at = sector;
    while at < end {
        let n = (end - at).min(CHUNK_SECTORS);
        write(at, &ZEROES[..(n * SECTOR_SIZE) as usize])?;
        at += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covers_the_range_in_order_with_zeroes() {
        let mut seen = Vec::new();
        write_zeroes_fallback(10, 2 * CHUNK_SECTORS + 3, |s, b| {
            assert!(b.iter().all(|&x| x == 0));
            seen.push((s, b.len() as u64 / SECTOR_SIZE));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            vec![
                (10, CHUNK_SECTORS),
                (10 + CHUNK_SECTORS, CHUNK_SECTORS),
                (10 + 2 * CHUNK_SECTORS, 3)
            ]
        );
        write_zeroes_fallback(5, 0, |_, _| panic!("nothing to write")).unwrap();
    }

    #[test]
    fn stops_at_the_first_error() {
        let mut calls = 0;
        let r = write_zeroes_fallback(0, 3 * CHUNK_SECTORS, |_, _| {
            calls += 1;
            Err(IoError::Unsupported {
                op: crate::BioKind::Write,
                device: "test".into(),
            })
        });
        assert!(r.is_err());
        assert_eq!(calls, 1);
    }
}
