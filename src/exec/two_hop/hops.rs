//! One hop of one chunk of a two-hop transfer, for each kind of end: NIXL to or from a disk or
//! a peer, the CUDA hop between a bounce buffer and device memory (the copy kernel's list, or
//! the copy engines), and host copies between a bounce buffer and pageable memory.

use std::sync::Arc;

use cudarc::driver::sys::CUevent;
use nixl_sys::{Agent, XferRequest};

use crate::cuda::{CudaDevice, Direction, TableBuffer};
use crate::error::{Error, Result};
use crate::exec::cuda::copy::{enqueue_copy_engine, prefers_kernel};
use crate::exec::cuda::{Kernel, PreparedList};
use crate::exec::nixl::xfer::{Xfer, direct_fd, finish, start};
use crate::exec::workers::Spawner;
use crate::memory::{Memory, UseGuard};
use crate::options::CopyMode;
use crate::plan::CopyOp;
use crate::plan::copy_list::sort_by_dst;

/// One hop of one chunk, in flight.
pub(super) enum InFlight<'d> {
    /// A host copy, done when its hop returned.
    Done,
    Nixl(Option<XferRequest>),
    /// A request to a peer: its failures are the peer's (`Error::Peer`).
    Peer(Option<XferRequest>),
    /// Copies queued on `dev`'s stream, done when the event is; the copy kernel's list table
    /// goes back to the pool then. The direction and number say where on its stream
    /// (`Backlog::queue`): marked seen once done.
    Cuda(&'d CudaDevice, CUevent, Option<TableBuffer>, Direction, u64),
}

impl InFlight<'_> {
    pub(super) fn wait(self, agent: Option<&Agent>) -> Result<()> {
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
            InFlight::Cuda(dev, event, table, direction, number) => {
                let waited = std::time::Instant::now();
                let r = dev.wait_recorded(event, table, "copying through the bounce buffer");
                if r.is_ok() {
                    dev.backlog.seen(direction, number);
                }
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
pub(super) fn pack(chunk: &[CopyOp], base: u64, from_src: bool) -> Vec<CopyOp> {
    packed(chunk, base, from_src).collect()
}

/// As `pack`, computed as it is read.
pub(super) fn packed(
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
pub(super) fn disk_hop<'d>(
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
pub(super) fn peer_hop<'d>(
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
pub(super) struct Peer<'a> {
    pub(super) memory: &'a Arc<Memory>,
    pub(super) agent: &'a str,
    pub(super) guard: &'a UseGuard,
}

/// A device end of a two-hop transfer: the device and its copy kernel, where it has one.
#[derive(Clone, Copy)]
pub(super) struct DeviceEnd<'a> {
    pub(super) dev: &'a CudaDevice,
    pub(super) kernel: Option<&'a Kernel>,
    /// The transfer's copy mode: AUTO's rule per chunk, or always one mechanism.
    pub(super) mode: CopyMode,
}

impl<'a> DeviceEnd<'a> {
    pub(super) fn of(
        (dev, kernel): &'a (Arc<CudaDevice>, Option<Arc<Kernel>>),
        mode: CopyMode,
    ) -> Self {
        Self {
            dev,
            kernel: kernel.as_deref(),
            mode,
        }
    }
}

/// Whether the copy kernel `k` moves `n` copies of `bytes` in `direction` under `mode`: AUTO's
/// rule, or always one mechanism. Small pieces go to the kernel: on copy engines a 16 MiB chunk
/// of 4 KiB copies took milliseconds of driver time to queue and ran at ~9 GB/s, against the
/// kernel's ~50 GB/s to and from pinned memory.
pub(super) fn takes_kernel(
    k: &Kernel,
    mode: CopyMode,
    direction: Direction,
    bytes: u64,
    n: u64,
) -> bool {
    k.has_list()
        && match mode {
            CopyMode::Auto => prefers_kernel(direction, bytes / n.max(1), n),
            CopyMode::Kernel => true,
            CopyMode::CopyEngine => false,
        }
}

/// The copy kernel that moves `chunk` in `direction` for `end` (`takes_kernel`); `None`: the
/// copy engines.
pub(super) fn hop_kernel<'d>(
    end: DeviceEnd<'d>,
    direction: Direction,
    chunk: &[CopyOp],
) -> Option<&'d Kernel> {
    let bytes: u64 = chunk.iter().map(|c| c.len).sum();
    end.kernel
        .filter(|k| takes_kernel(k, end.mode, direction, bytes, chunk.len() as u64))
}

/// The copies of a hop between `chunk`'s other side and the buffer `buf` (device memory for
/// a device hop, pageable memory for a host hop): the chunk's sources into the buffer
/// (`to_buffer`), or the buffer out to the chunk's destinations.
pub(super) fn buffer_copies<'c>(
    chunk: &'c [CopyOp],
    buf: &Arc<Memory>,
    to_buffer: bool,
) -> impl Iterator<Item = CopyOp> + Clone + 'c {
    packed(chunk, buf.regions()[0].addr, to_buffer)
        .map(move |c| if to_buffer { c.flipped() } else { c })
}

pub(super) fn hop_direction(to_buffer: bool) -> Direction {
    if to_buffer {
        Direction::DeviceToHost
    } else {
        Direction::HostToDevice
    }
}

/// The kernel table of a device hop, written ahead of the hop (while a host hop runs);
/// `None` where the hop takes the copy engines or the table could not be had (the hop then
/// writes its own and reports what fails).
pub(super) fn prepare_hop<'d>(
    end: DeviceEnd<'d>,
    buf: &Arc<Memory>,
    chunk: &[CopyOp],
    to_buffer: bool,
) -> Option<PreparedList<'d>> {
    let k = hop_kernel(end, hop_direction(to_buffer), chunk)?;
    end.dev.bind().ok()?;
    k.prepare_list(end.dev, buffer_copies(chunk, buf, to_buffer))
        .ok()
}

/// The CUDA hop between a bounce buffer and device memory, on the device's stream for that
/// direction: device -> buffer (`to_buffer`) or buffer -> device; `ahead`: its kernel table,
/// written before (`prepare_hop`).
pub(super) fn device_hop<'d>(
    end: DeviceEnd<'d>,
    buf: &Arc<Memory>,
    chunk: &[CopyOp],
    to_buffer: bool,
    ahead: Option<PreparedList<'d>>,
) -> Result<InFlight<'d>> {
    let dev = end.dev;
    let started = std::time::Instant::now();
    let direction = hop_direction(to_buffer);
    let copies = buffer_copies(chunk, buf, to_buffer);
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
    // Of unknown length: a transfer queued behind it teaches the device's pace nothing.
    let place = dev
        .backlog
        .queue(direction, std::time::Instant::now(), None);
    tracing::trace!(
        copies = chunk.len(),
        table_ahead = was_ahead,
        queued_us = started.elapsed().as_micros() as u64,
        "device hop queued"
    );
    Ok(InFlight::Cuda(dev, event, table, direction, place.number))
}

/// `KVX_FAULT_BOUNCE_CHUNK=n`: the host hop of chunk n fails, for tests of what a failure in
/// the middle of a transfer through the bounce pool leaves behind.
pub(super) fn injected_fault(chunk: usize) -> Result<()> {
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

/// The host hop of chunk `i` between a bounce buffer and pageable memory (`buffer_copies`), by
/// memcpy on this thread and on idle workers; `meanwhile` runs on this thread once the
/// helpers were asked, before it joins them.
pub(super) fn host_hop<'d>(
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
