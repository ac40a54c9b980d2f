//! The planner through C: plans for two layouts or two storage kinds, strategy names.

use std::ffi::c_char;

use super::boundary::{deref, flag, null_argument, write_out};
use super::context::kvx_context;
use super::layout::kvx_layout;
use super::status::KVX_STATUS_OK;
use crate::memory::StorageKind;
use crate::plan::{Location, Plan, Strategy};

/// CPU memcpy between host kinds.
pub const KVX_STRATEGY_MEMCPY: i32 = 0;
/// Asynchronous CUDA copy, pinned host to device.
pub const KVX_STRATEGY_CUDA_ASYNC_H2D: i32 = 1;
/// Asynchronous CUDA copy, device to pinned host.
pub const KVX_STRATEGY_CUDA_ASYNC_D2H: i32 = 2;
/// Asynchronous CUDA copy between devices.
pub const KVX_STRATEGY_CUDA_ASYNC_D2D: i32 = 3;
/// Blocking CUDA copy, pageable host to device.
pub const KVX_STRATEGY_CUDA_BLOCKING_H2D: i32 = 4;
/// Blocking CUDA copy, device to pageable host.
pub const KVX_STRATEGY_CUDA_BLOCKING_D2H: i32 = 5;
/// NIXL read (local is the destination).
pub const KVX_STRATEGY_NIXL_READ: i32 = 6;
/// NIXL write (local is the source).
pub const KVX_STRATEGY_NIXL_WRITE: i32 = 7;
/// NIXL write with local and remote descriptor lists swapped.
pub const KVX_STRATEGY_NIXL_WRITE_FLIPPED: i32 = 8;
/// NIXL read with local and remote descriptor lists swapped (host memory stays local).
pub const KVX_STRATEGY_NIXL_READ_FLIPPED: i32 = 9;
/// No strategy (the second hop of a direct plan).
pub const KVX_STRATEGY_INVALID: i32 = 10;

/// One hop.
pub const KVX_PLAN_KIND_DIRECT: i32 = 0;
/// Two hops through a bounce buffer.
pub const KVX_PLAN_KIND_TWO_HOP: i32 = 1;

/// How a transfer is carried out. DIRECT: `first` is the strategy, bounce_storage is -1 and
/// `second` is KVX_STRATEGY_INVALID. TWO_HOP: first hop to a bounce buffer of kind
/// bounce_storage (KVX_STORAGE_KIND_*), then the second hop.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct kvx_plan {
    /// KVX_PLAN_KIND_*.
    pub kind: i32,
    /// KVX_STRATEGY_*.
    pub first: i32,
    pub bounce_storage: i32,
    /// KVX_STRATEGY_*.
    pub second: i32,
}

impl From<Plan> for kvx_plan {
    fn from(p: Plan) -> Self {
        match p {
            Plan::Direct(s) => kvx_plan {
                kind: KVX_PLAN_KIND_DIRECT,
                first: s as i32,
                bounce_storage: -1,
                second: KVX_STRATEGY_INVALID,
            },
            Plan::TwoHop {
                first,
                bounce,
                second,
            } => kvx_plan {
                kind: KVX_PLAN_KIND_TWO_HOP,
                first: first as i32,
                bounce_storage: bounce as i32,
                second: second as i32,
            },
        }
    }
}

/// The plan a transfer from `src` to `dst` would follow under the context's capabilities.
/// Errors: NULL_ARGUMENT, INVALID_ARGUMENT (a layout of another context), UNSUPPORTED (the pair
/// is refused; the message names it). On error *plan_out is untouched.
#[unsafe(no_mangle)]
#[must_use]
pub unsafe extern "C" fn kvx_plan_transfer(
    context: *const kvx_context,
    src: *const kvx_layout,
    dst: *const kvx_layout,
    plan_out: *mut kvx_plan,
) -> i32 {
    ffi_boundary! {
        // SAFETY: the caller passes valid objects or NULL.
        let ctx = try_status!(unsafe { deref(context, "context") });
        // SAFETY: as above.
        let src = try_status!(unsafe { deref(src, "src") });
        // SAFETY: as above.
        let dst = try_status!(unsafe { deref(dst, "dst") });
        if plan_out.is_null() {
            return null_argument("plan_out");
        }
        let plan = try_core!(ctx.inner.plan(&src.inner, &dst.inner));
        // SAFETY: checked non-NULL above.
        unsafe { write_out(plan_out, plan.into()) };
        KVX_STATUS_OK
    }
}

/// The plan between two storage kinds (KVX_STORAGE_KIND_*), each local (0) or on a remote peer
/// (1), under the context's capabilities. Errors: NULL_ARGUMENT, INVALID_ARGUMENT (unknown kind,
/// flag other than 0/1), UNSUPPORTED (refused pair, named in the message). On error *plan_out is
/// untouched.
#[unsafe(no_mangle)]
#[must_use]
pub unsafe extern "C" fn kvx_plan_kinds(
    context: *const kvx_context,
    src_kind: i32,
    src_remote: u8,
    dst_kind: i32,
    dst_remote: u8,
    plan_out: *mut kvx_plan,
) -> i32 {
    ffi_boundary! {
        // SAFETY: the caller passes a valid context or NULL.
        let ctx = try_status!(unsafe { deref(context, "context") });
        if plan_out.is_null() {
            return null_argument("plan_out");
        }
        let src = Location {
            kind: try_core!(StorageKind::try_from(src_kind)),
            remote: try_status!(flag(src_remote, "src_remote")),
        };
        let dst = Location {
            kind: try_core!(StorageKind::try_from(dst_kind)),
            remote: try_status!(flag(dst_remote, "dst_remote")),
        };
        let plan = try_core!(ctx.inner.plan_locations(src, dst));
        // SAFETY: checked non-NULL above.
        unsafe { write_out(plan_out, plan.into()) };
        KVX_STATUS_OK
    }
}

/// The name of a strategy, e.g. "KVX_STRATEGY_NIXL_WRITE"; "KVX_STRATEGY_UNKNOWN" for other
/// values. Static; never NULL; do not free.
#[unsafe(no_mangle)]
pub extern "C" fn kvx_strategy_name(strategy: i32) -> *const c_char {
    let s: &'static std::ffi::CStr = match Strategy::try_from(strategy) {
        Ok(Strategy::Memcpy) => c"KVX_STRATEGY_MEMCPY",
        Ok(Strategy::CudaAsyncH2D) => c"KVX_STRATEGY_CUDA_ASYNC_H2D",
        Ok(Strategy::CudaAsyncD2H) => c"KVX_STRATEGY_CUDA_ASYNC_D2H",
        Ok(Strategy::CudaAsyncD2D) => c"KVX_STRATEGY_CUDA_ASYNC_D2D",
        Ok(Strategy::CudaBlockingH2D) => c"KVX_STRATEGY_CUDA_BLOCKING_H2D",
        Ok(Strategy::CudaBlockingD2H) => c"KVX_STRATEGY_CUDA_BLOCKING_D2H",
        Ok(Strategy::NixlRead) => c"KVX_STRATEGY_NIXL_READ",
        Ok(Strategy::NixlWrite) => c"KVX_STRATEGY_NIXL_WRITE",
        Ok(Strategy::NixlWriteFlipped) => c"KVX_STRATEGY_NIXL_WRITE_FLIPPED",
        Ok(Strategy::NixlReadFlipped) => c"KVX_STRATEGY_NIXL_READ_FLIPPED",
        Ok(Strategy::Invalid) => c"KVX_STRATEGY_INVALID",
        Err(_) => c"KVX_STRATEGY_UNKNOWN",
    };
    s.as_ptr()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_match_the_core_enum() {
        let pairs = [
            (KVX_STRATEGY_MEMCPY, Strategy::Memcpy),
            (KVX_STRATEGY_CUDA_ASYNC_H2D, Strategy::CudaAsyncH2D),
            (KVX_STRATEGY_CUDA_ASYNC_D2H, Strategy::CudaAsyncD2H),
            (KVX_STRATEGY_CUDA_ASYNC_D2D, Strategy::CudaAsyncD2D),
            (KVX_STRATEGY_CUDA_BLOCKING_H2D, Strategy::CudaBlockingH2D),
            (KVX_STRATEGY_CUDA_BLOCKING_D2H, Strategy::CudaBlockingD2H),
            (KVX_STRATEGY_NIXL_READ, Strategy::NixlRead),
            (KVX_STRATEGY_NIXL_WRITE, Strategy::NixlWrite),
            (KVX_STRATEGY_NIXL_WRITE_FLIPPED, Strategy::NixlWriteFlipped),
            (KVX_STRATEGY_NIXL_READ_FLIPPED, Strategy::NixlReadFlipped),
            (KVX_STRATEGY_INVALID, Strategy::Invalid),
        ];
        for (c, s) in pairs {
            assert_eq!(c, s as i32);
        }
    }
}
