//! `kvx_transfer`: submit, poll, wait, stats, release.

use std::ffi::c_void;

use super::boundary::{deref, fail, null_argument, slice, write_out};
use super::context::kvx_context;
use super::layout::kvx_layout;
use super::plan::kvx_plan;
use super::status::{KVX_STATUS_OK, KVX_STATUS_PENDING};
use crate::error::Error;
use crate::options::{CopyMode, TransferOptions};
use crate::transfer::Transfer;

/// CPU copies on the context's worker threads (host to host).
pub const KVX_MECHANISM_MEMCPY: i32 = 0;
/// The GPU's copy engines.
pub const KVX_MECHANISM_COPY_ENGINE: i32 = 1;
/// kvxfer's SM gather/scatter kernel.
pub const KVX_MECHANISM_KERNEL: i32 = 2;
/// A NIXL transfer (disk or remote peer).
pub const KVX_MECHANISM_NIXL: i32 = 3;
/// kvxfer's kernel (or the copy engines) over a same-host peer's device memory, mapped through
/// CUDA IPC (0.2).
pub const KVX_MECHANISM_IPC: i32 = 4;

/// No fallback: CUDA IPC moved the transfer, or it is not one between device memory here and
/// a peer's device memory (kvx_transfer_ipc_fallback).
pub const KVX_IPC_FALLBACK_NONE: i32 = 0;
/// This context was made with disable_ipc.
pub const KVX_IPC_FALLBACK_DISABLED: i32 = 1;
/// The peer runs on another host (its export names another boot of another host, or none).
pub const KVX_IPC_FALLBACK_OTHER_HOST: i32 = 2;
/// The peer exported no IPC handles for that memory (VMM or memory-pool allocations, an older
/// kvxfer, or a peer made with disable_ipc).
pub const KVX_IPC_FALLBACK_NOT_EXPORTED: i32 = 3;
/// Mapping the peer's memory failed here (another container's IPC namespace, a GPU this
/// process does not see or cannot reach); the log says why.
pub const KVX_IPC_FALLBACK_REFUSED: i32 = 4;
/// The peer is another context of this very process (CUDA cannot open its own handles).
pub const KVX_IPC_FALLBACK_SAME_PROCESS: i32 = 5;

/// Let kvxfer choose copy engines or SM kernels by fragment size.
pub const KVX_COPY_MODE_AUTO: i32 = 0;
/// Only the GPU's copy engines (keeps the SMs free).
pub const KVX_COPY_MODE_COPY_ENGINE: i32 = 1;
/// Always the SM gather/scatter kernel.
pub const KVX_COPY_MODE_KERNEL: i32 = 2;

/// Per-transfer options. Start from kvx_transfer_options_init().
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct kvx_transfer_options {
    /// First layer to move.
    pub layer_begin: u64,
    /// One past the last layer; 0 = all layers (the layouts must then have equal layer counts).
    pub layer_end: u64,
    /// A CUstream: the transfer starts after the work already queued there; NULL = none.
    pub cuda_stream: *mut c_void,
    /// KVX_COPY_MODE_*.
    pub copy_mode: i32,
    /// Message delivered to a remote target when the write completes; NULL = none. Copied.
    pub notify_msg: *const u8,
    pub notify_len: usize,
}

/// Counters of one transfer. bytes, fragments (block x layer x outer pieces), copies (after
/// coalescing), plan, mechanism and kernel_fallback are known at submit; elapsed_ns (submit to
/// completion) is 0 until done.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct kvx_transfer_stats {
    pub bytes: u64,
    pub fragments: u64,
    pub copies: u64,
    pub plan: kvx_plan,
    pub elapsed_ns: u64,
    /// KVX_MECHANISM_*: what moved the bytes.
    pub mechanism: i32,
    /// 1 when copy mode AUTO chose the SM kernel but it could not be built or loaded (no NVRTC,
    /// unsupported GPU), so the copy engines ran instead; kvx_last_error() is not set for this.
    pub kernel_fallback: u8,
    /// 1 when the bytes went through the context's pinned bounce buffers (0.2): pageable host
    /// memory <-> device, and the disk paths that stage through pinned memory.
    pub bounced: u8,
    /// SMs kvxfer's copy kernel ran on (0.2; its blocks, at most the GPU's SMs); 0 when the
    /// kernel did not move the bytes. In the struct's former padding: its size is unchanged.
    pub sms: u16,
}

/// A submitted transfer. Use one handle from one thread at a time. It keeps the memory of both
/// layouts alive until it finishes.
pub struct kvx_transfer {
    inner: Transfer,
}

// 0.1 callers pass a 56-byte struct: `sms` (0.2) lives in what was padding.
const _: () = assert!(std::mem::size_of::<kvx_transfer_stats>() == 56);

const _: () = {
    const fn send<T: Send>() {}
    send::<kvx_transfer>()
};

/// Writes the defaults: all layers, no stream, AUTO, no notification. NULL is a no-op.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvx_transfer_options_init(options: *mut kvx_transfer_options) {
    ffi_boundary! {
        if options.is_null() {
            return;
        }
        let o = kvx_transfer_options {
            layer_begin: 0,
            layer_end: 0,
            cuda_stream: std::ptr::null_mut(),
            copy_mode: KVX_COPY_MODE_AUTO,
            notify_msg: std::ptr::null(),
            notify_len: 0,
        };
        // SAFETY: non-NULL checked; the caller passes a writable struct.
        unsafe { write_out(options, o) }
    }
}

/// # Safety
/// `o.notify_msg` must point to `o.notify_len` bytes when non-NULL.
unsafe fn convert_options(o: Option<&kvx_transfer_options>) -> Result<TransferOptions, i32> {
    let Some(o) = o else {
        return Ok(TransferOptions::default());
    };
    // SAFETY: forwarded to the caller.
    let notify = unsafe { slice(o.notify_msg, o.notify_len, "notify_msg") }?;
    Ok(TransferOptions {
        layer_begin: o.layer_begin,
        layer_end: o.layer_end,
        cuda_stream: (!o.cuda_stream.is_null()).then_some(o.cuda_stream as usize),
        copy_mode: CopyMode::try_from(o.copy_mode).map_err(fail)?,
        notify: (!o.notify_msg.is_null()).then(|| notify.to_vec()),
    })
}

/// Moves src_blocks[i] of `src` to dst_blocks[i] of `dst` for i < n_blocks, for the layers in the
/// options (NULL options = defaults). Returns as soon as the work is queued. The whole request is
/// validated first: on any error nothing was written and *transfer_out is untouched.
/// Errors: NULL_ARGUMENT, INVALID_ARGUMENT (unequal region size or outer_dim, duplicate
/// destination ids, a block that is both source and destination, layouts of another context,
/// bad options, more than 2^26 block x layer x outer pieces), OUT_OF_RANGE (block ids, layer
/// range), UNSUPPORTED (refused pair), UNAVAILABLE (a strategy this version cannot run), PEER,
/// IO or NIXL (NIXL refused the request for a peer or a disk file; a peer found dead only when the
/// request is posted fails the transfer instead, reported by poll and wait). n_blocks = 0 gives
/// a transfer that is already complete.
/// On KVX_STATUS_OK *transfer_out owns a handle released with kvx_transfer_free().
#[unsafe(no_mangle)]
#[must_use]
pub unsafe extern "C" fn kvx_transfer_submit(
    context: *mut kvx_context,
    src: *const kvx_layout,
    src_blocks: *const u64,
    dst: *const kvx_layout,
    dst_blocks: *const u64,
    n_blocks: usize,
    options: *const kvx_transfer_options,
    transfer_out: *mut *mut kvx_transfer,
) -> i32 {
    ffi_boundary! {
        // SAFETY: the caller passes valid objects or NULL.
        let ctx = try_status!(unsafe { deref(context, "context") });
        // SAFETY: as above.
        let src = try_status!(unsafe { deref(src, "src") });
        // SAFETY: as above.
        let dst = try_status!(unsafe { deref(dst, "dst") });
        // SAFETY: both id arrays hold n_blocks entries (the function's contract).
        let src_blocks = try_status!(unsafe { slice(src_blocks, n_blocks, "src_blocks") });
        // SAFETY: as above.
        let dst_blocks = try_status!(unsafe { slice(dst_blocks, n_blocks, "dst_blocks") });
        if transfer_out.is_null() {
            return null_argument("transfer_out");
        }
        // SAFETY: a non-NULL options pointer is a valid struct whose notify_msg is valid.
        let options = try_status!(unsafe { convert_options(options.as_ref()) });
        let inner = try_core!(ctx.inner.submit(
            &src.inner, src_blocks, &dst.inner, dst_blocks, &options
        ));
        let handle = Box::into_raw(Box::new(kvx_transfer { inner }));
        // SAFETY: checked non-NULL above.
        unsafe { write_out(transfer_out, handle) };
        KVX_STATUS_OK
    }
}

fn outcome(r: Result<(), Error>) -> i32 {
    match r {
        Ok(()) => KVX_STATUS_OK,
        Err(e) => fail(e),
    }
}

/// KVX_STATUS_OK if the transfer finished, KVX_STATUS_PENDING if it is still running, or the
/// error it failed with (message in kvx_last_error()). Never blocks.
#[unsafe(no_mangle)]
#[must_use]
pub unsafe extern "C" fn kvx_transfer_poll(transfer: *mut kvx_transfer) -> i32 {
    ffi_boundary! {
        // SAFETY: the caller passes a valid transfer or NULL.
        let t = try_status!(unsafe { deref(transfer, "transfer") });
        match t.inner.poll() {
            None => KVX_STATUS_PENDING,
            Some(r) => outcome(r),
        }
    }
}

/// Blocks until the transfer finishes or timeout_us microseconds pass (negative: no limit;
/// 0: poll). Returns its outcome like kvx_transfer_poll(), or KVX_STATUS_TIMEOUT, which leaves
/// the transfer running. Waiting sleeps on a condition. For a GPU transfer whose duration the
/// device can predict (from earlier transfers of 4 MiB or more in the same direction), it wakes
/// shortly before the expected end and polls the transfer's CUDA event for at most 500 µs.
#[unsafe(no_mangle)]
#[must_use]
pub unsafe extern "C" fn kvx_transfer_wait(transfer: *mut kvx_transfer, timeout_us: i64) -> i32 {
    ffi_boundary! {
        // SAFETY: the caller passes a valid transfer or NULL.
        let t = try_status!(unsafe { deref(transfer, "transfer") });
        outcome(t.inner.wait(timeout_from_us(timeout_us)))
    }
}

/// Makes the CUstream `cuda_stream` wait for the transfer. For transfers on the GPU's streams
/// (copy engines or kernel) the host does not block: the stream waits on the transfer's event.
/// Transfers done by host threads (memcpy, pageable System <-> Device copies) are waited for on
/// the host first. A finished transfer returns its outcome at once. Errors: NULL_ARGUMENT,
/// UNAVAILABLE (context without CUDA), CUDA, or the transfer's own error.
#[unsafe(no_mangle)]
#[must_use]
pub unsafe extern "C" fn kvx_transfer_stream_wait(
    transfer: *mut kvx_transfer,
    cuda_stream: *mut c_void,
) -> i32 {
    ffi_boundary! {
        // SAFETY: the caller passes a valid transfer or NULL.
        let t = try_status!(unsafe { deref(transfer, "transfer") });
        if cuda_stream.is_null() {
            return null_argument("cuda_stream");
        }
        outcome(t.inner.stream_wait(cuda_stream as usize))
    }
}

/// Waits until one layer of the transfer is in place (0.2): layers complete in order,
/// layer_begin first, and never later than the transfer; timeout_us < 0 waits forever. On
/// the GPU paths each layer has its own event (on the copy kernel queued by the first wait for
/// it); host paths (memcpy, pageable, disk, peers) complete a layer with the whole transfer. Returns OK
/// once the layer is in place, TIMEOUT (the transfer goes on), the transfer's own error, or
/// OUT_OF_RANGE for a layer the transfer does not move; NULL_ARGUMENT.
#[unsafe(no_mangle)]
#[must_use]
pub unsafe extern "C" fn kvx_transfer_layer_wait(
    transfer: *mut kvx_transfer,
    layer: u64,
    timeout_us: i64,
) -> i32 {
    ffi_boundary! {
        // SAFETY: the caller passes a valid transfer or NULL.
        let t = try_status!(unsafe { deref(transfer, "transfer") });
        outcome(t.inner.layer_wait(layer, timeout_from_us(timeout_us)))
    }
}

/// Makes the CUstream `cuda_stream` wait for one layer of the transfer (0.2), as
/// kvx_transfer_stream_wait does for the whole transfer; the host does not block. Where the
/// transfer has no per-layer events (host paths, whole-block copies between fully contiguous
/// layouts), the stream waits for the whole transfer. Errors: as kvx_transfer_stream_wait, and OUT_OF_RANGE for a layer the
/// transfer does not move.
#[unsafe(no_mangle)]
#[must_use]
pub unsafe extern "C" fn kvx_transfer_layer_stream_wait(
    transfer: *mut kvx_transfer,
    layer: u64,
    cuda_stream: *mut c_void,
) -> i32 {
    ffi_boundary! {
        // SAFETY: the caller passes a valid transfer or NULL.
        let t = try_status!(unsafe { deref(transfer, "transfer") });
        if cuda_stream.is_null() {
            return null_argument("cuda_stream");
        }
        outcome(t.inner.layer_stream_wait(layer, cuda_stream as usize))
    }
}

/// Writes the transfer's counters. Works at any time. On error *stats_out is untouched.
#[unsafe(no_mangle)]
#[must_use]
pub unsafe extern "C" fn kvx_transfer_get_stats(
    transfer: *const kvx_transfer,
    stats_out: *mut kvx_transfer_stats,
) -> i32 {
    ffi_boundary! {
        // SAFETY: the caller passes a valid transfer or NULL.
        let t = try_status!(unsafe { deref(transfer, "transfer") });
        if stats_out.is_null() {
            return null_argument("stats_out");
        }
        let s = t.inner.stats();
        let out = kvx_transfer_stats {
            bytes: s.bytes,
            fragments: s.fragments,
            copies: s.copies,
            plan: s.plan.into(),
            elapsed_ns: s.elapsed_ns,
            mechanism: s.mechanism as i32,
            kernel_fallback: u8::from(s.kernel_fallback),
            bounced: u8::from(s.bounced),
            sms: u16::try_from(s.sms).unwrap_or(u16::MAX),
        };
        // SAFETY: checked non-NULL above.
        unsafe { write_out(stats_out, out) };
        KVX_STATUS_OK
    }
}

/// Why a transfer between device memory of this context and a same-host peer's device memory
/// went through NIXL rather than CUDA IPC (0.2): writes KVX_IPC_FALLBACK_* into *reason_out,
/// KVX_IPC_FALLBACK_NONE where IPC moved it (stats mechanism KVX_MECHANISM_IPC) or where the
/// transfer is not between device memory on both sides. (kvx_transfer_stats keeps its 0.1
/// size, so the reason has its own call.) Errors: NULL_ARGUMENT.
#[unsafe(no_mangle)]
#[must_use]
pub unsafe extern "C" fn kvx_transfer_ipc_fallback(
    transfer: *const kvx_transfer,
    reason_out: *mut i32,
) -> i32 {
    ffi_boundary! {
        // SAFETY: the caller passes a valid transfer or NULL.
        let t = try_status!(unsafe { deref(transfer, "transfer") });
        if reason_out.is_null() {
            return null_argument("reason_out");
        }
        let reason = t.inner.stats().ipc_fallback.map_or(KVX_IPC_FALLBACK_NONE, |f| f as i32);
        // SAFETY: checked non-NULL above.
        unsafe { write_out(reason_out, reason) };
        KVX_STATUS_OK
    }
}

/// Releases a transfer, first waiting for it to finish if it is still running (its error, if
/// any, is dropped: poll or wait first to see it). NULL is a no-op; freeing twice is undefined.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvx_transfer_free(transfer: *mut kvx_transfer) {
    ffi_boundary! {
        if !transfer.is_null() {
            // SAFETY: a non-NULL pointer came from kvx_transfer_submit and is freed once.
            drop(unsafe { Box::from_raw(transfer) });
        }
    }
}

/// Converts a C-style timeout (µs, negative = forever) to a wait bound.
fn timeout_from_us(us: i64) -> Option<std::time::Duration> {
    u64::try_from(us).ok().map(std::time::Duration::from_micros)
}
