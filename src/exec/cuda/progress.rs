//! The progress engine for GPU work: one thread per direction stream. Events on one stream
//! complete in order, so each thread waits on them first-in first-out (`cuEventSynchronize` on a
//! blocking-sync event sleeps; nothing polls) without delaying transfers on the other streams.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Sender, unbounded};
use cudarc::driver::sys::{self, CUevent};

use crate::cuda::{CudaDevice, Direction, Route, Signals, StreamGate, TableBuffer, check};
use crate::error::{Error, Result};
use crate::memory::Memory;
use crate::transfer::Completion;

/// What a transfer holds until its last copy finished.
pub(crate) struct Pending {
    /// Slept on here (blocking-sync).
    pub(crate) event: CUevent,
    /// Recorded just before `event`, for the transfer's waiters and streams (`EndEvents`).
    pub(crate) watch: CUevent,
    /// One event per layer, in order, for copy-engine transfers that complete layer by layer.
    pub(crate) layer_events: Vec<CUevent>,
    /// The kernel's per-layer counters (waited on only when someone asks: `Transfer`).
    pub(crate) signals: Option<Signals>,
    /// Bytes the transfer moves and its route, for the device's pace.
    pub(crate) bytes: u64,
    pub(crate) route: Route,
    pub(crate) completion: Arc<Completion>,
    pub(crate) table: Option<TableBuffer>,
    pub(crate) memory: Vec<Arc<Memory>>,
    pub(crate) gate: Option<Arc<StreamGate>>,
}

// SAFETY: the event handle is usable from any thread with the context bound; the rest is Send.
unsafe impl Send for Pending {}

#[derive(Debug)]
pub(crate) struct Progress {
    lanes: Vec<Sender<Pending>>,
    threads: Vec<JoinHandle<()>>,
}

impl Progress {
    pub(crate) fn new(dev: &Arc<CudaDevice>) -> Result<Self> {
        let mut lanes = Vec::new();
        let mut threads = Vec::new();
        for lane in 0..3 {
            let (tx, rx) = unbounded::<Pending>();
            let dev = dev.clone();
            let t = std::thread::Builder::new()
                .name(format!("kvx-progress-{lane}"))
                .spawn(move || {
                    let bound = dev.bind();
                    for p in rx {
                        // Layers first, in order: each wakes its waiters as it lands.
                        let mut layers_ok = true;
                        for &e in &p.layer_events {
                            let r = match &bound {
                                // SAFETY: a pooled event recorded for this transfer, recycled
                                // only after the transfer completed (below).
                                Ok(()) => check(unsafe { sys::cuEventSynchronize(e) }, "layer"),
                                Err(e) => Err(e.clone()),
                            };
                            layers_ok &= r.is_ok();
                            if r.is_ok() {
                                p.completion.layer_done();
                            }
                        }
                        let r = match &bound {
                            // SAFETY: the event was recorded on this lane's stream and stays
                            // alive (pooled) until recycled below.
                            Ok(()) => {
                                check(unsafe { sys::cuEventSynchronize(p.event) }, "transfer")
                            }
                            Err(e) => Err(e.clone()),
                        };
                        tracing::trace!(
                            lane,
                            age_us = p.completion.age().as_micros() as u64,
                            "transfer's event passed (progress engine)"
                        );
                        // One a waiter saw finish has taught the pace its exact time.
                        if r.is_ok() && !p.completion.is_done() {
                            // Late by this thread's wake-up, so a little slow.
                            let gated = p.gate.is_some();
                            dev.pace.learn(p.route, p.bytes, p.completion.age(), gated);
                        }
                        if let Some(s) = p.signals {
                            dev.recycle_signals(s, r.is_ok() && layers_ok);
                        }
                        // The memory goes before completion is reported, so a layout freed
                        // after a wait is released at once. Completed before the events go
                        // back to the pool: a waiter that finds the transfer still pending may
                        // query an event, and it must not be another transfer's yet.
                        drop(p.memory);
                        p.completion.part_done(r);
                        dev.recycle_event(p.event);
                        dev.recycle_watch_event(p.watch);
                        for e in p.layer_events {
                            dev.recycle_event(e);
                        }
                        if let Some(t) = p.table {
                            dev.recycle_table(t);
                        }
                        drop(p.gate);
                    }
                })
                .map_err(|e| Error::OutOfMemory(format!("cannot start progress thread: {e}")))?;
            lanes.push(tx);
            threads.push(t);
        }
        Ok(Self { lanes, threads })
    }

    pub(crate) fn push(&self, d: Direction, p: Pending) {
        // Sending only fails after drop, when no transfer can be submitted any more.
        let _ = self.lanes[d as usize].send(p);
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.lanes.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
