//! The virtio-blk device behind one vhost-user connection: the `VhostUserBackend` the
//! rust-vmm daemon drives (features, config space, guest memory) and the per-queue request
//! loop that turns descriptor chains into [`Bio`]s on the exported device.

use super::translate::{self, Chain, Request, Shape, HEADER_LEN, SEGMENT_LEN, S_IOERR, S_OK};
use super::Stats;
use parking_lot::Mutex;
use std::io::{self, Read, Write};
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use udm_io::{Bio, BioFlags, BlockDevice};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::VhostUserVirtioFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueT, Reader, Writer};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Entries per virtqueue.
pub(crate) const QUEUE_SIZE: u16 = 256;
/// Largest piece of a read or write staged in a queue thread's buffer: longer requests are
/// run as several bios, so a queue thread holds at most this much.
pub(crate) const CHUNK: usize = 1 << 20;

/// Guest memory as the rust-vmm crates share it.
pub(crate) type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// One connection's virtio-blk device.
pub(crate) struct BlkBackend {
    dev: Arc<dyn BlockDevice>,
    name: String,
    shape: Shape,
    mem: Mem,
    event_idx: AtomicBool,
    /// The driver's write-cache setting (CONFIG_WCE): write-through makes every write FUA.
    writeback: AtomicBool,
    /// One staging buffer per queue thread.
    buffers: Vec<Mutex<Vec<u8>>>,
    /// Queue threads inside `handle_event` (running requests); teardown waits for zero.
    active: AtomicUsize,
    stats: Arc<Stats>,
}

impl BlkBackend {
    pub(crate) fn new(
        dev: Arc<dyn BlockDevice>,
        name: &str,
        read_only: bool,
        num_queues: u16,
        mem: Mem,
        stats: Arc<Stats>,
    ) -> BlkBackend {
        let shape = Shape::of(&*dev, read_only, num_queues, QUEUE_SIZE);
        BlkBackend {
            name: name.to_string(),
            buffers: (0..shape.num_queues)
                .map(|_| Mutex::new(Vec::new()))
                .collect(),
            dev,
            shape,
            mem,
            event_idx: AtomicBool::new(false),
            writeback: AtomicBool::new(true),
            active: AtomicUsize::new(0),
            stats,
        }
    }

    /// The export's counters.
    #[cfg(test)]
    pub(crate) fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Waits up to `limit` for the queue threads to finish the requests they are running;
    /// false when one is still running (parked on a suspended device, say).
    pub(crate) fn wait_idle(&self, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        while self.active.load(Ordering::Acquire) != 0 {
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Runs every available request of `vring`, notifying the driver as it asks.
    pub(crate) fn process_queue(&self, vring: &VringRwLock, buf: &mut Vec<u8>) -> io::Result<()> {
        let mem = self.mem.memory();
        loop {
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let used = self.process_chain(chain, &mem, buf);
            vring.add_used(head, used).map_err(io::Error::other)?;
            if vring.needs_notification().map_err(io::Error::other)? {
                vring.signal_used_queue()?;
            }
        }
        Ok(())
    }

    /// Runs one request; returns the bytes written into guest memory (data and status). A
    /// chain without a writable byte for the status is completed with length 0.
    pub(crate) fn process_chain<M>(
        &self,
        chain: DescriptorChain<M>,
        mem: &GuestMemoryMmap,
        buf: &mut Vec<u8>,
    ) -> u32
    where
        M: Deref<Target = GuestMemoryMmap> + Clone,
    {
        let (mut reader, mut writer) = match (chain.clone().reader(mem), chain.writer(mem)) {
            (Ok(r), Ok(w)) => (r, w),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(export = %self.name, "vhost-user-blk: bad descriptor chain: {e}");
                self.stats.request(false);
                return 0;
            }
        };
        let Some(at) = writer.available_bytes().checked_sub(1) else {
            tracing::warn!(export = %self.name, "vhost-user-blk: request without a status byte");
            self.stats.request(false);
            return 0;
        };
        let Ok(mut status_w) = writer.split_at(at) else {
            return 0;
        };
        let mut header = [0u8; HEADER_LEN];
        let header = match reader.available_bytes() >= HEADER_LEN {
            true => reader.read_exact(&mut header).ok().map(|_| header),
            false => None,
        };
        let chain = Chain {
            readable: reader.available_bytes(),
            writable: writer.available_bytes(),
        };
        let (status, written) = match translate::decode(header, chain, &self.shape, self.dev.size())
        {
            Ok(req) => self.execute(req, &mut reader, &mut writer, buf),
            Err(s) => (s, 0),
        };
        self.stats.request(status == S_OK);
        if status_w.write_all(&[status]).is_err() {
            return written;
        }
        written.saturating_add(1)
    }

    /// Runs a decoded request; returns the status and the data bytes written to the guest.
    fn execute(
        &self,
        req: Request,
        reader: &mut Reader<'_>,
        writer: &mut Writer<'_>,
        buf: &mut Vec<u8>,
    ) -> (u8, u32) {
        let r = match req {
            Request::Read { sector, bytes } => self.read(sector, bytes, writer, buf),
            Request::Write { sector, bytes } => self.write(sector, bytes, reader, buf),
            Request::Flush => self
                .dev
                .submit(Bio::flush())
                .map(|()| 0)
                .map_err(|e| self.io_err("flush", e)),
            Request::GetId => {
                let id = translate::device_id(&self.name);
                let n = writer.available_bytes().min(id.len());
                return match writer.write_all(&id[..n]) {
                    Ok(()) => (S_OK, n as u32),
                    Err(_) => (S_IOERR, 0),
                };
            }
            Request::Ranges {
                write_zeroes,
                segments,
            } => self.ranges(write_zeroes, segments, reader),
        };
        match r {
            Ok(written) => (S_OK, written),
            Err(status) => (status, 0),
        }
    }

    fn io_err(&self, what: &str, e: impl std::fmt::Display) -> u8 {
        tracing::warn!(export = %self.name, "vhost-user-blk {what} failed: {e}");
        S_IOERR
    }

    fn read(
        &self,
        sector: u64,
        bytes: usize,
        w: &mut Writer<'_>,
        buf: &mut Vec<u8>,
    ) -> Result<u32, u8> {
        chunked(sector, bytes, buf, |s, b| {
            self.dev
                .submit(Bio::read(s, b))
                .map_err(|e| self.io_err("read", e))?;
            w.write_all(b)
                .map_err(|e| self.io_err("read (guest memory)", e))
        })?;
        self.stats
            .bytes_read
            .fetch_add(bytes as u64, Ordering::Relaxed);
        Ok(bytes as u32)
    }

    fn write(
        &self,
        sector: u64,
        bytes: usize,
        r: &mut Reader<'_>,
        buf: &mut Vec<u8>,
    ) -> Result<u32, u8> {
        let flags = match self.writeback.load(Ordering::Relaxed) {
            true => BioFlags::empty(),
            false => BioFlags::FUA,
        };
        chunked(sector, bytes, buf, |s, b| {
            r.read_exact(b)
                .map_err(|e| self.io_err("write (guest memory)", e))?;
            self.dev
                .submit(Bio::write(s, b).with_flags(flags))
                .map_err(|e| self.io_err("write", e))
        })?;
        self.stats
            .bytes_written
            .fetch_add(bytes as u64, Ordering::Relaxed);
        Ok(0)
    }

    fn ranges(&self, write_zeroes: bool, segments: usize, r: &mut Reader<'_>) -> Result<u32, u8> {
        let capacity = self.dev.size();
        let mut ranges = Vec::with_capacity(segments);
        for _ in 0..segments {
            let mut raw = [0u8; SEGMENT_LEN];
            r.read_exact(&mut raw)
                .map_err(|e| self.io_err("discard (guest memory)", e))?;
            ranges.push(translate::decode_range(&raw, write_zeroes, capacity)?);
        }
        for g in ranges {
            let bio = match (write_zeroes, g.unmap) {
                (false, _) => Bio::discard(g.sector, g.sectors),
                (true, true) => Bio::write_zeroes(g.sector, g.sectors),
                (true, false) => {
                    Bio::write_zeroes(g.sector, g.sectors).with_flags(BioFlags::NO_UNMAP)
                }
            };
            let what = if write_zeroes {
                "write-zeroes"
            } else {
                "discard"
            };
            self.dev.submit(bio).map_err(|e| self.io_err(what, e))?;
        }
        Ok(0)
    }
}

/// Runs `f` on the request's pieces of at most [`CHUNK`] bytes (first sector, staging
/// buffer); the buffer grows once and keeps its size for the next request.
fn chunked(
    sector: u64,
    bytes: usize,
    buf: &mut Vec<u8>,
    mut f: impl FnMut(u64, &mut [u8]) -> Result<(), u8>,
) -> Result<(), u8> {
    let mut done = 0;
    while done < bytes {
        let n = (bytes - done).min(CHUNK);
        if buf.len() < n {
            buf.resize(n, 0);
        }
        f(
            sector + (done as u64 >> udm_types::SECTOR_SHIFT),
            &mut buf[..n],
        )?;
        done += n;
    }
    Ok(())
}

/// Counts a queue thread in [`BlkBackend::active`] while it runs requests.
struct Active<'a>(&'a AtomicUsize);

impl<'a> Active<'a> {
    fn enter(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        Active(n)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.shape.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        self.shape.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self
            .shape
            .config(self.dev.size(), self.writeback.load(Ordering::Relaxed));
        translate::config_window(&config, offset, size).unwrap_or_default()
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        if let Some(wb) = translate::writeback_in(offset, buf) {
            self.writeback.store(wb, Ordering::Relaxed);
        }
        Ok(())
    }

    fn update_memory(&self, _mem: Mem) -> io::Result<()> {
        // The daemon updates the GuestMemoryAtomic this backend was made with.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One thread per queue: the device's submit is synchronous, queues are the concurrency.
        (0..self.shape.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(e) => {
                tracing::error!(export = %self.name, "vhost-user-blk: no exit eventfd: {e}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        // One queue per thread, so the thread's only vring is event 0.
        let (Some(vring), Some(buf)) = (
            vrings.get(usize::from(device_event)),
            self.buffers.get(thread_id),
        ) else {
            return Ok(());
        };
        let _active = Active::enter(&self.active);
        let mut buf = buf.lock();
        // An error here would end the queue thread for good: log and keep serving instead.
        let r = if self.event_idx.load(Ordering::Relaxed) {
            loop {
                if let Err(e) = vring.disable_notification() {
                    break Err(io::Error::other(e));
                }
                if let Err(e) = self.process_queue(vring, &mut buf) {
                    break Err(e);
                }
                match vring.enable_notification() {
                    Ok(true) => continue,
                    Ok(false) => break Ok(()),
                    Err(e) => break Err(io::Error::other(e)),
                }
            }
        } else {
            self.process_queue(vring, &mut buf)
        };
        if let Err(e) = r {
            tracing::warn!(export = %self.name, queue = thread_id, "vhost-user-blk queue: {e}");
        }
        Ok(())
    }
}
