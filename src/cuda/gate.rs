//! A caller's stream as a gate: an event recorded on it, after which kvxfer's work starts.

use std::sync::Arc;

use cudarc::driver::sys::{self, CUevent};

use super::device::CudaDevice;
use super::driver::check;
use crate::error::Result;

/// An event recorded on a caller's stream: work ordered after it starts after the work queued
/// there. It returns to the pool only when dropped, after everything that waits on it.
pub(crate) struct StreamGate {
    dev: Arc<CudaDevice>,
    event: CUevent,
    /// Only streams wait on it (`for_streams`): a watch event, which no thread may sleep on.
    watch: bool,
}

// SAFETY: the event is usable from any thread with the context bound (every use binds it).
unsafe impl Send for StreamGate {}
// SAFETY: as above; nothing mutates the handle.
unsafe impl Sync for StreamGate {}

impl StreamGate {
    /// Records an event on the caller's CUstream `stream` that threads may wait on (`wait`).
    pub(crate) fn record(dev: &Arc<CudaDevice>, stream: usize) -> Result<Self> {
        Self::record_kind(dev, stream, false)
    }

    /// Records an event on the caller's CUstream `stream` that only streams wait on
    /// (`stream_waits`; `wait` would spin): a watch event, which streams start after sooner
    /// than after a blocking-sync one (`CudaDevice::watch_event`).
    pub(crate) fn for_streams(dev: &Arc<CudaDevice>, stream: usize) -> Result<Self> {
        Self::record_kind(dev, stream, true)
    }

    fn record_kind(dev: &Arc<CudaDevice>, stream: usize, watch: bool) -> Result<Self> {
        dev.bind()?;
        let event = if watch {
            dev.watch_event()?
        } else {
            dev.event()?
        };
        let this = Self {
            dev: dev.clone(),
            event,
            watch,
        };
        // SAFETY: the caller passes a live CUstream of this process (the option's contract).
        let r = unsafe { sys::cuEventRecord(event, stream as sys::CUstream) };
        // On failure `this` returns the event to its pool.
        check(r, "cuEventRecord on cuda_stream").map(|()| this)
    }

    /// Makes `stream` (one of kvxfer's) wait for the gate.
    pub(crate) fn stream_waits(&self, stream: sys::CUstream) -> Result<()> {
        // SAFETY: both handles are live.
        check(
            unsafe { sys::cuStreamWaitEvent(stream, self.event, 0) },
            "cuStreamWaitEvent",
        )
    }

    /// Whether the gate passed, without blocking (a thread that polls other work meanwhile).
    pub(crate) fn passed(&self) -> Result<bool> {
        self.dev.bind()?;
        // SAFETY: the event was recorded in `record` and lives until drop.
        match unsafe { sys::cuEventQuery(self.event) } {
            sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            r => check(r, "waiting for cuda_stream").map(|()| true),
        }
    }

    /// Blocks the calling thread until the gate passed (host-side executors).
    pub(crate) fn wait(&self) -> Result<()> {
        debug_assert!(
            !self.watch,
            "a thread would spin on a gate made for streams"
        );
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
        if self.watch {
            self.dev.recycle_watch_event(self.event);
        } else {
            self.dev.recycle_event(self.event);
        }
    }
}
