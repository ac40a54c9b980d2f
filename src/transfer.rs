//! Transfer state: what was planned, how far it got, and how a caller learns it finished.
//! Completion is pushed by whoever finishes the last piece of work (a condition variable wakes
//! waiters); nothing polls on a timer.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cudarc::driver::sys;

use crate::cuda::{CudaDevice, Route, check};
use crate::error::{Error, Result};
use crate::options::TransferStats;

/// Called once if the transfer fails (the context's error counters).
type OnError = Box<dyn FnOnce() + Send>;

struct State {
    outcome: Option<Result<()>>,
    first_error: Option<Error>,
    elapsed_ns: u64,
    on_error: Option<OnError>,
    /// Threads asleep on `Completion::done` (`Completion::sleep`): a notify is a futex
    /// syscall, which a waiter that saw the work end itself need not pay for.
    sleepers: u32,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("outcome", &self.outcome)
            .field("elapsed_ns", &self.elapsed_ns)
            .finish()
    }
}

/// Shared between the transfer handle and the work that carries it out.
#[derive(Debug)]
pub(crate) struct Completion {
    state: Mutex<State>,
    done: Condvar,
    remaining: AtomicUsize,
    /// Leading layers of the transfer's range known to be in place (per-layer signals).
    layers_done: AtomicU64,
    started: Instant,
}

impl Completion {
    /// A completion that finishes once `parts` pieces have reported.
    pub(crate) fn new(parts: usize) -> Arc<Self> {
        let c = Arc::new(Self {
            state: Mutex::new(State {
                outcome: None,
                first_error: None,
                elapsed_ns: 0,
                on_error: None,
                sleepers: 0,
            }),
            done: Condvar::new(),
            remaining: AtomicUsize::new(parts),
            layers_done: AtomicU64::new(0),
            started: Instant::now(),
        });
        if parts == 0 {
            c.finish();
        }
        c
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere; the state itself stays consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One piece finished with `result`; the last one completes the transfer with the first
    /// error any piece reported.
    pub(crate) fn part_done(&self, result: Result<()>) {
        if let Err(e) = result {
            let mut s = self.lock();
            s.first_error.get_or_insert(e);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.finish();
        }
    }

    fn finish(&self) {
        let mut s = self.lock();
        let mut late = None;
        // A waiter may already have seen the work's last event fire (`observed_success`).
        if s.outcome.is_none() {
            let outcome = match s.first_error.take() {
                Some(e) => Err(e),
                None => Ok(()),
            };
            if outcome.is_err() {
                // The failure callback (the context's error counters) runs before the outcome
                // is published, so a caller whose wait returned the error also sees it counted.
                if let Some(f) = s.on_error.take() {
                    drop(s);
                    f();
                    s = self.lock();
                }
                // One registered while the callback ran is called right after publishing.
                late = s.on_error.take();
            }
            s.elapsed_ns = self.elapsed_ns();
            s.outcome = Some(outcome);
        }
        let sleepers = s.sleepers;
        drop(s);
        if let Some(f) = late {
            f();
        }
        if sleepers > 0 {
            self.done.notify_all();
        }
    }

    /// Sleeps on `done` until notified or `timeout` passed (spurious wake-ups included), the
    /// lock given up meanwhile; the caller checks what it waits for under the lock before.
    fn sleep<'a>(
        &self,
        mut s: MutexGuard<'a, State>,
        timeout: Option<Duration>,
    ) -> MutexGuard<'a, State> {
        s.sleepers += 1;
        let mut s = match timeout {
            None => self.done.wait(s).unwrap_or_else(|p| p.into_inner()),
            Some(t) => {
                self.done
                    .wait_timeout(s, t)
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
        };
        s.sleepers -= 1;
        s
    }

    /// The next layer (in order) is in place.
    pub(crate) fn layer_done(&self) {
        // Under the lock, so that a waiter between its check and its sleep is not missed.
        let s = self.lock();
        self.layers_done.fetch_add(1, Ordering::AcqRel);
        if s.sleepers > 0 {
            self.done.notify_all();
        }
    }

    /// The `index`-th layer of the range (from 0) is in place, or the outcome is known.
    fn layer_settled(&self, s: &State, index: u64) -> bool {
        s.outcome.is_some() || self.layers_done.load(Ordering::Acquire) > index
    }

    /// Calls `f` once if the transfer fails: at once if it already did.
    pub(crate) fn on_error(&self, f: OnError) {
        let mut s = self.lock();
        match &s.outcome {
            Some(Err(_)) => {
                drop(s);
                f();
            }
            Some(Ok(())) => {}
            None => s.on_error = Some(f),
        }
    }

    /// The single part's final CUDA event was seen complete: the transfer succeeded, even
    /// though the progress engine has not reported it yet.
    fn observed_success(&self) {
        let mut s = self.lock();
        if s.outcome.is_none() {
            s.elapsed_ns = self.elapsed_ns();
            s.outcome = Some(Ok(()));
        }
        if s.sleepers > 0 {
            drop(s);
            self.done.notify_all();
        }
    }

    /// The outcome is known (a waiter may have seen the last event before the engine did).
    pub(crate) fn is_done(&self) -> bool {
        self.lock().outcome.is_some()
    }

    /// Time since the transfer was submitted.
    pub(crate) fn age(&self) -> Duration {
        self.started.elapsed()
    }

    fn elapsed_ns(&self) -> u64 {
        u64::try_from(self.age().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A waiter watches the event itself for at most this long, then sleeps until woken.
const SPIN_BUDGET: Duration = Duration::from_micros(500);
/// It starts watching this much (or a quarter of the expected time, if less) before the
/// transfer should end.
const SPIN_LEAD: Duration = Duration::from_micros(250);
/// A timed sleep ends this much after it was asked to (the kernel's timer slack, 50 µs for a
/// normal thread, and waking the vCPU): measured 57-98 µs late on the H200 machine (session
/// 10, device run 5), which made every 256 MiB device copy's waiter see it ~70 µs after it
/// ended. The waiter asks to wake this much earlier.
const WAKE_LATE: Duration = Duration::from_micros(120);
/// A host wait for one layer of a kernel transfer looks at the layer's event this often once
/// it stopped spinning (the transfer's end wakes it at once).
const LAYER_POLL: Duration = Duration::from_micros(50);

/// The event recorded after a GPU transfer's last copy.
#[derive(Debug)]
struct GpuEvent {
    dev: Arc<CudaDevice>,
    /// A watch event (`CudaDevice::watch_event`): queried and waited on by streams, never
    /// slept on.
    event: sys::CUevent,
    /// How long after submit the work should end, from the device's pace (after the work
    /// queued before it); `None` when nothing is known yet or the start waits on a caller's
    /// stream.
    expected: Option<Duration>,
    /// It may have started only after other work (on a caller's stream, or work queued before
    /// it on kvxfer's), so its age says nothing of the route's pace.
    waited: bool,
    /// Its number on its stream (`Backlog::queue`), marked seen once it completed.
    number: u64,
    route: Route,
    bytes: u64,
}

// SAFETY: a CUDA event may be used from any thread with its context bound (done before use).
unsafe impl Send for GpuEvent {}
// SAFETY: as above; nothing mutates the handle.
unsafe impl Sync for GpuEvent {}

/// Per-layer completion of a kernel transfer: the kernel adds each layer's pieces to a
/// counter in device memory (`device`, one u32 per layer of the range), and layer `i` is in
/// place once its counter reached `targets[i]`. Waits are queued only when asked for.
#[derive(Debug)]
pub(crate) struct LayerCounters {
    pub(crate) device: u64,
    pub(crate) targets: Vec<u32>,
    /// Where host waits queue their counter waits and events (the direction's signal
    /// stream).
    pub(crate) stream: sys::CUstream,
    /// The counters complete in layer order (`Launched::in_layer_order`), so a layer's own
    /// counter says the layers before it are in place too.
    pub(crate) in_order: bool,
}

impl LayerCounters {
    /// Makes `stream` wait until layer `i`'s counter reached its target.
    ///
    /// # Safety
    /// `stream` is a live stream of the counters' device, whose context is bound.
    unsafe fn wait_on(&self, stream: sys::CUstream, i: usize) -> Result<()> {
        // SAFETY: forwarded to the caller; the counter lies in an allocation of the device
        // that is never freed while the device lives (pooled, or retired after a failure), and
        // counters only grow, so a counter reused by a later transfer still passes this
        // (cyclic, below 2^31 apart) comparison.
        let r = unsafe {
            sys::cuStreamWaitValue32_v2(
                stream,
                self.device + 4 * i as u64,
                self.targets[i],
                sys::CUstreamWaitValue_flags::CU_STREAM_WAIT_VALUE_GEQ as u32,
            )
        };
        check(r, "cuStreamWaitValue32 (layer)")
    }
}

/// The counters, and the events queued so far for layer waits: one per layer, in order, from
/// the first layer of the range.
#[derive(Debug)]
struct CountedLayers {
    counters: LayerCounters,
    events: Mutex<Vec<sys::CUevent>>,
}

/// A submitted transfer. Dropping it waits for the work to finish, so memory it reads or
/// writes is never released under it.
#[derive(Debug)]
pub struct Transfer {
    completion: Arc<Completion>,
    stats: TransferStats,
    gpu: Option<GpuEvent>,
    /// Submitted on a context with CUDA, so a caller's stream can be ordered after it.
    cuda_context: bool,
    /// The layers the transfer moves, for per-layer waits.
    layers: Range<u64>,
    /// A GPU transfer's per-layer events (pooled; empty where layers complete with the
    /// transfer).
    layer_events: Vec<sys::CUevent>,
    /// A kernel transfer's per-layer counters.
    counted: Option<CountedLayers>,
}

// SAFETY: CUDA events may be used from any thread with their context bound (done before use);
// the rest is Send and Sync.
unsafe impl Send for Transfer {}
// SAFETY: as above; the event handles are never mutated.
unsafe impl Sync for Transfer {}

impl Transfer {
    /// `cuda_context`: submitted on a context with CUDA, so `stream_wait` can order a stream.
    pub(crate) fn new(
        completion: Arc<Completion>,
        stats: TransferStats,
        cuda_context: bool,
    ) -> Self {
        Self {
            completion,
            stats,
            gpu: None,
            cuda_context,
            layers: 0..0,
            layer_events: Vec::new(),
            counted: None,
        }
    }

    /// The layers this transfer moves (its request's resolved range).
    pub(crate) fn with_layers(mut self, layers: Range<u64>) -> Self {
        self.layers = layers;
        self
    }

    /// `layer` is one this transfer moves.
    fn check_layer(&self, layer: u64) -> Result<()> {
        if self.layers.contains(&layer) {
            return Ok(());
        }
        Err(Error::OutOfRange(format!(
            "layer {layer} is not among this transfer's layers {}..{}",
            self.layers.start, self.layers.end
        )))
    }

    /// Waits until `layer`'s bytes are in place; `None` waits forever. Layers complete in
    /// order and never later than the transfer: on GPU paths each layer has its own event
    /// (queued when first asked for on kernel transfers, recorded between the layers' copies
    /// on the copy engines); elsewhere a layer completes with the transfer. A failed transfer
    /// fails every layer wait that had not returned yet.
    pub fn layer_wait(&self, layer: u64, timeout: Option<Duration>) -> Result<()> {
        self.check_layer(layer)?;
        let index = layer - self.layers.start;
        if let Some(counted) = &self.counted {
            return self.counted_layer_wait(counted, index, timeout);
        }
        let (Some(&event), Some(g)) = (self.layer_events.get(index as usize), &self.gpu) else {
            return self.wait(timeout);
        };
        if let Some(outcome) = self.layer_outcome(index) {
            return outcome;
        }
        g.dev.bind()?;
        self.watch_layer(event, index, timeout)
    }

    /// Makes the CUstream `stream` wait for `layer` only, as [`Transfer::stream_wait`] does
    /// for the whole transfer; the host does not block. Where the transfer has no per-layer
    /// events, the stream waits for the whole transfer.
    pub fn layer_stream_wait(&self, layer: u64, stream: usize) -> Result<()> {
        self.check_layer(layer)?;
        let index = layer - self.layers.start;
        if let Some(counted) = &self.counted {
            return self.counted_layer_stream_wait(counted, index, stream);
        }
        let Some(&event) = self.layer_events.get(index as usize) else {
            return self.stream_wait(stream);
        };
        let Some(g) = &self.gpu else {
            return self.stream_wait(stream);
        };
        if let Some(outcome) = self.layer_outcome(index) {
            return outcome; // nothing left to wait for
        }
        g.dev.bind()?;
        // As in `stream_wait`: an event recycled meanwhile makes the stream wait longer than
        // needed, never too short.
        // SAFETY: the event is pooled, never destroyed while the device lives (held by `g`);
        // the caller passes a live CUstream.
        let r = unsafe { sys::cuStreamWaitEvent(stream as sys::CUstream, event, 0) };
        check(r, "cuStreamWaitEvent")
    }

    /// The events of a GPU transfer's layers, in order (one per layer of its range).
    pub(crate) fn with_layer_events(mut self, events: Vec<sys::CUevent>) -> Self {
        self.layer_events = events;
        self
    }

    /// A kernel transfer's per-layer counters, if it has them.
    pub(crate) fn with_layer_counters(mut self, counters: Option<LayerCounters>) -> Self {
        self.counted = counters.map(|counters| CountedLayers {
            counters,
            events: Mutex::new(Vec::new()),
        });
        self
    }

    /// The outcome if `index` (from the range's first layer) is settled: in place, or the
    /// transfer finished (a failure fails it).
    fn layer_outcome(&self, index: u64) -> Option<Result<()>> {
        let c = &self.completion;
        let s = c.lock();
        c.layer_settled(&s, index).then(|| match &s.outcome {
            Some(Err(e)) => Err(e.clone()),
            _ => Ok(()),
        })
    }

    /// `layer_stream_wait` of a kernel transfer: a stream of this device waits for the layer's
    /// counter itself where the counters complete in layer order; otherwise (few pieces per
    /// layer, or another context's stream) the stream waits for the layer's event, which the
    /// signal stream records after the counters of this layer and every one before it.
    fn counted_layer_stream_wait(
        &self,
        counted: &CountedLayers,
        index: u64,
        stream: usize,
    ) -> Result<()> {
        if let Some(outcome) = self.layer_outcome(index) {
            return outcome; // nothing left to wait for
        }
        let g = self.gpu_event()?;
        g.dev.bind()?;
        let c = &counted.counters;
        if !c.in_order || !g.dev.owns_stream(stream as sys::CUstream) {
            let event = Self::queue_layer_events(g, counted, index)?;
            // SAFETY: as in `stream_wait`; the event is this transfer's until it is dropped,
            // and a pooled event re-recorded later only makes the stream wait longer.
            let r = unsafe { sys::cuStreamWaitEvent(stream as sys::CUstream, event, 0) };
            return check(r, "cuStreamWaitEvent (layer)");
        }
        // SAFETY: the caller passes a live CUstream of this device.
        unsafe { c.wait_on(stream as sys::CUstream, index as usize) }
    }

    fn gpu_event(&self) -> Result<&GpuEvent> {
        self.gpu
            .as_ref()
            .ok_or_else(|| Error::Internal("layer counters without a GPU event".into()))
    }

    /// The event of layer `index`, queued (with those of the layers before it that were not
    /// yet) on the direction's signal stream after a wait for its counter. The device is bound.
    fn queue_layer_events(
        g: &GpuEvent,
        counted: &CountedLayers,
        index: u64,
    ) -> Result<sys::CUevent> {
        let c = &counted.counters;
        let mut events = counted.events.lock().unwrap_or_else(|p| p.into_inner());
        while events.len() as u64 <= index {
            // SAFETY: the signal stream is a live stream of the device.
            unsafe { c.wait_on(c.stream, events.len()) }?;
            // Queried by layer waits and waited on by streams, never slept on.
            let e = g.dev.watch_event()?;
            // SAFETY: a pooled event of the device, recorded on its signal stream.
            if let Err(err) = check(
                unsafe { sys::cuEventRecord(e, c.stream) },
                "cuEventRecord (layer)",
            ) {
                g.dev.recycle_watch_event(e);
                return Err(err);
            }
            events.push(e);
        }
        Ok(events[index as usize])
    }

    /// `layer_wait` of a kernel transfer: queues the layer's event (`queue_layer_events`),
    /// then watches it and the transfer's outcome: spinning for SPIN_BUDGET, then looking
    /// every LAYER_POLL.
    fn counted_layer_wait(
        &self,
        counted: &CountedLayers,
        index: u64,
        timeout: Option<Duration>,
    ) -> Result<()> {
        if let Some(outcome) = self.layer_outcome(index) {
            return outcome;
        }
        let g = self.gpu_event()?;
        g.dev.bind()?;
        let event = Self::queue_layer_events(g, counted, index)?;
        self.watch_layer(event, index, timeout)
    }

    /// Watches layer `index`'s `event` (the copy engines' events are the progress engine's,
    /// recycled after it reported the outcome; the counted layers' are this transfer's) and
    /// the transfer's outcome: spinning for SPIN_BUDGET, then looking every LAYER_POLL. The
    /// device is bound.
    fn watch_layer(
        &self,
        event: sys::CUevent,
        index: u64,
        timeout: Option<Duration>,
    ) -> Result<()> {
        let c = &self.completion;
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let spin_until = Instant::now() + SPIN_BUDGET;
        loop {
            // Looked at under the lock, with no outcome yet: the progress engine reports the
            // outcome before it recycles the events it owns, so the event is still this
            // transfer's, and a failed transfer fails the wait.
            let s = c.lock();
            if let Some(o) = &s.outcome {
                return o.clone();
            }
            // SAFETY: a pooled event of the device, this transfer's (above).
            match unsafe { sys::cuEventQuery(event) } {
                sys::CUresult::CUDA_SUCCESS => return Ok(()),
                sys::CUresult::CUDA_ERROR_NOT_READY => {}
                e => return check(e, "cuEventQuery (layer)"),
            }
            let now = Instant::now();
            let left = deadline.map(|d| d.saturating_duration_since(now));
            if left.is_some_and(|l| l.is_zero()) {
                return Err(layer_timeout(self.layers.start + index, timeout));
            }
            if now < spin_until {
                drop(s);
                std::hint::spin_loop();
                continue;
            }
            let step = left.map_or(LAYER_POLL, |l| l.min(LAYER_POLL));
            drop(c.sleep(s, Some(step)));
        }
    }

    /// A GPU transfer on `route` whose last copy is followed by `event` on one of `dev`'s
    /// streams; `number`: its number on the stream (`Backlog::queue`); `waited`: it may start
    /// only after other work (a caller's stream, work queued before it); `expected`: when it is
    /// due.
    pub(crate) fn with_event(
        mut self,
        dev: Arc<CudaDevice>,
        event: sys::CUevent,
        route: Route,
        number: u64,
        waited: bool,
        expected: Option<Duration>,
    ) -> Self {
        let bytes = self.stats.bytes;
        self.gpu = Some(GpuEvent {
            dev,
            event,
            expected,
            waited,
            number,
            route,
            bytes,
        });
        self
    }

    /// For a GPU transfer: sleeps until shortly before it should end (when its duration can be
    /// predicted), then watches its event for at most SPIN_BUDGET, so that the caller is not
    /// left waiting for two thread wake-ups after the copy finished. `None`: not finished by
    /// then (or by `deadline`); the caller sleeps until the progress engine reports.
    fn finish_by_watching(&self, deadline: Option<Instant>) -> Option<Result<()>> {
        let g = self.gpu.as_ref()?;
        let c = &self.completion;
        // Unknown duration (nothing learned yet, too small to learn from, or gated on a
        // caller's stream): watch from the start. A small transfer is then seen done at once
        // instead of two thread wake-ups later.
        let watch_from = c.started + watch_after(g.expected);
        {
            let mut s = c.lock();
            loop {
                if let Some(o) = &s.outcome {
                    tracing::trace!(
                        age_us = c.age().as_micros() as u64,
                        "transfer reported by the progress engine before its waiter watched"
                    );
                    return Some(o.clone());
                }
                let now = Instant::now();
                if now >= watch_from {
                    break;
                }
                let until = deadline.map_or(watch_from, |d| d.min(watch_from));
                if now >= until {
                    return None;
                }
                s = c.sleep(s, Some(until - now));
            }
        }
        g.dev.bind().ok()?;
        // Where a wait's time goes (KVX_LOG=kvxfer=trace): when the waiter began to watch
        // against when it meant to, and when it saw the event.
        let woke = c.age();
        let trace = |seen: &str| {
            tracing::trace!(
                expected_us = g.expected.map(|e| e.as_micros() as u64),
                woke_us = woke.as_micros() as u64,
                age_us = c.age().as_micros() as u64,
                "transfer {seen}"
            )
        };
        let stop = Instant::now() + SPIN_BUDGET;
        let stop = deadline.map_or(stop, |d| d.min(stop));
        while Instant::now() < stop {
            if let Some(o) = self.poll() {
                trace("reported by the progress engine while its waiter watched");
                return Some(o);
            }
            // SAFETY: the event is pooled and lives as long as the device (held by `g`). If
            // the transfer completed after the poll above, the event may already record a later
            // transfer: "not ready" then only means one more round, and "done" still means this
            // transfer (recorded before) finished.
            match unsafe { sys::cuEventQuery(g.event) } {
                sys::CUresult::CUDA_SUCCESS => {
                    trace("seen done by its waiter");
                    g.dev.backlog.seen(g.route.direction, g.number);
                    g.dev.pace.learn(g.route, g.bytes, c.age(), g.waited);
                    c.observed_success();
                    return self.poll();
                }
                sys::CUresult::CUDA_ERROR_NOT_READY => std::hint::spin_loop(),
                // The progress engine reports the error.
                _ => return None,
            }
        }
        trace("not done within the waiter's watch");
        None
    }

    /// Makes the CUstream `stream` wait for this transfer. For GPU transfers the stream waits
    /// on the transfer's event and the host does not block; host-side transfers (memcpy and
    /// pageable copies) are waited for on the host first.
    pub fn stream_wait(&self, stream: usize) -> Result<()> {
        if !self.cuda_context {
            return Err(Error::Unavailable(
                "stream_wait needs CUDA, which this transfer's context does not have".into(),
            ));
        }
        if let Some(outcome) = self.poll() {
            return outcome; // nothing left to wait for
        }
        match &self.gpu {
            Some(g) => {
                g.dev.bind()?;
                // If the transfer completes between the poll above and this call, its event may
                // already be back in the pool and recorded again by a later transfer (on any of
                // the device's streams): the caller's stream then waits for that later work as
                // well, which is longer than needed but never too short.
                // SAFETY: the event is pooled, never destroyed while the device lives (held by
                // `g`); the caller passes a live CUstream.
                let r = unsafe { sys::cuStreamWaitEvent(stream as sys::CUstream, g.event, 0) };
                check(r, "cuStreamWaitEvent")
            }
            None => self.wait(None),
        }
    }

    /// `None` while pending, else the outcome.
    pub fn poll(&self) -> Option<Result<()>> {
        self.completion.lock().outcome.clone()
    }

    /// Waits for completion; `None` waits forever. `Err(Timeout)` leaves the transfer running.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<()> {
        let c = &self.completion;
        if let Some(outcome) =
            self.finish_by_watching(timeout.and_then(|t| Instant::now().checked_add(t)))
        {
            return outcome;
        }
        let mut s = c.lock();
        match timeout {
            None => {
                while s.outcome.is_none() {
                    s = c.sleep(s, None);
                }
            }
            Some(t) => {
                // A deadline too far away to represent is the same as waiting forever.
                let deadline = Instant::now().checked_add(t);
                while s.outcome.is_none() {
                    let left = match deadline {
                        Some(d) => d.saturating_duration_since(Instant::now()),
                        None => Duration::from_secs(3600),
                    };
                    if left.is_zero() {
                        return Err(Error::Timeout(format!(
                            "transfer still running after {} µs",
                            t.as_micros()
                        )));
                    }
                    s = c.sleep(s, Some(left));
                }
            }
        }
        s.outcome.clone().unwrap_or(Ok(()))
    }

    /// Calls `f` once if the transfer fails (at once if it already did).
    pub(crate) fn on_error(&self, f: impl FnOnce() + Send + 'static) {
        self.completion.on_error(Box::new(f));
    }

    /// The transfer moved a same-host peer's device memory mapped through CUDA IPC.
    pub(crate) fn by_ipc(mut self) -> Self {
        self.stats.mechanism = crate::options::Mechanism::Ipc;
        self
    }

    /// The transfer went through NIXL because CUDA IPC could not take it.
    pub(crate) fn with_ipc_fallback(mut self, why: Option<crate::memory::IpcFallback>) -> Self {
        self.stats.ipc_fallback = why;
        self
    }

    pub fn stats(&self) -> TransferStats {
        TransferStats {
            elapsed_ns: self.completion.lock().elapsed_ns,
            ..self.stats
        }
    }
}

/// How long after its submit a waiter starts watching a GPU transfer expected to take
/// `expected` (`None`: unknown, so at once): ahead of the end by a quarter of it, at most
/// SPIN_LEAD, and by WAKE_LATE more, which its sleep may overshoot.
fn watch_after(expected: Option<Duration>) -> Duration {
    expected.map_or(Duration::ZERO, |e| {
        e.saturating_sub((e / 4).min(SPIN_LEAD) + WAKE_LATE)
    })
}

/// A layer wait that ran out of `timeout`.
fn layer_timeout(layer: u64, timeout: Option<Duration>) -> Error {
    Error::Timeout(format!(
        "layer {layer} still moving after {} µs",
        timeout.unwrap_or_default().as_micros()
    ))
}

impl Drop for Transfer {
    fn drop(&mut self) {
        let _ = self.wait(None);
        // The layer events queued for host waits go back to the pool: the transfer finished,
        // so their counters are reached and the signal stream passes them. (Re-recorded by a
        // later transfer before that, they would only be later than needed.)
        if let (Some(counted), Some(g)) = (self.counted.take(), &self.gpu) {
            let events = counted
                .events
                .into_inner()
                .unwrap_or_else(|p| p.into_inner());
            for e in events {
                g.dev.recycle_watch_event(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::Mechanism;
    use crate::plan::{Plan, Strategy};

    #[test]
    fn a_waiter_starts_watching_early_enough_for_a_late_wake_up() {
        let us = Duration::from_micros;
        // Unknown or short: at once.
        assert_eq!(watch_after(None), Duration::ZERO);
        assert_eq!(watch_after(Some(us(150))), Duration::ZERO);
        // A 256 MiB device copy (~140 µs) too; 400 µs: a quarter and WAKE_LATE ahead.
        assert_eq!(watch_after(Some(us(140))), Duration::ZERO);
        assert_eq!(watch_after(Some(us(400))), us(400 - 100 - 120));
        // Long: SPIN_LEAD and WAKE_LATE ahead, so that a sleep ending up to WAKE_LATE late
        // still starts watching before the end.
        assert_eq!(watch_after(Some(us(5000))), us(5000 - 250 - 120));
        for e in [200, 1000, 100_000] {
            assert!(watch_after(Some(us(e))) + WAKE_LATE < us(e));
        }
    }

    fn stats() -> TransferStats {
        TransferStats {
            bytes: 1,
            fragments: 1,
            copies: 1,
            plan: Plan::Direct(Strategy::Memcpy),
            mechanism: Mechanism::Memcpy,
            kernel_fallback: false,
            bounced: false,
            sms: 0,
            ipc_fallback: None,
            elapsed_ns: 0,
        }
    }

    #[test]
    fn completes_after_last_part_with_first_error() {
        let c = Completion::new(3);
        let t = Transfer::new(c.clone(), stats(), false);
        assert!(t.poll().is_none());
        assert!(matches!(
            t.wait(Some(Duration::from_millis(1))),
            Err(Error::Timeout(_))
        ));
        c.part_done(Err(Error::Io("first".into())));
        c.part_done(Err(Error::Io("second".into())));
        assert!(t.poll().is_none());
        c.part_done(Ok(()));
        assert_eq!(t.poll(), Some(Err(Error::Io("first".into()))));
        assert_eq!(t.wait(None), Err(Error::Io("first".into())));
    }

    #[test]
    fn an_observed_completion_stands_when_the_engine_reports_later() {
        let c = Completion::new(1);
        let t = Transfer::new(c.clone(), stats(), false);
        c.observed_success();
        assert_eq!(t.poll(), Some(Ok(())));
        let elapsed = t.stats().elapsed_ns;
        assert!(elapsed > 0);
        std::thread::sleep(Duration::from_millis(2));
        c.part_done(Ok(()));
        assert_eq!(t.wait(None), Ok(()));
        assert_eq!(t.stats().elapsed_ns, elapsed);
    }

    #[test]
    fn zero_parts_is_complete_at_once() {
        let t = Transfer::new(Completion::new(0), stats(), false);
        assert_eq!(t.poll(), Some(Ok(())));
        assert_eq!(t.wait(Some(Duration::ZERO)), Ok(()));
    }

    #[test]
    fn waiter_is_woken_from_another_thread() {
        let c = Completion::new(1);
        let t = Transfer::new(c.clone(), stats(), false);
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            c.part_done(Ok(()));
        });
        assert_eq!(t.wait(Some(Duration::from_secs(30))), Ok(()));
        assert!(t.stats().elapsed_ns > 0);
        h.join().unwrap();
    }

    #[test]
    fn sleepers_are_counted_while_asleep_and_woken_by_the_last_part() {
        let c = Completion::new(1);
        let t = Arc::new(Transfer::new(c.clone(), stats(), false));
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || t.wait(None))
            })
            .collect();
        // All three asleep (a sleeper registers under the lock before it sleeps).
        let asleep = Instant::now() + Duration::from_secs(30);
        while c.lock().sleepers < 3 {
            assert!(Instant::now() < asleep, "the waiters never slept");
            std::thread::sleep(Duration::from_millis(1));
        }
        c.part_done(Ok(()));
        for w in waiters {
            assert_eq!(w.join().unwrap(), Ok(()));
        }
        assert_eq!(c.lock().sleepers, 0);
    }
}
