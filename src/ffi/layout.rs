//! `kvx_layout`: configs, storage descriptions, creation, wrapping caller memory, regions.

use std::ffi::{CStr, c_char};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;

use super::boundary::{deref, fail, null_argument, slice, write_out};
use super::context::kvx_context;
use super::status::KVX_STATUS_OK;
use crate::context::Context;
use crate::error::Error;
use crate::layout::{HeadOrder, Heads, Layout, LayoutConfig, LayoutKind};
use crate::memory::{Region, StorageKind};
use crate::options::StorageSpec;

/// Pageable host memory.
pub const KVX_STORAGE_KIND_SYSTEM: i32 = 0;
/// Page-locked host memory.
pub const KVX_STORAGE_KIND_PINNED: i32 = 1;
/// CUDA device memory.
pub const KVX_STORAGE_KIND_DEVICE: i32 = 2;
/// A file; addresses are file offsets.
pub const KVX_STORAGE_KIND_DISK: i32 = 3;

/// One allocation laid out [block][layer][outer][region].
pub const KVX_LAYOUT_KIND_FULLY_CONTIGUOUS: i32 = 0;
/// One allocation per layer, laid out [block][outer][region].
pub const KVX_LAYOUT_KIND_LAYER_SEPARATE_BLOCK_FIRST: i32 = 1;
/// One allocation per layer, laid out [outer][block][region].
pub const KVX_LAYOUT_KIND_LAYER_SEPARATE_OUTER_FIRST: i32 = 2;

/// A region is [page][head][dim]: token-major (0.2).
pub const KVX_HEAD_ORDER_NHD: i32 = 0;
/// A region is [head][page][dim]: head-major (0.2).
pub const KVX_HEAD_ORDER_HND: i32 = 1;

/// Where a layout's memory lives.
/// DEVICE: device_id is the CUDA ordinal. DISK: path NULL = a new unlinked file in the context's
/// disk_dir; a path is created or reused and kept after free. Other kinds: device_id 0, path NULL.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct kvx_storage {
    /// KVX_STORAGE_KIND_*.
    pub kind: i32,
    pub device_id: i32,
    pub path: *const c_char,
}

/// The shape of a block pool. One (block, layer, outer) piece ("region") holds
/// page_size * inner_dim * dtype_width_bytes bytes. Start from kvx_layout_config_init().
/// Every dimension is at least 1; num_layers is at most 65536; all sizes are overflow-checked.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct kvx_layout_config {
    pub num_blocks: u64,
    pub num_layers: u64,
    /// 1, or 2 for separate K and V.
    pub outer_dim: u64,
    /// Tokens per block.
    pub page_size: u64,
    /// heads * head_dim.
    pub inner_dim: u64,
    /// 1 (FP8), 2, 4 or 8.
    pub dtype_width_bytes: u32,
    /// A power of two: pads the block stride; every region's start must be aligned to it.
    pub alignment: u32,
    /// KVX_LAYOUT_KIND_*.
    pub kind: i32,
    /// Heads this layout holds (0.2); inner_dim = num_heads * head_dim. 0 (the default): the
    /// region is opaque, as in 0.1. When both layouts of a transfer set it, the transfer copies,
    /// for every block pair, layer and outer, the heads both hold (a tensor-parallel slice: a
    /// decode rank assembled from prefill ranks' transfers, or split the other way), each side
    /// in its own head_order; equal page_size, head_dim, dtype_width_bytes and outer_dim are
    /// required, and at least one common head (else INVALID_ARGUMENT, nothing written).
    pub num_heads: u32,
    /// Index of the layout's first head among the layer's heads (its tensor-parallel slice).
    pub head_begin: u32,
    /// KVX_HEAD_ORDER_NHD (0): a region is [page][head][dim]; KVX_HEAD_ORDER_HND (1):
    /// [head][page][dim].
    pub head_order: i32,
}

/// A span of memory: a host or device address, or a file offset for DISK.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct kvx_memory {
    pub addr: u64,
    pub size: u64,
}

/// A block pool over some memory. Immutable and thread-safe: any number of threads may use it
/// at once, also in concurrent transfers (which must not write the same blocks). Transfers that
/// use it keep its memory alive, so it may be freed while they run.
pub struct kvx_layout {
    pub(crate) inner: Arc<Layout>,
}

const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<kvx_layout>()
};

/// Writes the defaults into *config: dtype_width_bytes 2, alignment 1, FULLY_CONTIGUOUS, every
/// dimension 0 (the caller sets them). NULL is a no-op.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvx_layout_config_init(config: *mut kvx_layout_config) {
    ffi_boundary! {
        if config.is_null() {
            return;
        }
        let c = kvx_layout_config {
            num_blocks: 0,
            num_layers: 0,
            outer_dim: 0,
            page_size: 0,
            inner_dim: 0,
            dtype_width_bytes: 2,
            alignment: 1,
            kind: KVX_LAYOUT_KIND_FULLY_CONTIGUOUS,
            num_heads: 0,
            head_begin: 0,
            head_order: KVX_HEAD_ORDER_NHD,
        };
        // SAFETY: non-NULL checked; the caller passes a writable struct.
        unsafe { write_out(config, c) }
    }
}

fn layout_config(c: &kvx_layout_config) -> Result<LayoutConfig, i32> {
    Ok(LayoutConfig {
        num_blocks: c.num_blocks,
        num_layers: c.num_layers,
        outer_dim: c.outer_dim,
        page_size: c.page_size,
        inner_dim: c.inner_dim,
        dtype_width: c.dtype_width_bytes,
        alignment: c.alignment,
        kind: LayoutKind::try_from(c.kind).map_err(fail)?,
        heads: Heads {
            num_heads: c.num_heads,
            head_begin: c.head_begin,
            order: HeadOrder::try_from(c.head_order).map_err(fail)?,
        },
    })
}

/// # Safety
/// A non-NULL `s.path` must be a NUL-terminated string.
unsafe fn storage_spec(s: &kvx_storage) -> Result<StorageSpec, i32> {
    let kind = StorageKind::try_from(s.kind).map_err(fail)?;
    if s.device_id < 0 {
        return Err(fail(Error::InvalidArgument(format!(
            "device_id must be >= 0, got {}",
            s.device_id
        ))));
    }
    let path = if s.path.is_null() {
        None
    } else if kind != StorageKind::Disk {
        return Err(fail(Error::InvalidArgument(format!(
            "path applies only to DISK storage, not {kind}"
        ))));
    } else {
        // SAFETY: forwarded to the caller.
        let bytes = unsafe { CStr::from_ptr(s.path) }.to_bytes();
        Some(PathBuf::from(std::ffi::OsStr::from_bytes(bytes)))
    };
    Ok(StorageSpec {
        kind,
        device_id: s.device_id,
        path,
    })
}

/// The checks and conversions `kvx_layout_new` and `kvx_layout_wrap` share.
///
/// # Safety
/// Each pointer is NULL or valid; a non-NULL `storage.path` is NUL-terminated.
unsafe fn layout_args<'a>(
    context: *mut kvx_context,
    config: *const kvx_layout_config,
    storage: *const kvx_storage,
    layout_out: *mut *mut kvx_layout,
) -> Result<(&'a Context, LayoutConfig, StorageSpec), i32> {
    // SAFETY: forwarded to the caller.
    let ctx = unsafe { deref(context, "context") }?;
    // SAFETY: as above.
    let config = unsafe { deref(config, "config") }?;
    // SAFETY: as above.
    let storage = unsafe { deref(storage, "storage") }?;
    if layout_out.is_null() {
        return Err(null_argument("layout_out"));
    }
    let config = layout_config(config)?;
    // SAFETY: as above.
    let spec = unsafe { storage_spec(storage) }?;
    Ok((&ctx.inner, config, spec))
}

fn publish(layout: Layout, layout_out: *mut *mut kvx_layout) -> i32 {
    let handle = Box::into_raw(Box::new(kvx_layout {
        inner: Arc::new(layout),
    }));
    // SAFETY: callers check layout_out non-NULL before doing any work.
    unsafe { write_out(layout_out, handle) };
    KVX_STATUS_OK
}

/// Creates a layout over memory kvxfer allocates (zeroed) and frees with the layout.
/// SYSTEM: page-aligned host memory. PINNED: on a context with CUDA, cuMemHostAlloc (portable,
/// device-mapped); without CUDA, mlock'ed memory (raise `ulimit -l` or grant CAP_IPC_LOCK for
/// large pools). DEVICE: cuMemAlloc on storage->device_id (KVX_STATUS_UNAVAILABLE on a context
/// without CUDA). DISK: a file (storage->path NULL: a new unlinked file in the context's disk_dir;
/// a path: created or reused, kept after free, read back by a layout of the same config) on a
/// context with the POSIX NIXL backend (else UNAVAILABLE); errors opening it are IO.
/// On KVX_STATUS_OK *layout_out owns a new layout released with kvx_layout_free(); on error it
/// is untouched. Errors: NULL_ARGUMENT, INVALID_ARGUMENT, UNAVAILABLE, OUT_OF_MEMORY (also
/// when the pool is larger than the memory the kernel reports available: pools are populated
/// when made).
#[unsafe(no_mangle)]
#[must_use]
pub unsafe extern "C" fn kvx_layout_new(
    context: *mut kvx_context,
    config: *const kvx_layout_config,
    storage: *const kvx_storage,
    layout_out: *mut *mut kvx_layout,
) -> i32 {
    ffi_boundary! {
        // SAFETY: the caller passes valid objects or NULL (the function's contract).
        let (ctx, config, spec) =
            try_status!(unsafe { layout_args(context, config, storage, layout_out) });
        let layout = try_core!(ctx.new_layout(config, &spec));
        publish(layout, layout_out)
    }
}

/// Creates a layout over memory the caller owns, the way a runtime registers the KV pool it
/// already has: one region for FULLY_CONTIGUOUS, num_layers regions (one per layer) for the
/// layer-separate kinds. Each region must be large enough and aligned to config->alignment.
/// kvxfer never frees this memory; the caller keeps it valid until the layout and every transfer
/// using it are freed. DEVICE regions must lie inside CUDA allocations of storage->device_id
/// (checked); PINNED regions on a context with CUDA are registered with CUDA (and unregistered
/// with the layout) unless CUDA already knows them. DISK: UNAVAILABLE (kvx_layout_new makes
/// disk layouts, over a file).
/// On error *layout_out is untouched.
#[unsafe(no_mangle)]
#[must_use]
pub unsafe extern "C" fn kvx_layout_wrap(
    context: *mut kvx_context,
    config: *const kvx_layout_config,
    storage: *const kvx_storage,
    regions: *const kvx_memory,
    n_regions: usize,
    layout_out: *mut *mut kvx_layout,
) -> i32 {
    ffi_boundary! {
        // SAFETY: the caller passes valid objects or NULL (the function's contract).
        let (ctx, config, spec) =
            try_status!(unsafe { layout_args(context, config, storage, layout_out) });
        // SAFETY: `regions` points to n_regions entries (the function's contract).
        let regions = try_status!(unsafe { slice(regions, n_regions, "regions") });
        let regions: Vec<Region> = regions
            .iter()
            .map(|m| Region { addr: m.addr, len: m.size })
            .collect();
        let layout = try_core!(ctx.wrap_layout(config, &spec, &regions));
        publish(layout, layout_out)
    }
}

/// The memory of one (block, layer, outer) piece: its address (file offset for DISK) and size.
/// Errors: NULL_ARGUMENT, OUT_OF_RANGE. On error *region_out is untouched.
#[unsafe(no_mangle)]
#[must_use]
pub unsafe extern "C" fn kvx_layout_region(
    layout: *const kvx_layout,
    block: u64,
    layer: u64,
    outer: u64,
    region_out: *mut kvx_memory,
) -> i32 {
    ffi_boundary! {
        // SAFETY: the caller passes a valid layout or NULL.
        let layout = try_status!(unsafe { deref(layout, "layout") });
        if region_out.is_null() {
            return null_argument("region_out");
        }
        let r = try_core!(layout.inner.region(block, layer, outer));
        // SAFETY: checked non-NULL above.
        unsafe { write_out(region_out, kvx_memory { addr: r.addr, size: r.len }) };
        KVX_STATUS_OK
    }
}

/// Releases a layout handle. Memory kvxfer allocated is freed once no transfer uses it any more;
/// wrapped memory is never freed. NULL is a no-op; freeing twice is undefined behaviour.
/// An exported layout is first revoked at every peer that imported it: each stops new
/// transfers to it at once and acknowledges when its transfers to it finished; this call
/// returns after every acknowledgement, or after 5 s for a peer that does not answer (taken
/// for dead). Once it returned, no peer transfer reads or writes the layout's memory, also
/// where the memory is reused (a peer's transfers to it fail with KVX_STATUS_PEER).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvx_layout_free(layout: *mut kvx_layout) {
    ffi_boundary! {
        if !layout.is_null() {
            // SAFETY: a non-NULL pointer came from kvxfer and is freed once.
            drop(unsafe { Box::from_raw(layout) });
        }
    }
}
