//! The transaction manager (K dm-transaction-manager.c): shadowing, new blocks, reference counts,
//! and the commit order: data blocks, then the space map, flush, then the superblock, flush.

use std::collections::{HashMap, HashSet};

use crate::block::{self, Block, BlockStore, Kind};
use crate::error::{Error, Result};
use crate::space_map::{SmRoot, SpaceMap};

/// One open transaction over a store.
pub struct Tm {
    store: Box<dyn BlockStore>,
    sm: SpaceMap,
    /// Blocks written in this transaction, sealed, not yet on the store.
    dirty: HashMap<u64, Box<Block>>,
    /// Blocks allocated in this transaction: the only ones that may be written in place.
    fresh: HashSet<u64>,
    /// Set by `pre_commit`, cleared by any change: the superblock may be written only then.
    pre_committed: bool,
}

impl Tm {
    /// A new, empty space map over the whole store (a format).
    pub fn format(store: Box<dyn BlockStore>) -> Tm {
        let sm = SpaceMap::new(store.nr_blocks());
        Tm {
            store,
            sm,
            dirty: HashMap::new(),
            fresh: HashSet::new(),
            pre_committed: false,
        }
    }

    /// A transaction for reading only, with no space map read: for reading a metadata
    /// snapshot while the live metadata (and its space map) keep changing under it.
    pub fn reader(store: Box<dyn BlockStore>) -> Tm {
        Tm::format(store)
    }

    /// Opens the transaction that continues from the committed space map at `root`.
    pub fn open(store: Box<dyn BlockStore>, root: &SmRoot) -> Result<Tm> {
        let sm = SpaceMap::open(&*store, root)?;
        Ok(Tm {
            store,
            sm,
            dirty: HashMap::new(),
            fresh: HashSet::new(),
            pre_committed: false,
        })
    }

    pub fn space_map(&self) -> &SpaceMap {
        &self.sm
    }

    pub fn store(&self) -> &dyn BlockStore {
        &*self.store
    }

    /// Gives the store back (what is not committed is dropped).
    pub fn into_store(self) -> Box<dyn BlockStore> {
        self.store
    }

    /// Reads and validates a block, seeing this transaction's writes.
    pub fn read(&self, b: u64, kind: Kind) -> Result<Box<Block>> {
        if let Some(d) = self.dirty.get(&b) {
            block::validate(d, kind, b)?;
            return Ok(d.clone());
        }
        block::read_validated(&*self.store, b, kind)
    }

    /// A newly allocated block (count 1), writable in this transaction.
    pub fn new_block(&mut self) -> Result<u64> {
        let b = self.sm.alloc()?;
        self.fresh.insert(b);
        self.pre_committed = false;
        Ok(b)
    }

    /// `dm_tm_shadow_block`: a writable copy of `b`. A block already shadowed (or new) in this
    /// transaction and not shared is returned as is. Otherwise the copy goes to a new block and `b` loses one
    /// reference; `inc_children` is true when `b` was shared, so the caller must count the
    /// copy's references to its children.
    pub fn shadow(&mut self, b: u64, kind: Kind) -> Result<Shadow> {
        let data = self.read(b, kind)?;
        // A block shadowed in this transaction but shared since (a snapshot took a reference)
        // is copied again, as the kernel's `dm_tm_shadow_block` does.
        let inc_children = self.sm.count(b)? > 1;
        if self.fresh.contains(&b) && !inc_children {
            return Ok(Shadow {
                location: b,
                data,
                inc_children: false,
            });
        }
        let location = self.new_block()?;
        self.dec(b)?;
        Ok(Shadow {
            location,
            data,
            inc_children,
        })
    }

    /// Writes a block allocated in this transaction, storing its location and checksum.
    pub fn write(&mut self, b: u64, kind: Kind, mut data: Box<Block>) -> Result<()> {
        if !self.fresh.contains(&b) {
            return Err(Error::NotShadowed { block: b });
        }
        block::seal(&mut data, kind, b);
        self.dirty.insert(b, data);
        self.pre_committed = false;
        Ok(())
    }

    /// Whether `b` was allocated in this transaction (and so may be written in place).
    pub fn is_fresh(&self, b: u64) -> bool {
        self.fresh.contains(&b)
    }

    pub fn inc(&mut self, b: u64) -> Result<()> {
        self.pre_committed = false;
        self.sm.inc(b)
    }

    pub fn dec(&mut self, b: u64) -> Result<()> {
        self.pre_committed = false;
        self.sm.dec(b)?;
        if self.sm.count(b)? == 0 && self.fresh.remove(&b) {
            self.dirty.remove(&b);
        }
        Ok(())
    }

    pub fn count(&self, b: u64) -> Result<u32> {
        self.sm.count(b)
    }

    /// `dm_tm_pre_commit`: writes the data blocks and the space map, then flushes. Returns the
    /// space-map root for the superblock.
    pub fn pre_commit(&mut self) -> Result<SmRoot> {
        let mut blocks: Vec<_> = self.dirty.drain().collect();
        blocks.sort_by_key(|(b, _)| *b);
        for (b, data) in &blocks {
            self.store.write(*b, data)?;
        }
        let root = self.sm.commit(&mut *self.store)?;
        self.store.flush()?;
        self.pre_committed = true;
        Ok(root)
    }

    /// `dm_tm_commit`: writes the superblock in place at `location`, then flushes. The transaction
    /// that follows starts from what was just committed.
    pub fn commit(&mut self, location: u64, kind: Kind, mut superblock: Box<Block>) -> Result<()> {
        if !self.pre_committed {
            return Err(Error::Order {
                what: "superblock commit without a pre-commit after the last change",
            });
        }
        self.pre_committed = false;
        block::seal(&mut superblock, kind, location);
        self.store.write(location, &superblock)?;
        self.store.flush()?;
        self.fresh.clear();
        Ok(())
    }
}

/// What `Tm::shadow` returns.
pub struct Shadow {
    pub location: u64,
    pub data: Box<Block>,
    pub inc_children: bool,
}
