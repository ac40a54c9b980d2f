//! Two-hop transfers through the context's pool of pinned bounce buffers, the seed's plans:
//! disk -> disk is NixlReadFlipped into a bounce buffer, then NixlWrite out of it; device ->
//! disk is a device-to-host copy into the buffer, then NixlWrite; disk -> device is
//! NixlReadFlipped into the buffer, then a host-to-device copy. Chunks alternate between the
//! two buffers of a pair, so the first hop of chunk k+1 overlaps the second hop of chunk k;
//! memory stays bounded (at most MAX_PAIRS pairs of CHUNK-byte buffers), and a job that finds
//! every pair in use waits for one.

pub(crate) mod aggregate;
mod pipeline;
mod pool;

use std::cell::RefCell;
use std::sync::Arc;

use cudarc::driver::sys::CUevent;
use nixl_sys::{Agent, XferRequest};

pub(crate) use pool::BouncePool;

use super::cuda::copy::{enqueue_copy_engine, prefers_kernel};
use super::cuda::{CudaExec, Kernel, PreparedList};
use super::nixl::NixlExec;
use super::nixl::xfer::{Xfer, direct_fd, finish, start};
use super::workers::{Spawner, Workers};
use crate::cuda::{CudaDevice, Direction, StreamGate, TableBuffer};
use crate::error::{Error, Result};
use crate::memory::{Memory, StorageKind, UseGuard};
use crate::options::{CopyMode, Mechanism, TransferStats};
use crate::plan::copy_list::{CopyList, sort_by_dst};
use crate::plan::{CopyOp, Plan, Request};
use crate::transfer::{Completion, Transfer};
use pipeline::{Feed, Order, chunks, chunks_of, pipeline};
use pool::Lease;

/// Bytes of one bounce buffer: one chunk of the pipeline. Each chunk is one NIXL request, in
/// flight one at a time per direction: larger chunks give the disk deeper queues (on the GPU
/// machine's virtio disk, 8 MiB reads ran at the speed of a raw 8 MiB pread loop, 1.7-1.9 GB/s,
/// against 2.2-2.3 for one large request; docs/BENCHMARKS.md, "GPU ↔ disk and GPU ↔ peer").
/// 32 MiB rather than 16: device to pageable memory in 4 KiB pieces ran 10% faster (each chunk
/// costs its host copy's start and the device hop's queueing once), 64 MiB no faster
/// (docs/BENCHMARKS.md, "Pageable host memory", session 7).
const CHUNK: u64 = 32 << 20;
/// The smallest chunk of a staged peer transfer: smaller requests lose more to their fixed
/// cost than overlap gains.
const PEER_CHUNK_MIN: u64 = 1 << 20;
/// Pairs of buffers at most, however many two-hop transfers run at once.
const MAX_PAIRS: usize = 2;

/// One hop of one chunk, in flight.
enum InFlight<'d> {
    /// A host copy, done when its hop returned.
    Done,
    Nixl(Option<XferRequest>),
    /// A request to a peer: its failures are the peer's (`Error::Peer`).
    Peer(Option<XferRequest>),
    /// Copies queued on `dev`'s stream, done when the event is; the copy kernel's list table
    /// goes back to the pool then.
    Cuda(&'d CudaDevice, CUevent, Option<TableBuffer>),
}

impl InFlight<'_> {
    fn wait(self, agent: Option<&Agent>) -> Result<()> {
        match self {
            InFlight::Done => Ok(()),
            InFlight::Nixl(r) => {
                let agent =
                    agent.ok_or_else(|| Error::Internal("a disk hop without NIXL".into()))?;
                finish(agent, r, Error::Io, true)
            }
            InFlight::Peer(r) => {
                let agent =
                    agent.ok_or_else(|| Error::Internal("a peer hop without NIXL".into()))?;
                finish(agent, r, Error::Peer, false)
            }
            InFlight::Cuda(dev, event, table) => {
                let waited = std::time::Instant::now();
                let r = dev.wait_recorded(event, table, "copying through the bounce buffer");
                tracing::trace!(
                    waited_us = waited.elapsed().as_micros() as u64,
                    "device hop waited for"
                );
                r
            }
        }
    }
}

/// Each piece of `chunk` packed into the buffer at `base`, as (buffer address, the piece's
/// address on the other side, length); `from_src`: the other side is the piece's source.
fn pack(chunk: &[CopyOp], base: u64, from_src: bool) -> Vec<CopyOp> {
    packed(chunk, base, from_src).collect()
}

/// As `pack`, computed as it is read.
fn packed(
    chunk: &[CopyOp],
    base: u64,
    from_src: bool,
) -> impl Iterator<Item = CopyOp> + Clone + '_ {
    chunk.iter().scan(base, move |at, c| {
        let p = CopyOp {
            src: *at,
            dst: if from_src { c.src } else { c.dst },
            len: c.len,
        };
        *at += c.len;
        Some(p)
    })
}

/// The NIXL hop between a bounce buffer and a disk: a read of the chunk's sources into the
/// buffer (`read`), or a write of the buffer to the chunk's destinations.
fn disk_hop<'d>(
    agent: &Agent,
    buf: &Arc<Memory>,
    disk: &Arc<Memory>,
    chunk: &[CopyOp],
    read: bool,
) -> Result<InFlight<'d>> {
    let mut pieces = pack(chunk, buf.regions()[0].addr, read);
    // Ascending file offsets; pieces next to each other on disk and in the buffer merge.
    sort_by_dst(&mut pieces);
    let name = agent.name();
    let t = Xfer {
        write: !read,
        local: buf,
        remote: disk,
        remote_agent: &name,
        copies: &pieces,
        notify: None,
        remote_fd: direct_fd(disk, &pieces),
    };
    Ok(InFlight::Nixl(start(agent, &t, Error::Io)?))
}

/// The NIXL hop between a bounce buffer and a peer's layout: a write of the buffer to the
/// chunk's destinations, or a read of the chunk's sources into it (`read`). The chunk is in the
/// peer side's order, so pieces next to each other there merge into one descriptor: a head
/// transform staged this way sends runs of heads instead of one descriptor per head and token.
fn peer_hop<'d>(
    agent: &Agent,
    peer: &Peer<'_>,
    buf: &Arc<Memory>,
    chunk: &[CopyOp],
    read: bool,
) -> Result<InFlight<'d>> {
    if peer.guard.revoked() {
        return Err(Error::Peer(
            "the peer revoked this layout during the transfer: nothing more is sent to it".into(),
        ));
    }
    let mut pieces: Vec<CopyOp> = Vec::with_capacity(chunk.len());
    for p in pack(chunk, buf.regions()[0].addr, read) {
        match pieces.last_mut() {
            Some(l) if l.src + l.len == p.src && l.dst + l.len == p.dst => l.len += p.len,
            _ => pieces.push(p),
        }
    }
    let t = Xfer {
        write: !read,
        local: buf,
        remote: peer.memory,
        remote_agent: peer.agent,
        copies: &pieces,
        notify: None,
        remote_fd: None,
    };
    Ok(InFlight::Peer(start(agent, &t, Error::Peer)?))
}

/// The peer end of a staged transfer: its layout's memory, its agent, and this transfer's use
/// of the layout (a revocation stops the chunks not yet sent).
struct Peer<'a> {
    memory: &'a Arc<Memory>,
    agent: &'a str,
    guard: &'a UseGuard,
}

/// A device end of a two-hop transfer: the device and its copy kernel, where it has one.
#[derive(Clone, Copy)]
struct DeviceEnd<'a> {
    dev: &'a CudaDevice,
    kernel: Option<&'a Kernel>,
    /// The transfer's copy mode: AUTO's rule per chunk, or always one mechanism.
    mode: CopyMode,
}

impl<'a> DeviceEnd<'a> {
    fn of((dev, kernel): &'a (Arc<CudaDevice>, Option<Arc<Kernel>>), mode: CopyMode) -> Self {
        Self {
            dev,
            kernel: kernel.as_deref(),
            mode,
        }
    }
}

/// The copy kernel that moves `chunk` in `direction` for `end`: AUTO's rule per chunk, or the
/// transfer's mode; `None`: the copy engines.
fn hop_kernel<'d>(
    end: DeviceEnd<'d>,
    direction: Direction,
    chunk: &[CopyOp],
) -> Option<&'d Kernel> {
    // Small pieces go to the copy kernel: on copy engines a 16 MiB chunk of 4 KiB copies took
    // milliseconds of driver time to queue and ran at ~9 GB/s, against the kernel's ~50 GB/s
    // to and from pinned memory.
    let bytes: u64 = chunk.iter().map(|c| c.len).sum();
    let n = chunk.len() as u64;
    end.kernel.filter(|k| {
        k.has_list()
            && match end.mode {
                CopyMode::Auto => prefers_kernel(direction, bytes / n.max(1), n),
                CopyMode::Kernel => true,
                CopyMode::CopyEngine => false,
            }
    })
}

/// The pieces of `chunk` seen from the device's stream, with the buffer at `base`: device ->
/// buffer (`to_buffer`) or buffer -> device.
fn hop_copies(
    chunk: &[CopyOp],
    base: u64,
    to_buffer: bool,
) -> impl Iterator<Item = CopyOp> + Clone + '_ {
    packed(chunk, base, to_buffer).map(move |c| if to_buffer { c.flipped() } else { c })
}

fn hop_direction(to_buffer: bool) -> Direction {
    if to_buffer {
        Direction::DeviceToHost
    } else {
        Direction::HostToDevice
    }
}

/// The kernel table of a device hop, written ahead of the hop (while a host hop runs);
/// `None` where the hop takes the copy engines or the table could not be had (the hop then
/// writes its own and reports what fails).
fn prepare_hop<'d>(
    end: DeviceEnd<'d>,
    buf: &Arc<Memory>,
    chunk: &[CopyOp],
    to_buffer: bool,
) -> Option<PreparedList<'d>> {
    let k = hop_kernel(end, hop_direction(to_buffer), chunk)?;
    end.dev.bind().ok()?;
    k.prepare_list(end.dev, hop_copies(chunk, buf.regions()[0].addr, to_buffer))
        .ok()
}

/// The CUDA hop between a bounce buffer and device memory, on the device's stream for that
/// direction: device -> buffer (`to_buffer`) or buffer -> device; `ahead`: its kernel table,
/// written before (`prepare_hop`).
fn device_hop<'d>(
    end: DeviceEnd<'d>,
    buf: &Arc<Memory>,
    chunk: &[CopyOp],
    to_buffer: bool,
    ahead: Option<PreparedList<'d>>,
) -> Result<InFlight<'d>> {
    let dev = end.dev;
    let started = std::time::Instant::now();
    let direction = hop_direction(to_buffer);
    let copies = hop_copies(chunk, buf.regions()[0].addr, to_buffer);
    dev.bind()?;
    let stream = dev.stream(direction);
    let was_ahead = ahead.is_some();
    let table = match hop_kernel(end, direction, chunk) {
        Some(k) => {
            let prepared = match ahead {
                Some(p) => p,
                None => k.prepare_list(dev, copies)?,
            };
            // SAFETY: the stream belongs to `dev`; the device ranges were validated with the
            // request, the buffer is CUDA-pinned and holds the chunk; the caller keeps every
            // memory alive until this hop is waited for.
            Some(unsafe { k.launch_list(stream, prepared, k.ctas(direction)) }?.0)
        }
        None => {
            let copies: Vec<CopyOp> = copies.collect();
            // SAFETY: as above.
            unsafe { enqueue_copy_engine(dev, stream, direction, &copies) }
                .inspect_err(|_| dev.abandon(stream, None))?;
            None
        }
    };
    let (event, table) = dev.record_or_abandon(stream, table)?;
    tracing::trace!(
        copies = chunk.len(),
        table_ahead = was_ahead,
        queued_us = started.elapsed().as_micros() as u64,
        "device hop queued"
    );
    Ok(InFlight::Cuda(dev, event, table))
}

/// `KVX_FAULT_BOUNCE_CHUNK=n`: the host hop of chunk n fails, for tests of what a failure in
/// the middle of a transfer through the bounce pool leaves behind.
fn injected_fault(chunk: usize) -> Result<()> {
    static AT: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let at = AT.get_or_init(|| {
        std::env::var("KVX_FAULT_BOUNCE_CHUNK")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    match at {
        Some(n) if *n == chunk => Err(Error::Internal(format!(
            "fault injected at chunk {chunk} (KVX_FAULT_BOUNCE_CHUNK)"
        ))),
        _ => Ok(()),
    }
}

/// A host hop's copies: the chunk's sources into the buffer at `buf` (`to_buffer`), or the
/// buffer out to the chunk's destinations.
fn host_copies(buf: &Arc<Memory>, chunk: &[CopyOp], to_buffer: bool) -> Vec<CopyOp> {
    let base = buf.regions()[0].addr;
    if to_buffer {
        pack(chunk, base, true)
            .into_iter()
            .map(CopyOp::flipped)
            .collect()
    } else {
        pack(chunk, base, false)
    }
}

/// The host hop of chunk `i` between a bounce buffer and pageable memory (`host_copies`), by
/// memcpy on this thread and on idle workers; `meanwhile` runs on this thread once the
/// helpers were asked, before it joins them.
fn host_hop<'d>(
    copier: &Spawner,
    copies: Vec<CopyOp>,
    i: usize,
    meanwhile: impl FnOnce(),
) -> Result<InFlight<'d>> {
    injected_fault(i)?;
    // SAFETY: the request was validated: the pageable ranges lie in memory the transfer holds
    // alive and no destination overlaps a source; the buffer holds the chunk and is this
    // transfer's alone until the pipeline gives it back.
    let pending = unsafe { copier.begin(copies) };
    meanwhile();
    pending.finish();
    Ok(InFlight::Done)
}

/// The two ends of a two-hop transfer.
enum Ends<'a> {
    /// NIXL reads into the buffers, NIXL writes out of them.
    DiskToDisk {
        src: &'a Arc<Memory>,
        dst: &'a Arc<Memory>,
    },
    /// Device-to-host copies into the buffers, NIXL writes out of them.
    DeviceToDisk {
        dev: DeviceEnd<'a>,
        dst: &'a Arc<Memory>,
    },
    /// NIXL reads into the buffers, host-to-device copies out of them.
    DiskToDevice {
        dev: DeviceEnd<'a>,
        src: &'a Arc<Memory>,
    },
    /// Host copies from pageable memory into the buffers, host-to-device copies out of them.
    HostToDevice {
        dev: DeviceEnd<'a>,
        copier: &'a Spawner,
    },
    /// Device-to-host copies into the buffers, host copies out of them into pageable memory.
    DeviceToHost {
        dev: DeviceEnd<'a>,
        copier: &'a Spawner,
    },
    /// Host copies into the buffers (a head transform's pieces, laid out as the peer holds
    /// them), NIXL writes out of them.
    HostToPeer { copier: &'a Spawner, peer: Peer<'a> },
    /// NIXL reads of the peer's runs into the buffers, host copies out of them.
    PeerToHost { copier: &'a Spawner, peer: Peer<'a> },
    /// Device-to-host copies into the buffers (in the peer's order), NIXL writes out of them.
    DeviceToPeer { dev: DeviceEnd<'a>, peer: Peer<'a> },
    /// NIXL reads of the peer's runs into the buffers, host-to-device copies out of them.
    PeerToDevice { dev: DeviceEnd<'a>, peer: Peer<'a> },
}

/// Moves `copies` between `ends` through `lease`'s two buffers, on the calling (worker)
/// thread.
fn run(agent: Option<&Agent>, ends: Ends<'_>, copies: &[CopyOp], lease: &Lease<'_>) -> Result<()> {
    let pair = lease.pair()?;
    let to_peer = matches!(
        ends,
        Ends::HostToPeer { .. }
            | Ends::PeerToHost { .. }
            | Ends::DeviceToPeer { .. }
            | Ends::PeerToDevice { .. }
    );
    let disk = !to_peer && !matches!(ends, Ends::HostToDevice { .. } | Ends::DeviceToHost { .. });
    // Host <-> device keeps the list's order; only the disk paths sort a copy of it.
    let mut copies = std::borrow::Cow::Borrowed(copies);
    if to_peer {
        let agent = agent.ok_or_else(|| Error::Internal("a peer hop without NIXL".into()))?;
        for b in pair {
            b.ensure_nixl_registered(agent)?;
        }
        // In the peer side's order (the list walks destinations; a read's sources are the
        // peer's), so that the peer's runs merge.
        if let Ends::PeerToHost { .. } | Ends::PeerToDevice { .. } = ends {
            copies.to_mut().sort_unstable_by_key(|c| c.src);
        }
    }
    if disk {
        // NIXL reads and writes the buffers: registered once, when first used for a disk.
        let agent = agent.ok_or_else(|| Error::Internal("a disk hop without NIXL".into()))?;
        for b in pair {
            b.ensure_nixl_registered(agent)?;
        }
        // In file-offset order of the disk side that sets the pace: a write's destinations,
        // or the sources of disk -> device. Each chunk's disk request is then ascending and
        // its neighbours merge; the disk reads ahead.
        let copies = copies.to_mut();
        match ends {
            Ends::DiskToDevice { .. } => copies.sort_unstable_by_key(|c| c.src),
            _ => sort_by_dst(copies),
        }
    }
    // A peer's chunks are smaller for short transfers, so that the copy into one buffer
    // overlaps the transfer of the other from the second chunk on (a 32 MiB transfer in 16 MiB
    // chunks barely overlapped); the disk and device paths keep CHUNK (deep disk queues).
    let chunks = match ends {
        _ if to_peer => {
            let bytes: u64 = copies.iter().map(|c| c.len).sum();
            chunks_of(&copies, (bytes / 8).max(PEER_CHUNK_MIN))
        }
        _ => chunks(&copies),
    };
    run_feed(agent, ends, Feed::ready(chunks), pair)
}

/// Moves the chunks of `feed` between `ends` through the two buffers of `pair`, on the calling
/// (worker) thread.
fn run_feed(agent: Option<&Agent>, ends: Ends<'_>, feed: Feed, pair: &[Arc<Memory>]) -> Result<()> {
    let n = feed.len();
    let feed = RefCell::new(feed);
    // Chunk i, waiting for its group where the list is still being built.
    let chunk = |i: usize| -> Result<std::cell::Ref<'_, [CopyOp]>> {
        feed.borrow_mut().ensure(i)?;
        std::cell::Ref::filter_map(feed.borrow(), |f| f.get(i).ok())
            .map_err(|_| Error::Internal(format!("chunk {i} of the copy list is missing")))
    };
    // Between a pageable pool and a device, while a host hop runs this thread writes the kernel
    // table of the next device hop not yet queued (device to host: two chunks on, as the next
    // one is already moving; host to device: the chunk being copied, whose device hop comes
    // next), so that queueing a hop is its upload and launch: writing 8192 entries took about
    // half of the 70-190 µs a device hop of 4 KiB pieces took to queue while neither hop ran
    // (35-64 µs with the table written ahead, device runs 4-5 of session 12).
    let ahead_of = match ends {
        Ends::DeviceToHost { dev, .. } => Some((dev, true, 2)),
        Ends::HostToDevice { dev, .. } => Some((dev, false, 0)),
        _ => None,
    };
    let ahead: RefCell<Option<(usize, PreparedList<'_>)>> = RefCell::new(None);
    let write_ahead = |i: usize| {
        let Some((dev, to_buffer, step)) = ahead_of else {
            return;
        };
        let j = i + step;
        // Never waits for a group still being built: the hop then writes its own table.
        if !feed.borrow_mut().try_ensure(j) {
            return;
        }
        let f = feed.borrow();
        let Ok(c) = f.get(j) else {
            return;
        };
        if let Some(p) = prepare_hop(dev, &pair[j % 2], c, to_buffer) {
            // A table left from an earlier chunk goes back to the pool.
            *ahead.borrow_mut() = Some((j, p));
        }
    };
    let take_ahead = |i: usize| match ahead.borrow_mut().take() {
        Some((j, p)) if j == i => Some(p),
        _ => None,
    };
    let nixl = || agent.ok_or_else(|| Error::Internal("a disk hop without NIXL".into()));
    let fill = |i: usize| match ends {
        Ends::DiskToDisk { src, .. } | Ends::DiskToDevice { src, .. } => {
            disk_hop(nixl()?, &pair[i % 2], src, &chunk(i)?, true)
        }
        Ends::DeviceToDisk { dev, .. }
        | Ends::DeviceToHost { dev, .. }
        | Ends::DeviceToPeer { dev, .. } => {
            device_hop(dev, &pair[i % 2], &chunk(i)?, true, take_ahead(i))
        }
        Ends::HostToDevice { copier, .. } | Ends::HostToPeer { copier, .. } => {
            // The chunk is released before `write_ahead` may take the next one.
            let copies = host_copies(&pair[i % 2], &chunk(i)?, true);
            host_hop(copier, copies, i, || write_ahead(i))
        }
        Ends::PeerToHost { ref peer, .. } | Ends::PeerToDevice { ref peer, .. } => {
            peer_hop(nixl()?, peer, &pair[i % 2], &chunk(i)?, true)
        }
    };
    let drain = |i: usize| match ends {
        Ends::DiskToDisk { dst, .. } | Ends::DeviceToDisk { dst, .. } => {
            disk_hop(nixl()?, &pair[i % 2], dst, &chunk(i)?, false)
        }
        Ends::DiskToDevice { dev, .. }
        | Ends::HostToDevice { dev, .. }
        | Ends::PeerToDevice { dev, .. } => {
            device_hop(dev, &pair[i % 2], &chunk(i)?, false, take_ahead(i))
        }
        Ends::DeviceToHost { copier, .. } | Ends::PeerToHost { copier, .. } => {
            let copies = host_copies(&pair[i % 2], &chunk(i)?, false);
            host_hop(copier, copies, i, || write_ahead(i))
        }
        Ends::HostToPeer { ref peer, .. } | Ends::DeviceToPeer { ref peer, .. } => {
            peer_hop(nixl()?, peer, &pair[i % 2], &chunk(i)?, false)
        }
    };
    // The hop whose start returns at once goes first, so the other runs meanwhile.
    let order = match ends {
        Ends::DiskToDevice { .. }
        | Ends::DeviceToHost { .. }
        | Ends::PeerToHost { .. }
        | Ends::PeerToDevice { .. } => Order::FillFirst,
        _ => Order::DrainFirst,
    };
    pipeline(n, order, fill, drain, |h| h.wait(agent))
}

/// The CUDA device that holds device memory `m`.
fn device_of(m: &Memory) -> Result<Arc<CudaDevice>> {
    m.device()
        .cloned()
        .ok_or_else(|| Error::Internal("device layout without a CUDA device".into()))
}

/// The device of device memory `m` with its copy kernel, where it has one: a device end.
fn device_end(
    m: &Memory,
    cuda: Option<&CudaExec>,
) -> Result<(Arc<CudaDevice>, Option<Arc<Kernel>>)> {
    let dev = device_of(m)?;
    let kernel = cuda.and_then(|c| c.kernel(&dev).ok());
    Ok((dev, kernel))
}

/// A handle for host copies on the worker pool (the helpers of a transfer's host hop).
fn spawner(workers: &Workers) -> Result<Spawner> {
    workers
        .spawner()
        .ok_or_else(|| Error::Internal("the worker pool is shutting down".into()))
}

/// Disk -> disk, device -> disk and disk -> device through the context's pinned bounce buffers,
/// pipelined on a worker thread. `gate`: start after the work queued on a caller's stream.
pub(crate) fn submit(
    request: &Request<'_>,
    plan: Plan,
    nixl: &NixlExec,
    cuda: Option<&CudaExec>,
    workers: &Workers,
    pool: &Arc<BouncePool>,
    gate: Option<Arc<StreamGate>>,
) -> Result<Transfer> {
    let (src, dst) = (request.src.memory().clone(), request.dst.memory().clone());
    // The device of whichever side is device memory, with its kernel; none between two disks.
    let device = match (src.kind(), dst.kind()) {
        (StorageKind::Device, _) => Some(&src),
        (_, StorageKind::Device) => Some(&dst),
        _ => None,
    }
    .map(|m| device_end(m, cuda))
    .transpose()?;
    let agent = &nixl.agent;
    for m in [&src, &dst] {
        if m.kind() == StorageKind::Disk {
            m.ensure_nixl_registered_with(agent.agent(), || agent.buffered_file_args())?;
        }
    }
    let list = request.build();
    let stats = TransferStats {
        bounced: true,
        ..TransferStats::of(&list, plan, Mechanism::Nixl)
    };
    let completion = Completion::new(1);
    let (nixl_agent, pool) = (agent.agent().clone(), pool.clone());
    let pin_for = cuda.map(|c| c.primary.clone());
    let keep = (src.clone(), dst.clone());
    workers.spawn_part(completion.clone(), gate, keep, move || {
        let lease = pool.take(|| pool::make_buffer(pin_for.as_ref()))?;
        let ends = match &device {
            None => Ends::DiskToDisk {
                src: &src,
                dst: &dst,
            },
            Some(d) if src.kind() == StorageKind::Device => Ends::DeviceToDisk {
                dev: DeviceEnd::of(d, CopyMode::Auto),
                dst: &dst,
            },
            Some(d) => Ends::DiskToDevice {
                dev: DeviceEnd::of(d, CopyMode::Auto),
                src: &src,
            },
        };
        run(Some(&nixl_agent), ends, &list.copies, &lease)
    });
    Ok(Transfer::new(completion, stats, cuda.is_some()))
}

/// A head transform between local host or device memory and a peer's layout whose pieces are
/// small (a head of a token): one NIXL descriptor per piece ran at the transport's
/// per-descriptor speed. Staged instead: the pieces are copied (host copies on this worker and
/// idle ones, or the device hop of the disk paths) into a bounce buffer in the peer's order,
/// and NIXL moves the peer's runs (all the common heads of a region, for a head-major peer) in
/// one request per chunk; reads the other way round. The
/// plan stays the seed's (`write`: NixlWrite, else NixlReadFlipped); `notify` is sent once
/// every chunk's write has completed (every byte is in place); stats say a bounce was used.
/// `gate`: start after the work queued on a caller's stream.
#[allow(clippy::too_many_arguments)]
pub(crate) fn submit_staged_peer(
    request: &Request<'_>,
    plan: Plan,
    nixl: &NixlExec,
    cuda: Option<&CudaExec>,
    workers: &Workers,
    pool: &Arc<BouncePool>,
    write: bool,
    notify: Option<&[u8]>,
    gate: Option<Arc<StreamGate>>,
) -> Result<Transfer> {
    let remote = if write { request.dst } else { request.src };
    let peer_agent = remote
        .peer()
        .ok_or_else(|| Error::Internal("a staged peer transfer without a peer".into()))?
        .to_string();
    let guard = remote
        .memory()
        .begin_remote_use()?
        .ok_or_else(|| Error::Internal("a peer layout without its use state".into()))?;
    let local = if write { request.src } else { request.dst };
    // Device memory on this side: its device and copy kernel for the device hop.
    let device = match local.storage_kind() {
        StorageKind::Device => Some(device_end(local.memory(), cuda)?),
        _ => None,
    };
    let copier = spawner(workers)?;
    let list = request.build();
    let stats = TransferStats {
        bounced: true,
        ..TransferStats::of(&list, plan, Mechanism::Nixl)
    };
    let completion = Completion::new(1);
    let (agent, pool) = (nixl.agent.clone(), pool.clone());
    let pin_for = cuda.map(|c| c.primary.clone());
    let notify = notify.map(<[u8]>::to_vec);
    let remote_memory = remote.memory().clone();
    let keep = (request.src.memory().clone(), request.dst.memory().clone());
    workers.spawn_part(completion.clone(), gate, keep, move || {
        let lease = pool.take(|| pool::make_buffer(pin_for.as_ref()))?;
        let peer = Peer {
            memory: &remote_memory,
            agent: &peer_agent,
            guard: &guard,
        };
        let ends = match (&device, write) {
            (None, true) => Ends::HostToPeer {
                copier: &copier,
                peer,
            },
            (None, false) => Ends::PeerToHost {
                copier: &copier,
                peer,
            },
            (Some(d), true) => Ends::DeviceToPeer {
                dev: DeviceEnd::of(d, CopyMode::Auto),
                peer,
            },
            (Some(d), false) => Ends::PeerToDevice {
                dev: DeviceEnd::of(d, CopyMode::Auto),
                peer,
            },
        };
        run(Some(agent.agent()), ends, &list.copies, &lease)?;
        match notify {
            Some(msg) if !guard.revoked() => agent.send(&peer_agent, &msg),
            Some(_) => Err(Error::Peer(
                "the peer revoked this layout before the notification was sent".into(),
            )),
            None => Ok(()),
        }
    });
    Ok(Transfer::new(completion, stats, cuda.is_some()))
}

/// What the submitting thread of a pageable transfer handed its worker so far.
#[derive(Default)]
struct Sent {
    copies: u64,
    groups: usize,
    /// The worker stopped taking groups (it failed): building the rest is pointless.
    refused: bool,
}

impl Sent {
    fn send(&mut self, tx: &crossbeam_channel::Sender<pipeline::Chunks>, list: CopyList) {
        self.copies += list.copies.len() as u64;
        self.groups += 1;
        self.refused |= tx.send(chunks(&list.copies)).is_err();
    }
}

/// System <-> device (the seed's blocking strategies CudaBlockingH2D / CudaBlockingD2H) through
/// the pinned bounce pool: the host hop is memcpy between pageable memory and a bounce buffer
/// (on this worker and on idle ones), the device hop the copy kernel or the copy engines, the
/// two pipelined; `mode` picks the device hop's mechanism as for pinned memory. The pool is the
/// one the disk paths use; `gate`: start after the work queued on a caller's stream.
#[allow(clippy::too_many_arguments)]
pub(crate) fn submit_pageable(
    request: &Request<'_>,
    plan: Plan,
    cuda: &CudaExec,
    workers: &Workers,
    pool: &Arc<BouncePool>,
    gate: Option<Arc<StreamGate>>,
    mode: CopyMode,
) -> Result<Transfer> {
    let (src, dst) = (request.src.memory().clone(), request.dst.memory().clone());
    let to_device = dst.kind() == StorageKind::Device;
    let device_side = if to_device { &dst } else { &src };
    let dev = device_of(device_side)?;
    let kernel = match (cuda.kernel(&dev), mode) {
        (Ok(k), _) => Some(k),
        (Err(why), CopyMode::Kernel) => return Err(Error::Unavailable(why)),
        (Err(_), _) => None,
    };
    let copier = spawner(workers)?;
    // The device hop fills the buffer (device -> host) unless it goes to the device.
    let direction = hop_direction(!to_device);
    // The copy list is built in groups of block pairs of one chunk each, and the worker starts
    // on the first while this thread builds the rest: building 65536 copies took 0.4-1.5 ms on
    // the H200 machines, ~10% of a 256 MiB transfer, which the first device hop now hides.
    let built = std::time::Instant::now();
    let mut groups = request.groups(CHUNK);
    let chunks_total: usize = request
        .groups(CHUNK)
        .map(|(_, bytes)| usize::try_from(bytes.div_ceil(CHUNK)).unwrap_or(usize::MAX))
        .sum();
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut sent = Sent::default();
    if let Some((g, _)) = groups.next() {
        sent.send(&tx, g.build());
    }
    let first_us = built.elapsed().as_micros() as u64;
    let completion = Completion::new(1);
    let pin_for = cuda.primary.clone();
    let pool = pool.clone();
    let keep = (src, dst);
    let device = (dev, kernel);
    let queued = std::time::Instant::now();
    let sms_of = device
        .1
        .as_ref()
        .map(|k| k.sms(&device.0, k.ctas(direction)));
    let has_list = device.1.as_ref().is_some_and(|k| k.has_list());
    workers.spawn_part(completion.clone(), gate, keep, move || {
        let started_us = queued.elapsed().as_micros() as u64;
        let lease = pool.take(|| pool::make_buffer(Some(&pin_for)))?;
        let leased_us = queued.elapsed().as_micros() as u64;
        let dev = DeviceEnd::of(&device, mode);
        let ends = if to_device {
            Ends::HostToDevice {
                dev,
                copier: &copier,
            }
        } else {
            Ends::DeviceToHost {
                dev,
                copier: &copier,
            }
        };
        let r = run_feed(None, ends, Feed::streamed(chunks_total, rx), lease.pair()?);
        tracing::trace!(
            started_us,
            leased_us,
            done_us = queued.elapsed().as_micros() as u64,
            "pageable transfer through the pool"
        );
        r
    });
    for (g, _) in groups {
        if sent.refused {
            break;
        }
        sent.send(&tx, g.build());
    }
    drop(tx);
    tracing::trace!(
        copies = sent.copies,
        groups = sent.groups,
        first_us,
        built_us = built.elapsed().as_micros() as u64,
        "pageable copy list built"
    );
    let bytes = request.bytes_with(request.transform().as_deref());
    let avg = bytes / sent.copies.max(1);
    let uses_kernel = has_list
        && match mode {
            CopyMode::Auto => prefers_kernel(direction, avg, sent.copies),
            CopyMode::Kernel => true,
            CopyMode::CopyEngine => false,
        };
    let (mechanism, sms) = match sms_of {
        Some(sms) if uses_kernel => (Mechanism::Kernel, sms),
        _ => (Mechanism::CopyEngine, 0),
    };
    let list = CopyList {
        copies: Vec::new(),
        fragments: request.fragments(),
        bytes,
    };
    let stats = TransferStats {
        copies: sent.copies,
        bounced: true,
        sms,
        ..TransferStats::of(&list, plan, mechanism)
    };
    Ok(Transfer::new(completion, stats, true))
}
