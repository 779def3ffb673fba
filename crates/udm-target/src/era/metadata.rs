//! dm-era's metadata operations (K dm-era-target.c `era_metadata`) on udm-pdata: format or
//! open, mark a block in the current writeset, commit, era rollover and archive, the digest of
//! archived writesets into the era array, and the metadata snapshot.

use parking_lot::RwLock;
use std::sync::Arc;
use udm_pdata::array::Array;
use udm_pdata::bitset::Bitset;
use udm_pdata::btree;
use udm_pdata::check;
use udm_pdata::era::check_roots;
use udm_pdata::era::{
    Superblock, Writeset, MAGIC, METADATA_BLOCK_SECTORS, SUPERBLOCK_LOCATION, VERSION,
    WRITESET_TREE,
};
use udm_pdata::space_map::SpaceMap;
use udm_pdata::tm::Tm;
use udm_pdata::{BlockStore, Error, Kind, Result};

/// Why the metadata could not be opened: the pdata error, or a block size that differs.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("Error reading metadata: {0}")]
    Read(#[from] Error),
    #[error("changing the data block size (from {on_disk} to {table}) is not supported")]
    BlockSize { on_disk: u32, table: u32 },
    /// The checker found damage: a structure that does not parse, or a block referenced more
    /// often than the space map counts (it could be handed out again while in use).
    #[error("Error reading metadata: {first} ({more} more problems) (EILSEQ)")]
    Damaged { first: String, more: usize },
}

impl OpenError {
    /// The errno the constructor fails with.
    pub fn errno(&self) -> i32 {
        match self {
            OpenError::Read(e) => e.errno(),
            OpenError::BlockSize { .. } => libc::EINVAL,
            OpenError::Damaged { .. } => libc::EILSEQ,
        }
    }
}

/// Runs the checker on the committed metadata. Blocks counted more often than referenced
/// (leaks) are tolerated as the kernel does; anything else refuses the load, before anything
/// is written.
fn verify(store: &dyn BlockStore, sb: &Superblock) -> std::result::Result<(), OpenError> {
    let roots = check_roots(store, sb)?;
    let report = check::check(store, &sb.sm_root, &roots);
    let on_disk = SpaceMap::open(store, &sb.sm_root)?;
    let leak = |p: &check::Problem| {
        p.structure == "space map"
            && usize::try_from(p.block)
                .ok()
                .is_some_and(|b| on_disk.counts().get(b) > report.expected.get(b))
    };
    let bad: Vec<_> = report.problems.iter().filter(|p| !leak(p)).collect();
    match bad.first() {
        None => Ok(()),
        Some(first) => Err(OpenError::Damaged {
            first: first.to_string(),
            more: bad.len() - 1,
        }),
    }
}

/// A metadata operation refused in the current state (the kernel's EINVAL messages).
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("metadata snapshot already exists")]
    SnapExists,
    #[error("no snap to drop")]
    NoSnap,
    #[error("no current writeset: the device has not been resumed")]
    NotResumed,
    /// An earlier change failed; nothing more is written until the metadata is read again.
    #[error("era metadata failed earlier ({0}); reload the table to read it again (EIO)")]
    Failed(String),
    /// The origin has 2^31 era blocks or more (K `valid_nr_blocks`).
    #[error("Invalid number of origin blocks {0}")]
    TooManyBlocks(u64),
    #[error("era metadata: {0}")]
    Pdata(#[from] Error),
}

/// An archived writeset being folded into the era array.
struct Digest {
    era: u32,
    bits: Vec<bool>,
    next: u64,
}

/// The in-core bits of the current writeset (one per origin block).
pub type Marks = Arc<RwLock<Vec<u64>>>;

/// Whether bits `first..=last` are all set in `m`.
pub fn all_set(m: &[u64], first: u64, last: u64) -> bool {
    (first..=last).all(|b| {
        m.get((b / 64) as usize)
            .is_some_and(|w| w & (1 << (b % 64)) != 0)
    })
}

/// The open metadata: the transaction, the superblock fields as the next commit writes them,
/// and the in-core copy of the current writeset (set only once its bits are committed).
pub struct Metadata {
    tm: Tm,
    sb: Superblock,
    /// Shared with the target's write path, which checks it without the metadata's lock (a
    /// write to a marked block must not wait behind a commit of other blocks' bits).
    marked: Marks,
    /// The writeset tree may hold eras not yet digested.
    archived: bool,
    /// A digest may run: set by [`Metadata::kick`] when something is archived, cleared when
    /// the tree has nothing left to digest (the kernel's `kick_off_digest`).
    kicked: bool,
    digest: Option<Digest>,
}

fn words(bits: u32) -> usize {
    (bits as usize).div_ceil(64)
}

impl Metadata {
    /// Opens the metadata on `store`; an all-zero block 0 is formatted (K `metadata_open`).
    pub fn open(
        store: Box<dyn BlockStore>,
        block_sectors: u32,
    ) -> std::result::Result<Metadata, OpenError> {
        let b0 = store.read(SUPERBLOCK_LOCATION)?;
        if b0.iter().all(|&x| x == 0) {
            return Ok(Metadata::format(store, block_sectors)?);
        }
        let sb = Superblock::parse(&b0, SUPERBLOCK_LOCATION)?;
        if sb.data_block_size != block_sectors {
            return Err(OpenError::BlockSize {
                on_disk: sb.data_block_size,
                table: block_sectors,
            });
        }
        verify(&*store, &sb)?;
        let tm = Tm::open(store, &sb.sm_root)?;
        let marked = Arc::new(RwLock::new(vec![0; words(sb.nr_blocks)]));
        Ok(Metadata {
            tm,
            sb,
            marked,
            archived: true,
            kicked: false,
            digest: None,
        })
    }

    /// A fresh format: era 0, no current writeset, empty tree and array (K `create_fresh_metadata`).
    fn format(store: Box<dyn BlockStore>, block_sectors: u32) -> Result<Metadata> {
        let mut tm = Tm::format(store);
        let loc = tm.new_block()?;
        if loc != SUPERBLOCK_LOCATION {
            return Err(Error::Order {
                what: "the era superblock must be the first block allocated",
            });
        }
        let writeset_tree_root = btree::empty(&mut tm, &WRITESET_TREE)?;
        let era_array = Array::empty(&mut tm, 4)?;
        let sb = Superblock {
            magic: MAGIC,
            version: VERSION,
            data_block_size: block_sectors,
            metadata_block_size: METADATA_BLOCK_SECTORS,
            writeset_tree_root,
            era_array_root: era_array.root,
            ..Superblock::default()
        };
        let mut md = Metadata {
            tm,
            sb,
            marked: Marks::default(),
            archived: false,
            kicked: false,
            digest: None,
        };
        md.commit()?;
        Ok(md)
    }

    /// `metadata_commit`: data blocks and space map, then the superblock (flags 0, as the kernel).
    pub fn commit(&mut self) -> Result<()> {
        self.sb.sm_root = self.tm.pre_commit()?;
        self.sb.flags = 0;
        let b = self.sb.print(SUPERBLOCK_LOCATION);
        self.tm.commit(SUPERBLOCK_LOCATION, Kind::EraSuperblock, b)
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    pub fn current_era(&self) -> u32 {
        self.sb.current_era
    }

    pub fn nr_blocks(&self) -> u32 {
        self.sb.nr_blocks
    }

    /// Held metadata snapshot (its superblock copy's block), if any.
    pub fn metadata_snap(&self) -> Option<u64> {
        (self.sb.metadata_snap != 0).then_some(self.sb.metadata_snap)
    }

    /// (used, total) metadata blocks for the status line.
    pub fn usage(&self) -> (u64, u64) {
        let sm = self.tm.space_map();
        (sm.used_as_kernel(), sm.nr_blocks())
    }

    /// Whether blocks `first..=last` are marked (committed) in the current era already.
    pub fn all_marked(&self, first: u64, last: u64) -> bool {
        all_set(&self.marked.read(), first, last)
    }

    /// The in-core copy of the current writeset, for checks without the metadata's lock:
    /// bits are set only after their commit and cleared when an era starts.
    pub fn marks(&self) -> Marks {
        self.marked.clone()
    }

    /// Marks origin blocks `first..=last` in the current era: the on-disk bits are set and
    /// committed before the in-core ones, so a write is acknowledged only once its block is
    /// durable in the writeset (K `process_deferred_bios`). Returns whether a commit was needed.
    pub fn mark(&mut self, first: u64, last: u64) -> std::result::Result<bool, OpError> {
        self.mark_many(&[(first, last)])
    }

    /// [`Metadata::mark`] for several ranges with one commit (a batch of deferred writes).
    pub fn mark_many(&mut self, ranges: &[(u64, u64)]) -> std::result::Result<bool, OpError> {
        if ranges.iter().all(|&(f, l)| self.all_marked(f, l)) {
            return Ok(false);
        }
        let ws = self.sb.current_writeset;
        if ws.root == 0 {
            return Err(OpError::NotResumed);
        }
        let mut bitset = Bitset::open(ws.root, u64::from(ws.nr_bits));
        let mut changed = false;
        for &(first, last) in ranges {
            let todo: Vec<u64> = {
                let m = self.marked.read();
                (first..=last).filter(|&b| !all_set(&m, b, b)).collect()
            };
            for b in todo {
                if !bitset.test(&self.tm, b)? {
                    bitset.set(&mut self.tm, b, true)?;
                    changed = true;
                }
            }
        }
        self.sb.current_writeset.root = bitset.root();
        if changed {
            self.commit()?;
        }
        let mut m = self.marked.write();
        for &(first, last) in ranges {
            for b in first..=last {
                if let Some(w) = m.get_mut((b / 64) as usize) {
                    *w |= 1 << (b % 64);
                }
            }
        }
        Ok(changed)
    }

    /// `metadata_resize`: the era array grows or shrinks to `nr_blocks` (new entries 0) and the
    /// in-core writeset is reallocated empty.
    pub fn resize(&mut self, nr_blocks: u32) -> Result<()> {
        let mut array = Array {
            root: self.sb.era_array_root,
            value_size: 4,
        };
        array.resize(
            &mut self.tm,
            u64::from(self.sb.nr_blocks),
            u64::from(nr_blocks),
            0,
        )?;
        self.sb.era_array_root = array.root;
        self.sb.nr_blocks = nr_blocks;
        *self.marked.write() = vec![0; words(nr_blocks)];
        self.digest = None;
        Ok(())
    }

    /// `metadata_era_archive`: the current writeset goes into the tree under the current era.
    pub fn archive(&mut self) -> Result<()> {
        let ws = self.sb.current_writeset;
        if ws.root == 0 {
            return Ok(());
        }
        self.sb.writeset_tree_root = btree::insert(
            &mut self.tm,
            self.sb.writeset_tree_root,
            u64::from(self.sb.current_era),
            &ws.print(),
            &WRITESET_TREE,
        )?;
        self.sb.current_writeset.root = 0;
        self.archived = true;
        Ok(())
    }

    /// `metadata_era_rollover`: archive, a new empty writeset of `nr_blocks` bits, next era.
    pub fn rollover(&mut self) -> Result<()> {
        self.archive()?;
        let mut bitset = Bitset::empty(&mut self.tm)?;
        bitset.resize(&mut self.tm, u64::from(self.sb.nr_blocks), false)?;
        self.sb.current_writeset = Writeset {
            nr_bits: self.sb.nr_blocks,
            root: bitset.root(),
        };
        *self.marked.write() = vec![0; words(self.sb.nr_blocks)];
        self.sb.current_era = self.sb.current_era.wrapping_add(1);
        Ok(())
    }

    /// `checkpoint`: a rollover, committed.
    pub fn checkpoint(&mut self) -> std::result::Result<(), OpError> {
        self.rollover()?;
        Ok(self.commit()?)
    }

    /// `take_metadata_snap` (K `metadata_take_snap`): rollover and commit, then a copy of the
    /// committed superblock that holds a reference on the writeset tree and the era array.
    pub fn take_snap(&mut self) -> std::result::Result<u64, OpError> {
        if self.sb.metadata_snap != 0 {
            return Err(OpError::SnapExists);
        }
        self.rollover()?;
        self.commit()?;
        self.tm.inc(SUPERBLOCK_LOCATION)?;
        let clone = self.tm.shadow(SUPERBLOCK_LOCATION, Kind::EraSuperblock)?;
        if !clone.inc_children {
            return Err(Error::Order {
                what: "superblock copy for a metadata snapshot was not shared",
            }
            .into());
        }
        self.tm
            .write(clone.location, Kind::EraSuperblock, clone.data)?;
        self.tm.inc(self.sb.writeset_tree_root)?;
        self.tm.inc(self.sb.era_array_root)?;
        self.sb.metadata_snap = clone.location;
        self.commit()?;
        Ok(clone.location)
    }

    /// `drop_metadata_snap` (K `metadata_drop_snap`): the copy's tree and array lose its
    /// references, then the copy itself.
    pub fn drop_snap(&mut self) -> std::result::Result<(), OpError> {
        let loc = self.sb.metadata_snap;
        if loc == 0 {
            return Err(OpError::NoSnap);
        }
        let clone = Superblock::parse(&*self.tm.read(loc, Kind::EraSuperblock)?, loc)?;
        self.sb.metadata_snap = 0;
        btree::delete(&mut self.tm, clone.writeset_tree_root, &WRITESET_TREE)?;
        Array {
            root: clone.era_array_root,
            value_size: 4,
        }
        .delete(&mut self.tm)?;
        self.tm.dec(loc)?;
        self.commit()?;
        Ok(())
    }

    /// Whether the digest has work: a kicked-off archived writeset not yet folded into the
    /// era array.
    pub fn digest_pending(&self) -> bool {
        (self.archived && self.kicked) || self.digest.is_some()
    }

    /// Lets the digest start if a writeset was archived. The kernel's worker does this at the
    /// start of each run (a batch of writes to unmarked blocks, a message, a status, a
    /// suspend or resume), so a writeset archived by one of them waits for the next; the digest
    /// then goes on in the background until the tree is empty.
    pub fn kick(&mut self) {
        if self.archived {
            self.kicked = true;
        }
    }

    /// One step of the background digest (K `metadata_digest_*`): up to `max_bits` bits of the
    /// lowest archived era go into the era array; a finished writeset leaves the tree (the
    /// next commit writes both). Returns whether anything was done.
    pub fn digest_step(&mut self, max_bits: u64) -> Result<bool> {
        if self.digest.is_none() {
            if !self.archived || !self.kicked {
                return Ok(false);
            }
            let entries = btree::entries(&self.tm, self.sb.writeset_tree_root, &WRITESET_TREE)?;
            let Some((key, v)) = entries.first() else {
                self.archived = false;
                self.kicked = false;
                return Ok(false);
            };
            let era = u32::try_from(*key).map_err(|_| Error::Corrupt {
                kind: Kind::BtreeNode,
                block: self.sb.writeset_tree_root,
                what: format!("writeset tree key {key} is not an era"),
            })?;
            let ws = Writeset::parse(v);
            let mut bits = Bitset::open(ws.root, u64::from(ws.nr_bits)).bits(&self.tm)?;
            bits.truncate(ws.nr_bits.min(self.sb.nr_blocks) as usize);
            self.digest = Some(Digest { era, bits, next: 0 });
        }
        let Some(d) = self.digest.as_mut() else {
            return Ok(false);
        };
        let mut array = Array {
            root: self.sb.era_array_root,
            value_size: 4,
        };
        let len = u64::from(self.sb.nr_blocks);
        let end = (d.next + max_bits).min(d.bits.len() as u64);
        for b in d.next..end {
            if d.bits[b as usize] {
                array.set(&mut self.tm, len, b, u64::from(d.era))?;
            }
        }
        d.next = end;
        self.sb.era_array_root = array.root;
        if d.next == d.bits.len() as u64 {
            let era = d.era;
            self.digest = None;
            let (root, _) = btree::remove(
                &mut self.tm,
                self.sb.writeset_tree_root,
                u64::from(era),
                &WRITESET_TREE,
            )?;
            // Not committed here: the next commit takes it (the kernel's digest commits
            // nothing either; a crash before it leaves the writeset to digest again).
            self.sb.writeset_tree_root = root;
        }
        Ok(true)
    }

    /// The era array as committed or changed so far (tests, `era_dump`-like views).
    pub fn era_array(&self) -> Result<Vec<u32>> {
        let array = Array {
            root: self.sb.era_array_root,
            value_size: 4,
        };
        Ok(array
            .values(&self.tm, u64::from(self.sb.nr_blocks))?
            .into_iter()
            .map(|v| v as u32)
            .collect())
    }

    /// Archived writesets: (era, bits).
    pub fn writesets(&self) -> Result<Vec<(u32, Vec<bool>)>> {
        btree::entries(&self.tm, self.sb.writeset_tree_root, &WRITESET_TREE)?
            .into_iter()
            .map(|(k, v)| {
                let ws = Writeset::parse(&v);
                Ok((
                    k as u32,
                    Bitset::open(ws.root, u64::from(ws.nr_bits)).bits(&self.tm)?,
                ))
            })
            .collect()
    }

    /// The current writeset's bits as on disk (None between archive and rollover).
    pub fn current_writeset(&self) -> Result<Option<Vec<bool>>> {
        let ws = self.sb.current_writeset;
        if ws.root == 0 {
            return Ok(None);
        }
        Ok(Some(
            Bitset::open(ws.root, u64::from(ws.nr_bits)).bits(&self.tm)?,
        ))
    }

    /// The era each block was last written in, as `era_dump --logical` prints it: the era
    /// array, then the archived writesets in era order, then the current writeset.
    pub fn logical_eras(&self) -> Result<Vec<u32>> {
        udm_pdata::era::logical_eras(&self.tm, &self.sb, true)
    }

    /// The transaction's store (the checker reads it).
    pub fn store(&self) -> &dyn BlockStore {
        self.tm.store()
    }
}
