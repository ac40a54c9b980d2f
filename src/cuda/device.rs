//! One CUDA device as a context uses it: the primary context (bound on every thread that does
//! CUDA work), one stream per copy direction, and pools of events and pinned pointer tables that
//! are reused across transfers.

use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{self, CUdevice_attribute, CUevent, CUstream};

use super::Direction;
use super::driver::{check, driver, symbol};
use super::pace::{Backlog, Pace};
use crate::error::{Error, Result, bail};

/// `cuMemcpyBatchAsync` of CUDA 12.8–12.9, with a `failIdx` out-parameter.
pub(crate) type BatchV1 = unsafe extern "C" fn(
    *mut u64,
    *mut u64,
    *mut usize,
    usize,
    *mut sys::CUmemcpyAttributes,
    *mut usize,
    usize,
    *mut usize,
    CUstream,
) -> sys::CUresult;

/// `cuMemcpyBatchAsync_v2` of CUDA 13, without `failIdx`.
pub(crate) type BatchV2 = unsafe extern "C" fn(
    *mut u64,
    *mut u64,
    *mut usize,
    usize,
    *mut sys::CUmemcpyAttributes,
    *mut usize,
    usize,
    CUstream,
) -> sys::CUresult;

/// How `cuMemcpyBatchAsync` is called on this driver: its signature changed in CUDA 13, so the
/// entry point is looked up by driver version when the device is opened.
#[derive(Debug, Clone, Copy)]
pub(crate) enum BatchApi {
    None,
    V1(BatchV1),
    V2(BatchV2),
}

/// A table a kernel reads: written by the host into pinned memory, copied to the device buffer
/// on the stream of the work that reads it, or read where it is (`mapped`). Pooled: reused once
/// that work completed.
#[derive(Debug)]
pub(crate) struct TableBuffer {
    pub(crate) host: *mut u64,
    /// The host buffer's address on the device (pinned memory is mapped), or 0 if the driver
    /// gave none: a kernel may then only read the uploaded copy.
    pub(crate) mapped: u64,
    pub(crate) device: u64,
    /// Capacity in u64 words.
    pub(crate) words: usize,
}

// SAFETY: the buffer is plain pinned memory owned by the pool; one transfer uses it at a time.
unsafe impl Send for TableBuffer {}

impl TableBuffer {
    /// Queues the copy of its first `words` words from the pinned buffer to the device buffer
    /// on `stream`: asynchronous, and ordered before what is queued after it there.
    ///
    /// # Safety
    /// `stream` is a live stream of the context the table was allocated in, and the host words
    /// stay untouched until the stream has passed the copy (pool contract).
    pub(crate) unsafe fn upload(&self, words: usize, stream: CUstream, what: &str) -> Result<()> {
        if words > self.words {
            return Err(Error::Internal(format!(
                "{what}: {words} words for a table of {}",
                self.words
            )));
        }
        // SAFETY: both buffers hold at least `words` u64s (checked); the host one is pinned.
        check(
            unsafe { sys::cuMemcpyHtoDAsync_v2(self.device, self.host.cast(), words * 8, stream) },
            what,
        )
    }
}

/// One u32 counter per layer in device memory, which the copy kernel counts up as pieces of
/// each layer land. Counters are never reset: `counts` mirrors what they hold once the work
/// that used them completed, and a layer is done when its counter reaches its count plus the
/// layer's items (the wait compares cyclically, so wrapping is harmless). Pooled.
#[derive(Debug)]
pub(crate) struct Signals {
    pub(crate) device: u64,
    pub(crate) counts: Vec<u32>,
}

/// One CUDA device as a context uses it. Its memory, modules and the work on its streams keep
/// it alive (`Arc`), so it is released after everything that needs its context.
#[derive(Debug)]
pub struct CudaDevice {
    pub(crate) ordinal: i32,
    pub(super) device: sys::CUdevice,
    ctx: sys::CUcontext,
    pub(crate) sm_count: u32,
    pub(crate) compute_capability: (i32, i32),
    streams: [CUstream; 3],
    /// Per direction, where per-layer signals wait for the kernel's counters (`Signals`).
    signal_streams: [CUstream; 3],
    pub(crate) batch: BatchApi,
    /// Blocking-sync events, for threads that sleep until work is done.
    events: Mutex<Vec<CUevent>>,
    /// Events that no thread sleeps on: looked at by waiters and the progress engine, waited on
    /// by streams.
    watch_events: Mutex<Vec<CUevent>>,
    tables: Mutex<Vec<TableBuffer>>,
    signals: Mutex<Vec<Signals>>,
    /// Counters of failed transfers (inexact, never reused), freed with the device: a caller's
    /// stream may still wait on one (`Transfer::layer_stream_wait`).
    retired_signals: Mutex<Vec<u64>>,
    /// Bandwidth learned per route, for waiters (pace.rs).
    pub(crate) pace: Pace,
    /// What is queued on each direction stream: when it should end, and how far it was seen
    /// complete (pace.rs).
    pub(crate) backlog: Backlog,
    /// Other devices by ordinal, and whether this device's kernels and copies reach their
    /// memory directly (peer access enabled) or not (no peer path in the hardware).
    peers: Mutex<Vec<(i32, bool)>>,
}

// SAFETY: a CUDA context, its streams and events may be used from any thread once the context
// is current there (`bind`); the pools are behind mutexes.
unsafe impl Send for CudaDevice {}
// SAFETY: as above.
unsafe impl Sync for CudaDevice {}

fn attribute(dev: sys::CUdevice, a: CUdevice_attribute) -> Result<i32> {
    let mut v = 0;
    // SAFETY: the driver is loaded; `dev` came from cuDeviceGet; the out pointer is a local.
    check(
        unsafe { sys::cuDeviceGetAttribute(&mut v, a, dev) },
        "cuDeviceGetAttribute",
    )?;
    Ok(v)
}

impl CudaDevice {
    /// Retains the primary context of device `ordinal` and makes it current on this thread.
    pub(crate) fn open(ordinal: i32) -> Result<Arc<Self>> {
        let drv = driver()?;
        if ordinal < 0 || ordinal >= drv.device_count {
            bail!(
                InvalidArgument,
                "cuda_device {ordinal} does not exist (this machine has {} CUDA device(s))",
                drv.device_count
            );
        }
        let mut dev = 0;
        // SAFETY: the driver is loaded and the ordinal is in range.
        check(
            unsafe { sys::cuDeviceGet(&mut dev, ordinal) },
            "cuDeviceGet",
        )?;
        use CUdevice_attribute::*;
        if attribute(dev, CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING)? != 1
            || attribute(dev, CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY)? != 1
        {
            bail!(
                Unavailable,
                "CUDA device {ordinal} lacks unified addressing or mapped host memory"
            );
        }
        let sm_count = attribute(dev, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1) as u32;
        let compute_capability = (
            attribute(dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attribute(dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        );
        let mut ctx = std::ptr::null_mut();
        // SAFETY: `dev` is valid; the out pointer is a local.
        check(
            unsafe { sys::cuDevicePrimaryCtxRetain(&mut ctx, dev) },
            "cuDevicePrimaryCtxRetain",
        )?;
        // SAFETY: each symbol, when present, has exactly the signature of its CUDA version.
        let batch = unsafe {
            match (
                drv.version,
                symbol(c"cuMemcpyBatchAsync_v2"),
                symbol(c"cuMemcpyBatchAsync"),
            ) {
                (13000.., Some(f), _) => {
                    BatchApi::V2(std::mem::transmute::<*mut std::ffi::c_void, BatchV2>(f))
                }
                (12080..13000, _, Some(f)) => {
                    BatchApi::V1(std::mem::transmute::<*mut std::ffi::c_void, BatchV1>(f))
                }
                _ => BatchApi::None,
            }
        };
        let mut this = Self {
            ordinal,
            device: dev,
            ctx,
            sm_count,
            compute_capability,
            streams: [std::ptr::null_mut(); 3],
            signal_streams: [std::ptr::null_mut(); 3],
            batch,
            events: Mutex::new(Vec::new()),
            watch_events: Mutex::new(Vec::new()),
            tables: Mutex::new(Vec::new()),
            signals: Mutex::new(Vec::new()),
            retired_signals: Mutex::new(Vec::new()),
            pace: Pace::default(),
            backlog: Backlog::default(),
            peers: Mutex::new(Vec::new()),
        };
        this.bind()?;
        // kvxfer's streams get the highest priority: a transfer's few blocks are scheduled as
        // soon as an SM has room, ahead of the next blocks of an engine's long kernels, instead
        // of waiting for them (the SM budget keeps what they take small).
        let (mut _least, mut greatest) = (0, 0);
        // SAFETY: the context is current; out pointers are locals.
        check(
            unsafe { sys::cuCtxGetStreamPriorityRange(&mut _least, &mut greatest) },
            "cuCtxGetStreamPriorityRange",
        )?;
        for s in this.streams.iter_mut().chain(&mut this.signal_streams) {
            // SAFETY: the context is current; the out pointer is a field of `this`, which
            // destroys the stream in Drop.
            check(
                unsafe {
                    sys::cuStreamCreateWithPriority(
                        s,
                        sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
                        greatest,
                    )
                },
                "cuStreamCreateWithPriority",
            )?;
        }
        Ok(Arc::new(this))
    }

    /// Lets this device's kernels and copies reach `other`'s memory directly, once per pair;
    /// `false` where the hardware has no peer path between the two (copies between them then
    /// go through the driver's staging, and kernels cannot address the other's memory).
    pub(crate) fn peer_access(&self, other: &CudaDevice) -> Result<bool> {
        if other.ordinal == self.ordinal {
            return Ok(true);
        }
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&(_, ok)) = peers.iter().find(|(o, _)| *o == other.ordinal) {
            return Ok(ok);
        }
        let mut can = 0;
        // SAFETY: both devices are valid handles; the out pointer is a local.
        check(
            unsafe { sys::cuDeviceCanAccessPeer(&mut can, self.device, other.device) },
            "cuDeviceCanAccessPeer",
        )?;
        let ok = can == 1 && {
            self.bind()?;
            // SAFETY: `other.ctx` is a retained primary context; this device's is current.
            match unsafe { sys::cuCtxEnablePeerAccess(other.ctx, 0) } {
                sys::CUresult::CUDA_SUCCESS
                | sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => true,
                r => {
                    check(r, "cuCtxEnablePeerAccess")?;
                    false
                }
            }
        };
        peers.push((other.ordinal, ok));
        Ok(ok)
    }

    /// The device's ordinal.
    pub fn ordinal(&self) -> i32 {
        self.ordinal
    }

    /// Makes this device's primary context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        // SAFETY: `ctx` is a retained primary context, valid until Drop.
        check(unsafe { sys::cuCtxSetCurrent(self.ctx) }, "cuCtxSetCurrent")
    }

    /// Whether `stream` (a caller's CUstream; NULL: the legacy default stream of the current
    /// context) is known to belong to this device's context. The context is bound. A stream
    /// the driver cannot place (a special handle it does not resolve) counts as another's:
    /// callers then take the path that works for any stream.
    pub(crate) fn owns_stream(&self, stream: CUstream) -> bool {
        let mut ctx = std::ptr::null_mut();
        // SAFETY: the caller passes a live stream (or NULL); the out pointer is a local.
        let r = unsafe { sys::cuStreamGetCtx(stream, &mut ctx) };
        r == sys::CUresult::CUDA_SUCCESS && ctx == self.ctx
    }

    pub(crate) fn stream(&self, d: Direction) -> CUstream {
        self.streams[d as usize]
    }

    /// The stream where per-layer signals of direction `d` wait.
    pub(crate) fn signal_stream(&self, d: Direction) -> CUstream {
        self.signal_streams[d as usize]
    }

    /// Counters for `layers` layers, from the pool when one is large enough.
    pub(crate) fn signals(&self, layers: usize) -> Result<Signals> {
        {
            let mut pool = self.signals.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = pool.iter().position(|s| s.counts.len() >= layers) {
                return Ok(pool.swap_remove(i));
            }
        }
        let n = layers.next_power_of_two().max(128);
        let mut device = 0;
        // SAFETY: the caller bound the context; the out pointer is a local; freed in Drop (or
        // below on failure).
        check(
            unsafe { sys::cuMemAlloc_v2(&mut device, n * 4) },
            "cuMemAlloc (layer counters)",
        )?;
        // SAFETY: `device` holds n u32s; synchronous, before any stream can use it.
        if let Err(e) = check(
            unsafe { sys::cuMemsetD32_v2(device, 0, n) },
            "cuMemsetD32 (layer counters)",
        ) {
            // SAFETY: allocated above, used by nothing.
            unsafe { sys::cuMemFree_v2(device) };
            return Err(e);
        }
        Ok(Signals {
            device,
            counts: vec![0; n],
        })
    }

    /// Returns counters whose work completed successfully: their counts are then exact. After
    /// a failure they are not, so they are retired; not freed, since a caller's stream may
    /// have been told to wait on them.
    pub(crate) fn recycle_signals(&self, s: Signals, ok: bool) {
        if ok {
            self.signals
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(s);
        } else {
            self.retired_signals
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(s.device);
        }
    }

    /// An event from the pool (blocking-sync: a waiting thread sleeps instead of spinning).
    pub(crate) fn event(&self) -> Result<CUevent> {
        pooled_event(
            &self.events,
            sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC as u32
                | sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32,
        )
    }

    pub(crate) fn recycle_event(&self, e: CUevent) {
        recycle(&self.events, e);
    }

    /// An event from the pool for watching: never slept on (`cuEventSynchronize` on it would
    /// spin), only queried and waited on by streams. A blocking-sync event's completion was
    /// seen by `cuEventQuery` 30-60 µs after a plain one's in some processes on an H200
    /// machine (the same kernel, the same process; session 18, device run 7), and a stream
    /// waiting on one started 2-4 µs later.
    pub(crate) fn watch_event(&self) -> Result<CUevent> {
        pooled_event(
            &self.watch_events,
            sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32,
        )
    }

    pub(crate) fn recycle_watch_event(&self, e: CUevent) {
        recycle(&self.watch_events, e);
    }

    /// A table of at least `words` u64s, from the pool when one fits.
    pub(crate) fn table(&self, words: usize) -> Result<TableBuffer> {
        {
            let mut pool = self.tables.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = pool.iter().position(|t| t.words >= words) {
                return Ok(pool.swap_remove(i));
            }
        }
        let words = words.next_power_of_two().max(8192);
        let mut host = std::ptr::null_mut();
        // SAFETY: the caller bound the context; the out pointer is a local; freed in Drop.
        check(
            unsafe {
                sys::cuMemHostAlloc(
                    &mut host,
                    words * 8,
                    sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP,
                )
            },
            "cuMemHostAlloc (kernel table)",
        )?;
        let mut device = 0;
        // SAFETY: as above.
        let r = unsafe { sys::cuMemAlloc_v2(&mut device, words * 8) };
        if let Err(e) = check(r, "cuMemAlloc (kernel table)") {
            // SAFETY: freeing what was just allocated.
            unsafe { sys::cuMemFreeHost(host) };
            return Err(e);
        }
        let mut mapped = 0;
        // SAFETY: `host` is pinned memory allocated above; the out pointer is a local.
        let r = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut mapped, host, 0) };
        let mapped = if r == sys::CUresult::CUDA_SUCCESS {
            mapped
        } else {
            0
        };
        Ok(TableBuffer {
            host: host.cast(),
            mapped,
            device,
            words,
        })
    }

    pub(crate) fn recycle_table(&self, t: TableBuffer) {
        self.tables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(t);
    }

    /// Work was queued on `stream` (one of this device's) but the operation it belongs to
    /// fails: waits until the stream has passed that work, which may still read or write memory
    /// the caller is about to give back, then returns `table` to the pool.
    pub(crate) fn abandon(&self, stream: CUstream, table: Option<TableBuffer>) {
        // SAFETY: a live stream of this device.
        unsafe { sys::cuStreamSynchronize(stream) };
        if let Some(t) = table {
            self.recycle_table(t);
        }
    }

    /// Records a pooled blocking-sync event (`event`) on `stream` after the work queued there,
    /// for a host thread to sleep on. On failure the work is abandoned (`abandon`, `table`
    /// included) and the error returned.
    pub(crate) fn record_or_abandon(
        &self,
        stream: CUstream,
        table: Option<TableBuffer>,
    ) -> Result<(CUevent, Option<TableBuffer>)> {
        self.record_pooled(stream, table, Self::event, Self::recycle_event)
    }

    /// Records the end of a transfer's work on `stream` as a watch event (`watch_event`): its
    /// waiters and the progress engine look at it, callers' streams wait on it, no thread
    /// sleeps on it. On failure as `record_or_abandon`.
    pub(crate) fn record_end(
        &self,
        stream: CUstream,
        table: Option<TableBuffer>,
    ) -> Result<(CUevent, Option<TableBuffer>)> {
        self.record_pooled(stream, table, Self::watch_event, Self::recycle_watch_event)
    }

    /// An event of the pool `take` draws from, recorded on `stream`; `give` returns it.
    fn record_pooled(
        &self,
        stream: CUstream,
        table: Option<TableBuffer>,
        take: fn(&Self) -> Result<CUevent>,
        give: fn(&Self, CUevent),
    ) -> Result<(CUevent, Option<TableBuffer>)> {
        let event = match take(self) {
            Ok(e) => e,
            Err(e) => {
                self.abandon(stream, table);
                return Err(e);
            }
        };
        // SAFETY: the event and stream are live handles of this device.
        match check(
            unsafe { sys::cuEventRecord(event, stream) },
            "cuEventRecord",
        ) {
            Ok(()) => Ok((event, table)),
            Err(e) => {
                give(self, event);
                self.abandon(stream, table);
                Err(e)
            }
        }
    }

    /// Waits for `event` (from `record_or_abandon`), then gives it and the work's `table` back to
    /// the pools; `what` names the work in an error. After a failed wait the stream may not
    /// have passed the table: it stays out of the pool (its pinned memory is leaked, not reused
    /// under a running kernel).
    pub(crate) fn wait_recorded(
        &self,
        event: CUevent,
        table: Option<TableBuffer>,
        what: &str,
    ) -> Result<()> {
        // SAFETY: a pooled event of this device; the pool's events are blocking-sync, so this
        // thread sleeps.
        let r = check(unsafe { sys::cuEventSynchronize(event) }, what);
        self.recycle_event(event);
        if let Some(t) = table.filter(|_| r.is_ok()) {
            self.recycle_table(t);
        }
        r
    }

    /// Runs every strategy-independent check a pointer from a caller needs: that `addr` lies
    /// in memory this device can reach with `len` bytes after it.
    pub(crate) fn check_device_range(&self, addr: u64, len: u64) -> Result<()> {
        let mut base = 0;
        let mut size = 0;
        self.bind()?;
        // SAFETY: the context is current; out pointers are locals; any address is acceptable.
        let r = unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, addr) };
        if check(r, "cuMemGetAddressRange").is_err() || addr + len > base + size as u64 {
            return Err(Error::InvalidArgument(format!(
                "[{addr:#x}, +{len}) is not inside one allocation of CUDA device {}",
                self.ordinal
            )));
        }
        let mut ordinal: i32 = -1;
        // SAFETY: as above; the attribute is an int.
        let r = unsafe {
            sys::cuPointerGetAttribute(
                (&mut ordinal as *mut i32).cast(),
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                addr,
            )
        };
        check(r, "cuPointerGetAttribute")?;
        if ordinal != self.ordinal {
            bail!(
                InvalidArgument,
                "memory at {addr:#x} belongs to CUDA device {ordinal}, not {}",
                self.ordinal
            );
        }
        Ok(())
    }
}

/// Everything in a pool, taken out (also from a poisoned lock: only Drop calls it).
fn drain<T>(pool: &mut Mutex<Vec<T>>) -> Vec<T> {
    std::mem::take(pool.get_mut().unwrap_or_else(|p| p.into_inner()))
}

/// An event of `pool`, or a new one with `flags` (the context bound by the caller).
fn pooled_event(pool: &Mutex<Vec<CUevent>>, flags: u32) -> Result<CUevent> {
    if let Some(e) = pool.lock().unwrap_or_else(|p| p.into_inner()).pop() {
        return Ok(e);
    }
    let mut e = std::ptr::null_mut();
    // SAFETY: the caller bound the context; the out pointer is a local.
    check(
        unsafe { sys::cuEventCreate(&mut e, flags) },
        "cuEventCreate",
    )?;
    Ok(e)
}

fn recycle(pool: &Mutex<Vec<CUevent>>, e: CUevent) {
    pool.lock().unwrap_or_else(|p| p.into_inner()).push(e);
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        if self.bind().is_err() {
            return;
        }
        // SAFETY: every handle below was created by this device and is destroyed once; the
        // streams are drained first so no queued work uses a freed table. Modules and memory of
        // the device hold it alive, so none is left to unload or free.
        unsafe {
            for s in self.streams.into_iter().chain(self.signal_streams) {
                if !s.is_null() {
                    sys::cuStreamSynchronize(s);
                    sys::cuStreamDestroy_v2(s);
                }
            }
            for e in drain(&mut self.events)
                .into_iter()
                .chain(drain(&mut self.watch_events))
            {
                sys::cuEventDestroy_v2(e);
            }
            for t in drain(&mut self.tables) {
                sys::cuMemFreeHost(t.host.cast());
                sys::cuMemFree_v2(t.device);
            }
            for s in drain(&mut self.signals) {
                sys::cuMemFree_v2(s.device);
            }
            for d in drain(&mut self.retired_signals) {
                sys::cuMemFree_v2(d);
            }
            let mut dev = 0;
            if sys::cuDeviceGet(&mut dev, self.ordinal) == sys::CUresult::CUDA_SUCCESS {
                sys::cuDevicePrimaryCtxRelease_v2(dev);
            }
        }
    }
}
