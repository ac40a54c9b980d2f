//! Fill and checksum through C.

use super::boundary::{deref, null_argument, slice};
use super::context::kvx_context;
use super::layout::kvx_layout;
use super::status::KVX_STATUS_OK;

/// Writes into each listed block a pattern that depends only on (seed, block id, position in
/// the block). Blocks are checked before anything is written. Must not run while a transfer
/// writes the same blocks. Errors: NULL_ARGUMENT, INVALID_ARGUMENT (layout of another context),
/// OUT_OF_RANGE, UNAVAILABLE (storage kinds this version cannot fill).
#[unsafe(no_mangle)]
#[must_use]
pub unsafe extern "C" fn kvx_layout_fill(
    context: *mut kvx_context,
    layout: *const kvx_layout,
    blocks: *const u64,
    n_blocks: usize,
    seed: u64,
) -> i32 {
    ffi_boundary! {
        // SAFETY: the caller passes valid objects or NULL.
        let ctx = try_status!(unsafe { deref(context, "context") });
        // SAFETY: as above.
        let layout = try_status!(unsafe { deref(layout, "layout") });
        // SAFETY: `blocks` holds n_blocks ids (the function's contract).
        let blocks = try_status!(unsafe { slice(blocks, n_blocks, "blocks") });
        try_core!(ctx.inner.fill(&layout.inner, blocks, seed));
        KVX_STATUS_OK
    }
}

/// Writes checksums_out[i], the checksum of blocks[i] over all its layers in (layer, outer,
/// byte) order: equal content gives an equal checksum in any layout kind or tier.
/// checksums_out must hold n_blocks entries and is written only on success.
#[unsafe(no_mangle)]
#[must_use]
pub unsafe extern "C" fn kvx_layout_checksum(
    context: *mut kvx_context,
    layout: *const kvx_layout,
    blocks: *const u64,
    n_blocks: usize,
    checksums_out: *mut u64,
) -> i32 {
    ffi_boundary! {
        // SAFETY: the caller passes valid objects or NULL.
        let ctx = try_status!(unsafe { deref(context, "context") });
        // SAFETY: as above.
        let layout = try_status!(unsafe { deref(layout, "layout") });
        // SAFETY: `blocks` holds n_blocks ids (the function's contract).
        let blocks = try_status!(unsafe { slice(blocks, n_blocks, "blocks") });
        if checksums_out.is_null() && n_blocks > 0 {
            return null_argument("checksums_out");
        }
        let sums = try_core!(ctx.inner.checksum(&layout.inner, blocks));
        if !sums.is_empty() {
            // SAFETY: checksums_out holds n_blocks == sums.len() entries (the contract).
            unsafe { std::ptr::copy_nonoverlapping(sums.as_ptr(), checksums_out, sums.len()) };
        }
        KVX_STATUS_OK
    }
}
