//! Device nodes: the entry point of every udm device (disk, partition or mapped device).
//!
//! A request sent to a device — by an export or by another mapped device's target — enters the
//! node's gate, is checked against the node's interposer hooks and is either redirected into the
//! interposing mapped device (at the same, device-relative sector) or passed to the backend. A
//! mapped device that interposes a node reaches it through a bypassing [`NodeAccess`], so its own
//! requests are never redirected back into it.

use crate::gate::{Flow, IoGate};
use crate::mapped::MappedDevice;
use arc_swap::ArcSwap;
use parking_lot::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use udm_io::{Bio, BioFlags, BioKind, BlockDevice, Extent, IoError, Limits};
use udm_types::DevId;
use udm_types::SECTOR_SIZE;

/// What a node is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeKind {
    /// A disk served from a file, block device or memory.
    Disk,
    /// A partition: a sub-range of its disk.
    Partition {
        /// The disk.
        parent: DevId,
        /// Partition number (1-based, as Linux numbers them).
        number: u32,
        /// First sector on the disk.
        start: u64,
    },
    /// A mapped device.
    Mapped,
}

/// An interposer attached to a node: `[start, end)` of the node is redirected into `md`.
#[derive(Clone)]
pub struct Hook {
    /// First sector covered (device-relative).
    pub start: u64,
    /// One past the last sector covered.
    pub end: u64,
    /// The interposing mapped device.
    pub md: Arc<MappedDevice>,
    /// The interposing mapped device's own node: a request redirected into `md` passes its
    /// gate and hooks too, so interposers stack (the kernel resubmits a redirected bio to the
    /// mapped device, where that device's own interposer sees it).
    pub node: Option<Arc<DeviceNode>>,
}

/// The entry point of one device.
pub struct DeviceNode {
    id: DevId,
    name: RwLock<String>,
    kind: NodeKind,
    backend: Arc<dyn BlockDevice>,
    gate: IoGate,
    hooks: ArcSwap<Vec<Hook>>,
}

impl DeviceNode {
    /// Wraps a backend (a disk backend, a partition slice or a mapped device).
    pub fn new(id: DevId, name: &str, kind: NodeKind, backend: Arc<dyn BlockDevice>) -> Self {
        DeviceNode {
            id,
            name: RwLock::new(name.to_string()),
            kind,
            backend,
            gate: IoGate::new(),
            hooks: ArcSwap::from_pointee(Vec::new()),
        }
    }

    /// Device number.
    pub fn id(&self) -> DevId {
        self.id
    }

    /// Current name.
    pub fn name(&self) -> String {
        self.name.read().clone()
    }

    /// Renames the node (mapped devices only).
    pub(crate) fn set_name(&self, name: &str) {
        *self.name.write() = name.to_string();
    }

    /// What the node is.
    pub fn kind(&self) -> &NodeKind {
        &self.kind
    }

    /// The backend behind the node (bypasses hooks and gate).
    pub fn backend(&self) -> &Arc<dyn BlockDevice> {
        &self.backend
    }

    /// The quiesce gate of this node.
    pub fn gate(&self) -> &IoGate {
        &self.gate
    }

    /// Interposers currently attached.
    pub fn hooks(&self) -> Arc<Vec<Hook>> {
        self.hooks.load_full()
    }

    /// Replaces the hook list. Callers quiesce the node first (close + drain the gate).
    pub(crate) fn set_hooks(&self, mut hooks: Vec<Hook>) {
        hooks.sort_by_key(|h| h.start);
        self.hooks.store(Arc::new(hooks));
    }

    /// Sends a request through the hooks: the parts inside an interposed range go to the
    /// interposer, the rest to the backend.
    /// `below` takes the parts outside every hook.
    fn route(
        &self,
        hooks: &[Hook],
        mut bio: Bio<'_>,
        below: &dyn Fn(Bio<'_>) -> Result<(), IoError>,
    ) -> Result<(), IoError> {
        if bio.is_empty_flush() {
            // A flush must cover every write completed before it, wherever it was redirected.
            for h in hooks {
                redirect(h, bio.reborrow())?;
            }
            return below(bio);
        }
        loop {
            let s = bio.sector;
            let e = bio.end();
            let hit = hooks.iter().find(|h| h.end > s && h.start < e);
            let (len, target) = match hit {
                Some(h) if h.start <= s => (h.end.min(e) - s, Some(h)),
                Some(h) => (h.start - s, None),
                None => (e - s, None),
            };
            let (head, tail) = bio.split(len);
            match target {
                Some(h) => redirect(h, head)?,
                None => below(head)?,
            }
            match tail {
                Some(t) => bio = t,
                None => return Ok(()),
            }
        }
    }
}

/// Sends a request into an interposer. The device advertised its own capabilities to its
/// clients before the interposer came; where the interposer lacks one, do what the kernel's
/// issuers do: write zero buffers for write-zeroes (unless the client asked for a fast zero) and
/// treat a discard, which is only a hint, as done rather than bypass the interposer.
fn redirect(h: &Hook, bio: Bio<'_>) -> Result<(), IoError> {
    match &h.node {
        Some(n) => n.enter_redirected(bio, &|b| into_md(h, b)),
        None => into_md(h, bio),
    }
}

impl DeviceNode {
    /// A request an interposer below redirected into this node's mapped device: through this
    /// node's gate (a switch of its hooks waits for it) and hooks, the rest into `into`.
    fn enter_redirected(
        &self,
        bio: Bio<'_>,
        into: &dyn Fn(Bio<'_>) -> Result<(), IoError>,
    ) -> Result<(), IoError> {
        let mut guard = self.gate.enter(Flow::Direct);
        let hooks = self.hooks.load();
        if hooks.is_empty() {
            return into(bio);
        }
        udm_io::device::check_range(&bio, self.size())?;
        guard.reclassify(Flow::Redirected);
        self.route(&hooks, bio, into)
    }
}

/// The last step of [`redirect`]: into the interposing mapped device itself.
fn into_md(h: &Hook, bio: Bio<'_>) -> Result<(), IoError> {
    let limits = match bio.kind() {
        BioKind::WriteZeroes | BioKind::Discard => h.md.limits(),
        _ => return h.md.submit_redirected(bio),
    };
    match bio.kind() {
        BioKind::Discard if !limits.discard => Ok(()),
        BioKind::WriteZeroes if !limits.write_zeroes => {
            if bio.flags.contains(BioFlags::FAST_ZERO) {
                return Err(IoError::Unsupported {
                    op: BioKind::WriteZeroes,
                    device: h.md.describe(),
                });
            }
            let (end, fua) = (bio.end(), bio.flags & BioFlags::FUA);
            udm_io::write_zeroes_fallback(bio.sector, bio.sectors(), |at, zeroes| {
                // The request's FUA rides on its last chunk.
                let mut w = Bio::write(at, zeroes);
                if at + zeroes.len() as u64 / SECTOR_SIZE == end {
                    w.flags = fua;
                }
                h.md.submit_redirected(w)
            })
        }
        _ => h.md.submit_redirected(bio),
    }
}

impl BlockDevice for DeviceNode {
    fn size(&self) -> u64 {
        self.backend.size()
    }

    fn limits(&self) -> Limits {
        self.backend.limits()
    }

    fn read_only(&self) -> bool {
        self.backend.read_only()
    }

    fn submit(&self, bio: Bio<'_>) -> Result<(), IoError> {
        let mut guard = self.gate.enter(Flow::Direct);
        let hooks = self.hooks.load();
        if hooks.is_empty() {
            return self.backend.submit(bio);
        }
        // The block layer refuses a request beyond the device end before any interposer sees
        // it (bio_check_eod); split among the hooks it would be executed in part.
        udm_io::device::check_range(&bio, self.size())?;
        guard.reclassify(Flow::Redirected);
        self.route(&hooks, bio, &|b| self.backend.submit(b))
    }

    fn block_status(&self, sector: u64, sectors: u64) -> Result<Vec<Extent>, IoError> {
        let _g = self.gate.enter(Flow::Direct);
        let hooks = self.hooks.load();
        match hooks
            .iter()
            .find(|h| h.end > sector && h.start < sector + sectors)
        {
            Some(h) if h.start <= sector => {
                h.md.block_status(sector, (h.end - sector).min(sectors))
            }
            Some(h) => self.backend.block_status(sector, h.start - sector),
            None => self.backend.block_status(sector, sectors),
        }
    }

    fn describe(&self) -> String {
        format!("{} ({})", self.name(), self.id)
    }
}

/// How a table reaches one of its devices: through the node (hooks apply) or, for a device the
/// table itself interposes, around them.
pub struct NodeAccess {
    node: Arc<DeviceNode>,
    bypass: AtomicBool,
    requests: AtomicU64,
}

impl NodeAccess {
    /// Access through the node's hooks.
    pub fn new(node: Arc<DeviceNode>) -> Self {
        NodeAccess {
            node,
            bypass: AtomicBool::new(false),
            requests: AtomicU64::new(0),
        }
    }

    /// Makes this access bypass the node's gate and hooks (the seed's BIO_INTERPOSED).
    pub fn set_bypass(&self, on: bool) {
        self.bypass.store(on, Ordering::SeqCst);
    }

    /// The node.
    pub fn node(&self) -> &Arc<DeviceNode> {
        &self.node
    }
}

impl BlockDevice for NodeAccess {
    fn size(&self) -> u64 {
        self.node.size()
    }
    fn limits(&self) -> Limits {
        self.node.limits()
    }
    fn read_only(&self) -> bool {
        self.node.read_only()
    }
    fn submit(&self, bio: Bio<'_>) -> Result<(), IoError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if self.bypass.load(Ordering::Relaxed) {
            self.node.backend.submit(bio)
        } else {
            self.node.submit(bio)
        }
    }
    fn block_status(&self, sector: u64, sectors: u64) -> Result<Vec<Extent>, IoError> {
        if self.bypass.load(Ordering::Relaxed) {
            self.node.backend.block_status(sector, sectors)
        } else {
            self.node.block_status(sector, sectors)
        }
    }
    fn describe(&self) -> String {
        self.node.describe()
    }
}
