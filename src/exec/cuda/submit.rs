//! Starting one asynchronous CUDA transfer: the mechanism is chosen, the work queued on the
//! stream of its direction, an event recorded after it, and the progress engine completes the
//! transfer when the event fires.

use super::CudaExec;
use super::copy::{self, Loc};
use super::kernel::Job;
use super::progress::Pending;
use crate::cuda::{Direction, Route};
use crate::error::{Error, Result, bail};
use crate::layout::LayoutKind;
use crate::memory::{Memory, StorageKind};
use crate::options::{Mechanism, TransferOptions, TransferStats};
use crate::plan::{Plan, Request, Strategy};
use crate::transfer::{Completion, Transfer};

/// Copy engines or the SM kernel on the context device's stream for `strategy`'s direction.
pub(crate) fn submit(
    cuda: &CudaExec,
    request: &Request<'_>,
    plan: Plan,
    strategy: Strategy,
    options: &TransferOptions,
) -> Result<Transfer> {
    let dev = &cuda.primary;
    let direction = match strategy {
        Strategy::CudaAsyncH2D => Direction::HostToDevice,
        Strategy::CudaAsyncD2H => Direction::DeviceToHost,
        _ => Direction::DeviceToDevice,
    };
    let (src_mem, dst_mem) = (request.src.memory(), request.dst.memory());
    // Work runs on the context's device; memory of another device is reached through peer
    // access where the hardware has it (kernels and direct copies), else the copy engines go
    // through the driver's staging.
    let other = |m: &Memory| m.kind() == StorageKind::Device && m.device_id() != dev.ordinal;
    if other(src_mem) && other(dst_mem) {
        bail!(
            Unsupported,
            "device {} -> device {}: one side of a device transfer must be on the context's \
             cuda_device ({}); use a context made for one of the two",
            src_mem.device_id(),
            dst_mem.device_id(),
            dev.ordinal
        );
    }
    let mut peer = true;
    for m in [src_mem, dst_mem] {
        if other(m) {
            let d = m
                .device()
                .ok_or_else(|| Error::Internal("device layout without a CUDA device".into()))?;
            peer = dev.peer_access(d)?;
        }
    }
    let reachable =
        |m: &Memory| m.is_mapped() || (m.kind() == StorageKind::Device && (!other(m) || peer));
    let loc = |m: &Memory| match m.kind() {
        StorageKind::Device => Loc::Device(m.device_id()),
        _ => Loc::Host,
    };
    if direction == Direction::HostToDevice && !src_mem.is_mapped()
        || direction == Direction::DeviceToHost && !dst_mem.is_mapped()
    {
        bail!(
            InvalidArgument,
            "asynchronous copies need CUDA-pinned host memory; this pinned layout was made on a \
             context without CUDA"
        );
    }
    let (sc, dc) = (request.src.config(), request.dst.config());
    let region = request.src.region_len();
    let layers = request.layers.end - request.layers.start;
    let fragments = request.fragments();
    // Between fully contiguous layouts a whole block is one contiguous piece.
    let whole_blocks = sc.kind == LayoutKind::FullyContiguous
        && dc.kind == LayoutKind::FullyContiguous
        && layers == sc.num_layers
        && layers == dc.num_layers;
    let unit = if whole_blocks {
        region * layers * sc.outer_dim
    } else {
        region
    };
    let kernel = cuda.kernel(dev);
    let choice = copy::choose(
        kernel.as_deref().map_err(String::as_str),
        direction,
        unit,
        fragments,
        options.copy_mode,
        reachable(src_mem) && reachable(dst_mem),
    )?;
    dev.bind()?;
    let stream = dev.stream(direction);
    // The gate's event stays out of the pool until the transfer completes: a pooled event
    // re-recorded as another transfer's completion would change what this wait waits for.
    let gate = cuda.gate(options.cuda_stream)?;
    if let Some(g) = &gate {
        g.stream_waits(stream)?;
    }
    let (table, copies) = match (choice.mechanism, &kernel) {
        (Mechanism::Kernel, Ok(kernel)) => {
            let job = Job {
                src: request.src,
                dst: request.dst,
                src_blocks: request.src_blocks,
                dst_blocks: request.dst_blocks,
                layers: request.layers.clone(),
            };
            // SAFETY: `stream` belongs to `dev`; the request was validated and `Pending` keeps
            // both memories alive until the progress engine saw the stream pass this work.
            let table = unsafe { kernel.enqueue(dev, stream, &job) }.inspect_err(|_| {
                dev.abandon(stream, None);
            })?;
            (table, fragments)
        }
        (Mechanism::Kernel, Err(why)) => return Err(Error::Unavailable(why.clone())),
        _ => {
            // The whole list first, then the batch calls back to back: on an H100, pauses of
            // 200 µs or more between batch calls of small host-to-device copies (the time to
            // build the next chunk) made the driver's calls 3x slower and the copies run at a
            // third of the speed (docs/BENCHMARKS.md, "GPU tiers, third pass").
            let list = request.build();
            // SAFETY: as above.
            unsafe { copy::enqueue_at(dev, stream, loc(src_mem), loc(dst_mem), &list.copies) }
                .inspect_err(|_| dev.abandon(stream, None))?;
            (None, list.copies.len() as u64)
        }
    };
    let (event, table) = dev.record_or_abandon(stream, table)?;
    let completion = Completion::new(1);
    let bytes = fragments * region;
    let route = Route {
        direction,
        kernel: choice.mechanism == Mechanism::Kernel,
        peer: other(src_mem) || other(dst_mem),
    };
    let gated = gate.is_some();
    cuda.progress.push(
        direction,
        Pending {
            event,
            bytes,
            route,
            completion: completion.clone(),
            table,
            memory: vec![src_mem.clone(), dst_mem.clone()],
            gate,
        },
    );
    let stats = TransferStats {
        bytes,
        fragments,
        copies,
        plan,
        mechanism: choice.mechanism,
        kernel_fallback: choice.kernel_fallback,
        bounced: false,
        elapsed_ns: 0,
    };
    Ok(Transfer::new(completion, stats, true).with_event(dev.clone(), event, route, gated))
}
