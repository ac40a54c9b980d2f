//! Starting one asynchronous CUDA transfer: the mechanism is chosen, the work queued on the
//! stream of its direction, an event recorded after it, and the progress engine completes the
//! transfer when the event fires.

use super::CudaExec;
use super::copy::{self, Loc};
use super::kernel::{Job, Kernel, Launched, PreparedJob, split_pieces};
use super::progress::Pending;
use cudarc::driver::sys::{self, CUevent, CUstream};

use crate::cuda::{CudaDevice, Direction, Route, Signals, check};
use crate::error::{Error, Result, bail};
use crate::layout::LayoutKind;
use crate::memory::{Memory, StorageKind};
use crate::options::{Mechanism, TransferOptions, TransferStats};
use crate::plan::{Plan, Request, Strategy};
use crate::transfer::{Completion, LayerCounters, Transfer};

/// A head transform whose pieces average less than this goes to the kernel even in mode
/// COPY_ENGINE.
const TRANSFORM_ENGINE_MIN: u64 = 16 << 10;

/// Copy engines or the SM kernel on the context device's stream for `strategy`'s direction.
pub(crate) fn submit(
    cuda: &CudaExec,
    request: &Request<'_>,
    plan: Plan,
    strategy: Strategy,
    options: &TransferOptions,
) -> Result<Transfer> {
    let started = std::time::Instant::now();
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
    // A head transform cuts each region into its pieces (a head of a token, or runs of them).
    let transform = request.transform();
    let unit = match &transform {
        Some(p) => p.iter().map(|p| p.len).sum::<u64>() / (p.len() as u64).max(1),
        None if whole_blocks => region * layers * sc.outer_dim,
        None => region,
    };
    let kernel = cuda.kernel(dev);
    let reaches = reachable(src_mem) && reachable(dst_mem);
    let mut choice = copy::choose(
        kernel.as_deref().map_err(String::as_str),
        direction,
        unit,
        fragments,
        options.copy_mode,
        reaches,
    )?;
    // Copy engines take microseconds per copy: a transform cut into small pieces (a head of a
    // token) would crawl, so the kernel moves it, and stats say so (mechanism KERNEL).
    if transform.is_some()
        && choice.mechanism == Mechanism::CopyEngine
        && unit < TRANSFORM_ENGINE_MIN
        && reaches
        && kernel.is_ok()
    {
        tracing::debug!(
            piece_bytes = unit,
            "a head transform of small pieces: the copy kernel moves it instead of the copy \
             engines"
        );
        choice.mechanism = Mechanism::Kernel;
    }
    let chosen = started.elapsed();
    dev.bind()?;
    let stream = dev.stream(direction);
    // The block ids are checked before anything is queued: for the kernel in the pass that
    // writes its table, else here.
    let check_ids = |packed: Option<&mut [u64]>| request.validate_ids(packed);
    let pieces = transform.as_deref().map(split_pieces);
    let prepared = match (choice.mechanism, &kernel) {
        (Mechanism::Kernel, Ok(kernel)) => {
            let job = Job {
                src: request.src,
                dst: request.dst,
                src_blocks: request.src_blocks,
                dst_blocks: request.dst_blocks,
                layers: request.layers.clone(),
                direction,
                signals: None,
                pieces: pieces.as_deref(),
                check_ids: &check_ids,
            };
            Some(prepare_kernel(dev, kernel, job)?)
        }
        (Mechanism::Kernel, Err(why)) => {
            // Bad input is named as such whatever the machine has.
            check_ids(None)?;
            return Err(Error::Unavailable(why.clone()));
        }
        _ => {
            check_ids(None)?;
            None
        }
    };
    let checked = started.elapsed();
    // The gate's event stays out of the pool until the transfer completes: a pooled event
    // re-recorded as another transfer's completion would change what this wait waits for.
    let gate = cuda.stream_gate(options.cuda_stream)?;
    if let Some(g) = &gate {
        g.stream_waits(stream)?;
    }
    let bound = started.elapsed();
    let mut layer_events = Vec::new();
    let mut signals = None;
    let mut counters = None;
    let (table, copies, sms) = match prepared {
        Some(prepared) => {
            let kernel = prepared.kernel;
            // SAFETY: `stream` belongs to `dev`; the request was validated and `Pending` keeps
            // both memories alive until the progress engine saw the stream pass this work.
            let (launched, counted) = unsafe { launch_kernel(dev, stream, prepared) }?;
            (signals, counters) = counted.unzip();
            (launched.table, fragments, kernel.sms(dev, launched.ctas))
        }
        None => {
            let per_layer = layers > 1 && !whole_blocks;
            let ends = (loc(src_mem), loc(dst_mem));
            // SAFETY: as above.
            let copies = unsafe {
                enqueue_engines(dev, stream, request, ends, per_layer, &mut layer_events)
            }?;
            (None, copies, 0)
        }
    };
    let queued = started.elapsed();
    let (end, table) = match dev.record_end(stream, table) {
        Ok(r) => r,
        Err(e) => {
            abandon_layers(
                dev,
                &[stream, dev.signal_stream(direction)],
                &mut layer_events,
            );
            if let Some(s) = signals.take() {
                dev.recycle_signals(s, false);
            }
            return Err(e);
        }
    };
    let recorded = started.elapsed();
    let completion = Completion::new(1);
    let bytes = request.bytes_with(transform.as_deref());
    let route = Route {
        direction,
        kernel: choice.mechanism == Mechanism::Kernel,
        peer: other(src_mem) || other(dst_mem),
    };
    let gated = gate.is_some();
    let expected = dev.pace.due(route, bytes, gated);
    let place = dev
        .backlog
        .queue(direction, std::time::Instant::now(), expected);
    let due = expected.map(|e| place.behind + e);
    // Its age may also hold a wait for the work before it: it teaches the pace nothing.
    let waited = gated || place.may_wait;
    cuda.progress.push(
        direction,
        Pending {
            end,
            layer_events: layer_events.clone(),
            starts: place.behind,
            due,
            waited,
            number: place.number,
            signals,
            bytes,
            route,
            completion: completion.clone(),
            table,
            memory: vec![src_mem.clone(), dst_mem.clone()],
            gate,
        },
    );
    // Where a submit's time goes (KVX_LOG=kvxfer=trace; `bench --gpu --latency` sums it up).
    tracing::trace!(
        choose_ns = chosen.as_nanos() as u64,
        ids_ns = (checked - chosen).as_nanos() as u64,
        bind_ns = (bound - checked).as_nanos() as u64,
        queue_ns = (queued - bound).as_nanos() as u64,
        record_ns = (recorded - queued).as_nanos() as u64,
        total_ns = started.elapsed().as_nanos() as u64,
        "cuda submit"
    );
    let stats = TransferStats {
        bytes,
        fragments,
        copies,
        plan,
        mechanism: choice.mechanism,
        kernel_fallback: choice.kernel_fallback,
        bounced: false,
        sms,
        ipc_fallback: None,
        elapsed_ns: 0,
    };
    Ok(Transfer::new(completion, stats, true)
        .with_event(dev.clone(), end, route, place.number, waited, due)
        .with_layer_events(layer_events)
        .with_layer_counters(counters))
}

/// The copy kernel's launch for `job`, made ready (`Kernel::prepare`: its table written, the
/// ids checked on the way), with per-layer counters for a multi-layer job, which the kernel
/// adds each layer's pieces to. Nothing is queued yet.
fn prepare_kernel<'a>(
    dev: &'a CudaDevice,
    kernel: &'a Kernel,
    mut job: Job<'_>,
) -> Result<KernelLaunch<'a>> {
    let layers = (job.layers.end - job.layers.start) as usize;
    // Counts far below u32's half, so that the cyclic comparison of the wait holds.
    let countable = job.max_items_per_layer() < 1 << 30;
    let signals = UnusedSignals {
        dev,
        signals: if layers > 1 && countable {
            Some(dev.signals(layers)?)
        } else {
            None
        },
    };
    job.signals = signals
        .signals
        .as_ref()
        .map(|s| (s.device, job.direction == Direction::DeviceToHost));
    Ok(KernelLaunch {
        job: kernel.prepare(dev, &job)?,
        kernel,
        signals,
        layers,
    })
}

/// A prepared kernel launch, the kernel it is for and its layer counters.
struct KernelLaunch<'a> {
    job: PreparedJob<'a>,
    kernel: &'a Kernel,
    signals: UnusedSignals<'a>,
    layers: usize,
}

/// Layer counters not launched with: back to the device's pool when dropped, their counts
/// exact (nothing counted them).
struct UnusedSignals<'a> {
    dev: &'a CudaDevice,
    signals: Option<Signals>,
}

impl Drop for UnusedSignals<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.signals.take() {
            self.dev.recycle_signals(s, true);
        }
    }
}

/// Queues a prepared launch. Nothing more is queued for its layer counters here: a wait for a
/// layer is queued when someone asks for one (`Transfer::layer_wait`, `layer_stream_wait`),
/// since a wait and an event per layer cost ~3 us of driver time each (~100 us for 32 layers,
/// a third of a 256 MiB device-to-device copy; session 9, device run 13). Returns the launch,
/// the counters (for the progress engine to recycle) and what each layer's counter reaches.
///
/// # Safety
/// As `Kernel::launch`.
unsafe fn launch_kernel(
    dev: &CudaDevice,
    stream: CUstream,
    prepared: KernelLaunch<'_>,
) -> Result<(Launched, Option<(Signals, LayerCounters)>)> {
    let KernelLaunch {
        job,
        kernel,
        mut signals,
        layers,
    } = prepared;
    let direction = job.direction();
    // SAFETY: forwarded to the caller.
    let launched = match unsafe { kernel.launch(stream, job) } {
        Ok(l) => l,
        Err(e) => {
            dev.abandon(stream, None);
            // Nothing counted: `signals` goes back with its counts exact.
            return Err(e);
        }
    };
    let counted = signals.signals.take().map(|mut s| {
        // Below 2^30 (checked above at the smallest piece).
        let per_layer = launched.items_per_layer as u32;
        let targets = s
            .counts
            .iter_mut()
            .take(layers)
            .map(|count| {
                *count = count.wrapping_add(per_layer);
                *count
            })
            .collect();
        let counters = LayerCounters {
            device: s.device,
            targets,
            stream: dev.signal_stream(direction),
            in_order: launched.in_layer_order,
        };
        (s, counters)
    });
    Ok((launched, counted))
}

/// Queues `request` on the copy engines. The whole list first, then the batch calls back to
/// back: on an H100, pauses of 200 µs or more between batch calls of small host-to-device
/// copies (the time to build the next chunk) made the driver's calls 3x slower and the copies
/// run at a third of the speed (docs/BENCHMARKS.md, "GPU tiers, third pass"). With
/// `per_layer`, one list per layer, each followed by its layer's event (into `events`).
/// Returns the copies queued.
///
/// # Safety
/// `stream` is a live stream of `dev`; the request was validated and both memories stay alive
/// until the stream has passed this work.
unsafe fn enqueue_engines(
    dev: &CudaDevice,
    stream: CUstream,
    request: &Request<'_>,
    (src, dst): (Loc, Loc),
    per_layer: bool,
    events: &mut Vec<CUevent>,
) -> Result<u64> {
    let lists: Vec<_> = if per_layer {
        request
            .layers
            .clone()
            .map(|l| {
                Request {
                    layers: l..l + 1,
                    ..request.clone()
                }
                .build()
            })
            .collect()
    } else {
        vec![request.build()]
    };
    let mut copies = 0;
    for list in &lists {
        // SAFETY: forwarded to the caller.
        let queued =
            unsafe { copy::enqueue_at(dev, stream, src, dst, &list.copies) }.and_then(|()| {
                if per_layer {
                    record_layer(dev, stream, events)
                } else {
                    Ok(())
                }
            });
        if let Err(e) = queued {
            abandon_layers(dev, &[stream], events);
            return Err(e);
        }
        copies += list.copies.len() as u64;
    }
    Ok(copies)
}

/// Records a pooled watch event on `stream` after what is queued there: one layer's
/// completion (looked at by the progress engine and layer waits, waited on by streams).
fn record_layer(dev: &CudaDevice, stream: CUstream, events: &mut Vec<CUevent>) -> Result<()> {
    let e = dev.watch_event()?;
    // SAFETY: the event and stream are live handles of `dev`.
    if let Err(err) = check(unsafe { sys::cuEventRecord(e, stream) }, "cuEventRecord") {
        dev.recycle_watch_event(e);
        return Err(err);
    }
    events.push(e);
    Ok(())
}

/// A transfer failed after queuing work: waits until `streams` passed it (`abandon`), then
/// returns its layer events to the pool.
fn abandon_layers(dev: &CudaDevice, streams: &[CUstream], events: &mut Vec<CUevent>) {
    for &s in streams {
        dev.abandon(s, None);
    }
    for e in events.drain(..) {
        dev.recycle_watch_event(e);
    }
}
