//! MBR and GPT partition tables, read the way Linux reads them (block/partitions/msdos.c and
//! efi.c), so a disk served by udm has the same `vda1`, `vda5`... as the kernel would give it.
//!
//! - GPT first: a protective MBR (a 0xEE entry starting at LBA 1) sends us to the header at
//!   LBA 1, whose signature, header CRC32, bounds and entries-array CRC32 are checked. Partition
//!   numbers are entry index + 1; empty entries (zero type GUID) are skipped, and so are entries
//!   outside the disk (as Linux's `is_pte_valid` does), with a warning.
//! - MBR otherwise: primary partitions 1-4, then the logical partitions of each extended
//!   partition (types 0x05, 0x0f, 0x85) numbered from 5, following the EBR chain as Linux does
//!   (at most 100 links without a data partition, garbage in EBR slots 3-4 ignored).
//! - A partition starting beyond the end of the device is skipped, one running past it is
//!   truncated, both with a warning, as `blk_add_partition` does.
//!
//! [`parse_partitions`] is pure (it reads through a callback) so fuzzers and property tests can
//! feed it anything; [`read_partitions`] runs it on a [`BlockDevice`].

use crate::bio::{Bio, BioKind};
use crate::device::BlockDevice;
use crate::error::IoError;
use udm_types::errno::HasErrno;
use udm_types::{Errno, SECTOR_SIZE};

/// Linux's `DISK_MAX_PARTS`: partition numbers stay below this.
const MAX_PARTS: u32 = 256;

/// Largest GPT entries array accepted (Linux refuses more than `KMALLOC_MAX_SIZE`).
const MAX_GPT_ENTRIES_BYTES: u64 = 4 << 20;

/// Size of a GPT partition entry (Linux accepts no other).
const GPT_ENTRY_SIZE: usize = 128;

/// MBR partition type of a GPT protective entry.
const PMBR_TYPE: u8 = 0xee;

/// A GUID in its on-disk byte order (first three fields little-endian).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// True for the all-zero GUID (an unused GPT entry).
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }
}

impl std::fmt::Display for Guid {
    /// The canonical upper-case form sfdisk prints, e.g. `0FC63DAF-8483-4772-8E79-3D69D8477DE4`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:02X}{:02X}{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-",
            b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9]
        )?;
        for x in &b[10..] {
            write!(f, "{x:02X}")?;
        }
        Ok(())
    }
}

/// What kind of table a disk carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableKind {
    /// No partition table (or one Linux would not recognise).
    None,
    /// MBR (DOS) table.
    Mbr,
    /// GUID partition table.
    Gpt,
}

/// Per-table details of one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartitionKind {
    /// An MBR partition.
    Mbr {
        /// The one-byte partition type (0x83 Linux, 0x05 extended...).
        ptype: u8,
        /// Boot indicator 0x80.
        bootable: bool,
        /// An extended-partition container (its logical partitions follow as 5+).
        extended: bool,
    },
    /// A GPT partition.
    Gpt {
        /// Partition type GUID.
        type_guid: Guid,
        /// Unique partition GUID.
        unique_guid: Guid,
        /// Partition name (UTF-16 on disk).
        name: String,
        /// Attribute bits.
        attributes: u64,
    },
}

/// One partition as Linux would register it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionInfo {
    /// Linux partition number (`vda<number>`).
    pub number: u32,
    /// First sector (512 bytes) on the disk.
    pub start: u64,
    /// Length in sectors, as the table says (truncated to the disk's end).
    pub sectors: u64,
    /// Table-specific details.
    pub kind: PartitionKind,
}

impl PartitionInfo {
    /// The length Linux exposes: an extended-partition container is only two sectors (so
    /// nothing can format it and overwrite the logical partitions); others are whole.
    pub fn exposed_sectors(&self) -> u64 {
        match self.kind {
            PartitionKind::Mbr { extended: true, .. } => self.sectors.min(2),
            _ => self.sectors,
        }
    }
}

/// A parsed table: its kind, partitions in number order, and what was skipped or truncated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionTable {
    /// Table kind.
    pub kind: TableKind,
    /// Partitions, sorted by number.
    pub partitions: Vec<PartitionInfo>,
    /// Problems Linux would log (entries beyond the disk, truncated partitions, bad backup).
    pub warnings: Vec<String>,
}

/// Why a partition table could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PartitionError {
    /// Reading the disk failed.
    #[error("reading partition table at sector {sector}: {source}")]
    Read {
        /// Sector being read.
        sector: u64,
        /// The I/O error.
        #[source]
        source: IoError,
    },
    /// A protective MBR announces a GPT, but the GPT is not valid.
    #[error("invalid GPT: {why}")]
    InvalidGpt {
        /// What is wrong.
        why: String,
    },
}

impl HasErrno for PartitionError {
    fn errno(&self) -> Errno {
        match self {
            PartitionError::Read { source, .. } => source.errno(),
            PartitionError::InvalidGpt { .. } => Errno::EINVAL,
        }
    }
}

/// The reader [`parse_partitions`] uses: fills the buffer (a whole number of sectors) from the
/// given 512-byte sector.
pub type SectorReader<'a> = &'a dyn Fn(u64, &mut [u8]) -> Result<(), IoError>;

/// Reads the partition table of a disk of `size` sectors whose logical block size is
/// `logical_block_size` bytes (GPT LBAs and MBR fields count in logical blocks).
pub fn parse_partitions(
    read: SectorReader<'_>,
    size: u64,
    logical_block_size: u32,
) -> Result<PartitionTable, PartitionError> {
    let lbs = if logical_block_size.is_power_of_two() && (512..=65536).contains(&logical_block_size)
    {
        logical_block_size as usize
    } else {
        512
    };
    let mut p = Parser {
        read,
        size,
        lbs,
        ssz: (lbs / 512) as u64,
        parts: Vec::new(),
        warnings: Vec::new(),
    };
    let kind = p.parse()?;
    let mut t = PartitionTable {
        kind,
        partitions: Vec::new(),
        warnings: std::mem::take(&mut p.warnings),
    };
    // blk_add_partition: skip what starts beyond the end, truncate what runs past it.
    for mut part in p.parts {
        if part.sectors == 0 {
            continue;
        }
        if part.start >= size {
            t.warnings.push(format!(
                "partition {} start {} is beyond the end of the disk ({size} sectors), skipped",
                part.number, part.start
            ));
            continue;
        }
        if part.sectors > size - part.start {
            t.warnings.push(format!(
                "partition {} size {} extends beyond the end of the disk, truncated",
                part.number, part.sectors
            ));
            part.sectors = size - part.start;
        }
        t.partitions.push(part);
    }
    t.partitions.sort_by_key(|p| p.number);
    Ok(t)
}

/// [`parse_partitions`] over a disk image held in memory (for fuzzers and tests).
pub fn parse_image(
    image: &[u8],
    logical_block_size: u32,
) -> Result<PartitionTable, PartitionError> {
    let size = image.len() as u64 / SECTOR_SIZE;
    let read = |sector: u64, buf: &mut [u8]| -> Result<(), IoError> {
        let start = sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|s| usize::try_from(s).ok());
        match start.and_then(|s| image.get(s..s.checked_add(buf.len())?)) {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(IoError::OutOfRange {
                op: BioKind::Read,
                sector,
                sectors: buf.len() as u64 / SECTOR_SIZE,
                size,
            }),
        }
    };
    parse_partitions(&read, size, logical_block_size)
}

/// Reads the partition table of `dev`, logging what Linux would warn about. A disk without a
/// table has no partitions.
pub fn read_partitions(dev: &dyn BlockDevice) -> Result<Vec<PartitionInfo>, PartitionError> {
    let read = |sector: u64, buf: &mut [u8]| dev.submit(Bio::read(sector, buf));
    let t = parse_partitions(&read, dev.size(), dev.limits().logical_block_size)?;
    for w in &t.warnings {
        tracing::warn!(device = %dev.describe(), "{w}");
    }
    Ok(t.partitions)
}

/// CRC-32 (IEEE 802.3, reflected), as GPT uses.
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// One 16-byte MBR partition record.
#[derive(Clone, Copy)]
struct MbrEntry {
    boot: u8,
    ptype: u8,
    start: u32,
    sectors: u32,
}

impl MbrEntry {
    fn table(sector: &[u8]) -> [MbrEntry; 4] {
        std::array::from_fn(|i| {
            let e = &sector[0x1be + 16 * i..0x1be + 16 * (i + 1)];
            MbrEntry {
                boot: e[0],
                ptype: e[4],
                start: le32(e, 8),
                sectors: le32(e, 12),
            }
        })
    }

    fn is_extended(&self) -> bool {
        matches!(self.ptype, 0x05 | 0x0f | 0x85)
    }
}

fn has_mbr_magic(sector: &[u8]) -> bool {
    sector.len() >= 512 && sector[510] == 0x55 && sector[511] == 0xaa
}

struct Parser<'a> {
    read: SectorReader<'a>,
    /// Disk size in 512-byte sectors.
    size: u64,
    /// Logical block size in bytes.
    lbs: usize,
    /// 512-byte sectors per logical block.
    ssz: u64,
    parts: Vec<PartitionInfo>,
    warnings: Vec<String>,
}

impl Parser<'_> {
    /// Reads `len` bytes from 512-byte sector `sector`; `Ok(None)` when that lies beyond the
    /// disk (Linux's `access_beyond_eod`).
    fn read_at(&self, sector: u64, len: usize) -> Result<Option<Vec<u8>>, PartitionError> {
        let sectors = (len as u64).div_ceil(SECTOR_SIZE);
        if sector >= self.size || sectors > self.size - sector {
            return Ok(None);
        }
        let mut buf = vec![0u8; (sectors * SECTOR_SIZE) as usize];
        (self.read)(sector, &mut buf).map_err(|source| PartitionError::Read { sector, source })?;
        buf.truncate(len);
        Ok(Some(buf))
    }

    fn parse(&mut self) -> Result<TableKind, PartitionError> {
        let Some(mbr) = self.read_at(0, 512)? else {
            return Ok(TableKind::None);
        };
        if !has_mbr_magic(&mbr) {
            return Ok(TableKind::None);
        }
        let entries = MbrEntry::table(&mbr);
        if entries.iter().any(|e| e.ptype == PMBR_TYPE && e.start == 1) {
            self.parse_gpt()?;
            return Ok(TableKind::Gpt);
        }
        // A boot indicator other than 0/0x80 means a FAT boot sector or garbage, not a table.
        if entries.iter().any(|e| e.boot != 0 && e.boot != 0x80) {
            return Ok(TableKind::None);
        }
        // A 0xEE entry that is not a valid protective one: Linux's msdos parser ignores the disk.
        if entries.iter().any(|e| e.ptype == PMBR_TYPE) {
            self.warnings
                .push("MBR has a GPT entry but no valid protective MBR; ignored".into());
            return Ok(TableKind::None);
        }
        let mut next = 5u32;
        for (i, e) in entries.iter().enumerate() {
            let start = u64::from(e.start) * self.ssz;
            let size = u64::from(e.sectors) * self.ssz;
            if size == 0 {
                continue;
            }
            self.parts.push(PartitionInfo {
                number: i as u32 + 1,
                start,
                sectors: size,
                kind: PartitionKind::Mbr {
                    ptype: e.ptype,
                    bootable: e.boot == 0x80,
                    extended: e.is_extended(),
                },
            });
            if e.is_extended() {
                self.parse_extended(start, size, &mut next)?;
            }
        }
        Ok(TableKind::Mbr)
    }

    /// Follows an EBR chain (Linux's `parse_extended`), numbering logical partitions from
    /// `next`.
    fn parse_extended(
        &mut self,
        first_sector: u64,
        first_size: u64,
        next: &mut u32,
    ) -> Result<(), PartitionError> {
        let mut this_sector = first_sector;
        let mut this_size = first_size;
        let mut loopct = 0;
        loop {
            loopct += 1;
            if loopct > 100 || *next >= MAX_PARTS {
                return Ok(());
            }
            let Some(ebr) = self.read_at(this_sector, 512)? else {
                self.warnings.push(format!(
                    "extended partition link to sector {this_sector} is beyond the disk, ignored"
                ));
                return Ok(());
            };
            if !has_mbr_magic(&ebr) {
                return Ok(());
            }
            let entries = MbrEntry::table(&ebr);
            for (i, e) in entries.iter().enumerate() {
                if e.sectors == 0 || e.is_extended() {
                    continue;
                }
                let offs = u64::from(e.start) * self.ssz;
                let size = u64::from(e.sectors) * self.ssz;
                let start = this_sector.saturating_add(offs);
                // Slots 3 and 4 sometimes hold garbage: take them only when they fit.
                if i >= 2
                    && (offs.saturating_add(size) > this_size
                        || start < first_sector
                        || start.saturating_add(size) > first_sector.saturating_add(first_size))
                {
                    continue;
                }
                self.parts.push(PartitionInfo {
                    number: *next,
                    start,
                    sectors: size,
                    kind: PartitionKind::Mbr {
                        ptype: e.ptype,
                        bootable: e.boot == 0x80,
                        extended: false,
                    },
                });
                loopct = 0;
                *next += 1;
                if *next >= MAX_PARTS {
                    return Ok(());
                }
            }
            let Some(link) = entries.iter().find(|e| e.sectors != 0 && e.is_extended()) else {
                return Ok(());
            };
            this_sector = first_sector.saturating_add(u64::from(link.start) * self.ssz);
            this_size = u64::from(link.sectors) * self.ssz;
        }
    }

    fn invalid(why: impl Into<String>) -> PartitionError {
        PartitionError::InvalidGpt { why: why.into() }
    }

    fn parse_gpt(&mut self) -> Result<(), PartitionError> {
        let total_lbas = self.size / self.ssz;
        if total_lbas < 2 {
            return Err(Self::invalid("disk too small for a GPT header"));
        }
        let last_lba = total_lbas - 1;
        let Some(hdr) = self.read_at(self.ssz, self.lbs)? else {
            return Err(Self::invalid("GPT header is beyond the disk"));
        };
        if &hdr[..8] != b"EFI PART" {
            return Err(Self::invalid("no \"EFI PART\" signature at LBA 1"));
        }
        let header_size = le32(&hdr, 12) as usize;
        if header_size < 92 || header_size > self.lbs {
            return Err(Self::invalid(format!(
                "header size {header_size} is outside 92..={}",
                self.lbs
            )));
        }
        let mut h = hdr[..header_size].to_vec();
        let stored_crc = le32(&h, 16);
        h[16..20].fill(0);
        let crc = crc32(&h);
        if crc != stored_crc {
            return Err(Self::invalid(format!(
                "header CRC32 is {stored_crc:#010x}, computed {crc:#010x}"
            )));
        }
        let my_lba = le64(&hdr, 24);
        if my_lba != 1 {
            return Err(Self::invalid(format!(
                "header says it is at LBA {my_lba}, not 1"
            )));
        }
        let first_usable = le64(&hdr, 40);
        let last_usable = le64(&hdr, 48);
        if first_usable > last_lba || last_usable > last_lba || last_usable < first_usable {
            return Err(Self::invalid(format!(
                "usable LBAs {first_usable}..={last_usable} do not fit a disk of {total_lbas} LBAs"
            )));
        }
        let entries_lba = le64(&hdr, 72);
        let num = le32(&hdr, 80);
        let entry_size = le32(&hdr, 84) as usize;
        if entry_size != GPT_ENTRY_SIZE {
            return Err(Self::invalid(format!(
                "partition entry size {entry_size} is not {GPT_ENTRY_SIZE}"
            )));
        }
        let array_bytes = u64::from(num) * GPT_ENTRY_SIZE as u64;
        if array_bytes > MAX_GPT_ENTRIES_BYTES {
            return Err(Self::invalid(format!(
                "{num} partition entries is too many"
            )));
        }
        let array_sector = entries_lba
            .checked_mul(self.ssz)
            .filter(|_| entries_lba <= last_lba)
            .ok_or_else(|| Self::invalid("partition entries are beyond the disk"))?;
        let array = if array_bytes == 0 {
            Vec::new()
        } else {
            self.read_at(array_sector, array_bytes as usize)?
                .ok_or_else(|| Self::invalid("partition entries run past the end of the disk"))?
        };
        let stored = le32(&hdr, 88);
        let crc = crc32(&array);
        if crc != stored {
            return Err(Self::invalid(format!(
                "partition entries CRC32 is {stored:#010x}, computed {crc:#010x}"
            )));
        }
        self.check_backup(le64(&hdr, 32), last_lba);
        for (i, e) in array.chunks_exact(GPT_ENTRY_SIZE).enumerate() {
            let number = i as u32 + 1;
            if number >= MAX_PARTS {
                break;
            }
            let mut tg = [0u8; 16];
            tg.copy_from_slice(&e[..16]);
            let type_guid = Guid(tg);
            if type_guid.is_zero() {
                continue;
            }
            let first = le64(e, 32);
            let last = le64(e, 40);
            if first > last_lba || last > last_lba {
                self.warnings.push(format!(
                    "GPT entry {number} (LBAs {first}..={last}) is beyond the disk, skipped"
                ));
                continue;
            }
            if last < first {
                self.warnings.push(format!(
                    "GPT entry {number} ends (LBA {last}) before it starts (LBA {first}), skipped"
                ));
                continue;
            }
            let mut ug = [0u8; 16];
            ug.copy_from_slice(&e[16..32]);
            let units: Vec<u16> = (0..36)
                .map(|k| le16(e, 56 + 2 * k))
                .take_while(|&u| u != 0)
                .collect();
            self.parts.push(PartitionInfo {
                number,
                start: first * self.ssz,
                sectors: (last - first + 1) * self.ssz,
                kind: PartitionKind::Gpt {
                    type_guid,
                    unique_guid: Guid(ug),
                    name: String::from_utf16_lossy(&units),
                    attributes: le64(e, 48),
                },
            });
        }
        Ok(())
    }

    /// Checks that the backup header is where the primary says and is signed; only warns (Linux
    /// uses the primary when it is good).
    fn check_backup(&mut self, alternate: u64, last_lba: u64) {
        if alternate != last_lba {
            self.warnings.push(format!(
                "GPT backup header LBA {alternate} is not the last LBA {last_lba}"
            ));
            return;
        }
        match self.read_at(alternate * self.ssz, self.lbs) {
            Ok(Some(b)) if &b[..8] == b"EFI PART" => {}
            _ => self
                .warnings
                .push(format!("GPT backup header at LBA {alternate} is missing")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_entry(sector: &mut [u8], slot: usize, boot: u8, ptype: u8, start: u32, len: u32) {
        let e = &mut sector[0x1be + 16 * slot..0x1be + 16 * (slot + 1)];
        e[0] = boot;
        e[4] = ptype;
        e[8..12].copy_from_slice(&start.to_le_bytes());
        e[12..16].copy_from_slice(&len.to_le_bytes());
    }

    fn sign(sector: &mut [u8]) {
        sector[510] = 0x55;
        sector[511] = 0xaa;
    }

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn guid_display_is_mixed_endian() {
        // Linux filesystem data, as stored on disk.
        let g = Guid([
            0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47,
            0x7d, 0xe4,
        ]);
        assert_eq!(g.to_string(), "0FC63DAF-8483-4772-8E79-3D69D8477DE4");
    }

    #[test]
    fn mbr_with_logical_chain() {
        let mut img = vec![0u8; 4096 * 512];
        let (mbr, rest) = img.split_at_mut(512);
        put_entry(mbr, 0, 0x80, 0x83, 2048, 1000);
        put_entry(mbr, 1, 0, 0x05, 3072, 1024);
        sign(mbr);
        // EBR 1 at 3072: logical at +2 of 100 sectors, link to +200.
        let ebr1 = &mut rest[(3072 - 1) * 512..3072 * 512];
        put_entry(ebr1, 0, 0, 0x83, 2, 100);
        put_entry(ebr1, 1, 0, 0x05, 200, 300);
        sign(ebr1);
        // EBR 2 at 3272, with garbage in slot 3 that does not fit.
        let ebr2 = &mut rest[(3272 - 1) * 512..3272 * 512];
        put_entry(ebr2, 0, 0, 0x82, 2, 50);
        put_entry(ebr2, 2, 0, 0x83, 1, 1 << 30);
        sign(ebr2);
        let t = parse_image(&img, 512).unwrap();
        assert_eq!(t.kind, TableKind::Mbr);
        let got: Vec<(u32, u64, u64)> = t
            .partitions
            .iter()
            .map(|p| (p.number, p.start, p.sectors))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, 2048, 1000),
                (2, 3072, 1024),
                (5, 3074, 100),
                (6, 3274, 50)
            ]
        );
        assert_eq!(t.partitions[1].exposed_sectors(), 2);
        assert!(matches!(
            t.partitions[0].kind,
            PartitionKind::Mbr {
                bootable: true,
                ptype: 0x83,
                extended: false
            }
        ));
    }

    #[test]
    fn ebr_loop_terminates_and_beyond_disk_is_handled() {
        let mut img = vec![0u8; 64 * 512];
        let (mbr, rest) = img.split_at_mut(512);
        put_entry(mbr, 0, 0, 0x05, 8, 16);
        put_entry(mbr, 1, 0, 0x83, 40, 1000);
        put_entry(mbr, 2, 0, 0x83, 100, 10);
        sign(mbr);
        // EBR pointing at itself forever.
        let ebr = &mut rest[7 * 512..8 * 512];
        put_entry(ebr, 1, 0, 0x05, 0, 16);
        sign(ebr);
        let t = parse_image(&img, 512).unwrap();
        let got: Vec<(u32, u64, u64)> = t
            .partitions
            .iter()
            .map(|p| (p.number, p.start, p.sectors))
            .collect();
        assert_eq!(got, vec![(1, 8, 16), (2, 40, 24)]);
        assert_eq!(t.warnings.len(), 2, "{:?}", t.warnings);
    }

    #[test]
    fn not_a_table() {
        assert_eq!(parse_image(&[], 512).unwrap().kind, TableKind::None);
        let mut img = vec![0u8; 8 * 512];
        assert_eq!(parse_image(&img, 512).unwrap().kind, TableKind::None);
        sign(&mut img);
        img[0x1be] = 0x12; // bad boot indicator: a FAT boot sector, say
        assert_eq!(parse_image(&img, 512).unwrap().kind, TableKind::None);
        img[0x1be] = 0;
        put_entry(&mut img, 0, 0, 0xee, 1, 7);
        // Protective MBR without a GPT header.
        let e = parse_image(&img, 512).unwrap_err();
        assert!(e.to_string().contains("EFI PART"), "{e}");
        assert_eq!(e.errno(), Errno::EINVAL);
    }
}
