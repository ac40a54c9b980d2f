//! The progress engine for GPU work: one thread per direction stream. Events on one stream
//! complete in order, so each thread waits on them first-in first-out (`cuEventSynchronize` on a
//! blocking-sync event sleeps; nothing polls) without delaying transfers on the other streams.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Sender, unbounded};
use cudarc::driver::sys::{self, CUevent};

use super::device::{CudaDevice, Direction, TableBuffer};
use super::driver::check;
use super::pace::Route;
use crate::error::{Error, Result};
use crate::memory::Memory;
use crate::transfer::Completion;

/// An event recorded on a caller's stream: the transfer starts after the work queued there.
/// It returns to the pool only when dropped, after the transfer that waits on it completed.
pub(crate) struct StreamGate {
    dev: Arc<CudaDevice>,
    event: CUevent,
}

// SAFETY: the event is usable from any thread with the context bound (every use binds it).
unsafe impl Send for StreamGate {}
// SAFETY: as above; nothing mutates the handle.
unsafe impl Sync for StreamGate {}

impl StreamGate {
    /// Records an event on the caller's CUstream `stream`.
    pub fn record(dev: &Arc<CudaDevice>, stream: usize) -> Result<Self> {
        dev.bind()?;
        let event = dev.event()?;
        // SAFETY: the caller passes a live CUstream of this process (the option's contract).
        let r = unsafe { sys::cuEventRecord(event, stream as sys::CUstream) };
        if let Err(e) = check(r, "cuEventRecord on cuda_stream") {
            dev.recycle_event(event);
            return Err(e);
        }
        Ok(Self {
            dev: dev.clone(),
            event,
        })
    }

    /// Makes `stream` (one of kvxfer's) wait for the gate.
    pub fn stream_waits(&self, stream: sys::CUstream) -> Result<()> {
        // SAFETY: both handles are live.
        check(
            unsafe { sys::cuStreamWaitEvent(stream, self.event, 0) },
            "cuStreamWaitEvent",
        )
    }

    /// Blocks the calling thread until the gate passed (host-side executors).
    pub fn wait(&self) -> Result<()> {
        self.dev.bind()?;
        // SAFETY: the event was recorded in `record` and lives until drop.
        check(
            unsafe { sys::cuEventSynchronize(self.event) },
            "waiting for cuda_stream",
        )
    }
}

impl Drop for StreamGate {
    fn drop(&mut self) {
        self.dev.recycle_event(self.event);
    }
}

/// What a transfer holds until its last copy finished.
pub(crate) struct Pending {
    pub event: CUevent,
    /// Bytes the transfer moves and its route, for the device's pace.
    pub bytes: u64,
    pub route: Route,
    pub completion: Arc<Completion>,
    pub table: Option<TableBuffer>,
    pub memory: Vec<Arc<Memory>>,
    pub gate: Option<Arc<StreamGate>>,
}

// SAFETY: the event handle is usable from any thread with the context bound; the rest is Send.
unsafe impl Send for Pending {}

#[derive(Debug)]
pub struct Progress {
    lanes: Vec<Sender<Pending>>,
    threads: Vec<JoinHandle<()>>,
}

impl Progress {
    pub fn new(dev: &Arc<CudaDevice>) -> Result<Self> {
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
                        let r = match &bound {
                            // SAFETY: the event was recorded on this lane's stream and stays
                            // alive (pooled) until recycled below.
                            Ok(()) => {
                                check(unsafe { sys::cuEventSynchronize(p.event) }, "transfer")
                            }
                            Err(e) => Err(e.clone()),
                        };
                        // A transfer gated on a caller's stream also waited for that work,
                        // and one a waiter saw finish has taught the pace its exact time.
                        if r.is_ok() && p.gate.is_none() && !p.completion.is_done() {
                            // Late by this thread's wake-up, so a little slow.
                            dev.pace.learn(p.route, p.bytes, p.completion.age());
                        }
                        // Completed before the event goes back to the pool: a waiter that
                        // finds the transfer still pending may query the event, and it must
                        // not be another transfer's yet.
                        p.completion.part_done(r);
                        dev.recycle_event(p.event);
                        if let Some(t) = p.table {
                            dev.recycle_table(t);
                        }
                        drop((p.memory, p.gate));
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
