//! Two-hop transfers through the context's pool of pinned bounce buffers, the seed's plans:
//! disk -> disk is NixlReadFlipped into a bounce buffer, then NixlWrite out of it; device ->
//! disk is a device-to-host copy into the buffer, then NixlWrite; disk -> device is
//! NixlReadFlipped into the buffer, then a host-to-device copy. Chunks alternate between the
//! two buffers of a pair, so the first hop of chunk k+1 overlaps the second hop of chunk k;
//! memory stays bounded (at most MAX_PAIRS pairs of CHUNK-byte buffers), and a job that finds
//! every pair in use waits for one. The hops themselves are in `hops`; pageable memory <->
//! device (the seed's blocking strategies) in `pageable`; small pieces to and from a peer's
//! landing arena in `aggregate`.

pub(crate) mod aggregate;
mod hops;
mod pageable;
mod pipeline;
mod pool;

use std::cell::RefCell;
use std::sync::Arc;

use nixl_sys::Agent;

pub(crate) use pageable::submit_pageable;
pub(crate) use pool::BouncePool;

use super::cuda::{CudaExec, Kernel, PreparedList};
use super::nixl::NixlExec;
use super::workers::{Spawner, Workers};
use crate::cuda::{CudaDevice, StreamGate};
use crate::error::{Error, Result};
use crate::memory::{Memory, StorageKind};
use crate::options::{CopyMode, Mechanism, TransferStats};
use crate::plan::copy_list::sort_by_dst;
use crate::plan::{CopyOp, Plan, Request};
use crate::transfer::{Completion, Transfer};
use hops::{DeviceEnd, Peer, buffer_copies, device_hop, disk_hop, host_hop, peer_hop, prepare_hop};
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
            let copies = buffer_copies(&chunk(i)?, &pair[i % 2], true).collect();
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
            let copies = buffer_copies(&chunk(i)?, &pair[i % 2], false).collect();
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
