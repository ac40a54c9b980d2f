//! Status codes, error messages and the version.

use std::ffi::c_char;

use crate::error::Error;

/// Success.
pub const KVX_STATUS_OK: i32 = 0;
/// The operation has not finished yet (poll, next_notification).
pub const KVX_STATUS_PENDING: i32 = 1;
/// A required pointer argument was NULL.
pub const KVX_STATUS_NULL_ARGUMENT: i32 = -1;
/// An argument is not acceptable: unknown enum value, bad size, mismatched layouts.
pub const KVX_STATUS_INVALID_ARGUMENT: i32 = -2;
/// A block, layer, outer or region index is outside its object.
pub const KVX_STATUS_OUT_OF_RANGE: i32 = -3;
/// The planner refuses this pair of storage locations.
pub const KVX_STATUS_UNSUPPORTED: i32 = -4;
/// The feature is not available on this machine or in this version.
pub const KVX_STATUS_UNAVAILABLE: i32 = -5;
/// Memory could not be allocated or page-locked.
pub const KVX_STATUS_OUT_OF_MEMORY: i32 = -6;
/// A file or operating-system I/O call failed.
pub const KVX_STATUS_IO: i32 = -7;
/// A CUDA driver call failed.
pub const KVX_STATUS_CUDA: i32 = -8;
/// A NIXL call failed.
pub const KVX_STATUS_NIXL: i32 = -9;
/// A wait ran out of time; the operation keeps running.
pub const KVX_STATUS_TIMEOUT: i32 = -10;
/// A remote peer is malformed, unknown or gone.
pub const KVX_STATUS_PEER: i32 = -11;
/// kvxfer caught an internal panic; the call did not complete.
pub const KVX_STATUS_PANIC: i32 = -99;

pub(crate) fn status_of(e: &Error) -> i32 {
    match e {
        Error::InvalidArgument(_) => KVX_STATUS_INVALID_ARGUMENT,
        Error::OutOfRange(_) => KVX_STATUS_OUT_OF_RANGE,
        Error::Unsupported(_) => KVX_STATUS_UNSUPPORTED,
        Error::Unavailable(_) => KVX_STATUS_UNAVAILABLE,
        Error::OutOfMemory(_) => KVX_STATUS_OUT_OF_MEMORY,
        Error::Io(_) => KVX_STATUS_IO,
        Error::Cuda(_) => KVX_STATUS_CUDA,
        Error::Nixl(_) => KVX_STATUS_NIXL,
        Error::Timeout(_) => KVX_STATUS_TIMEOUT,
        Error::Peer(_) => KVX_STATUS_PEER,
        Error::Internal(_) => KVX_STATUS_PANIC,
    }
}

/// The name of a status code, e.g. "KVX_STATUS_OK"; "KVX_STATUS_UNKNOWN" for other values.
/// The string is static: never NULL, do not free. Thread-safe.
#[unsafe(no_mangle)]
pub extern "C" fn kvx_status_name(status: i32) -> *const c_char {
    name_of(status).as_ptr()
}

/// The name of a status, as kvx_status_name gives it.
pub(crate) fn name_of(status: i32) -> &'static std::ffi::CStr {
    match status {
        KVX_STATUS_OK => c"KVX_STATUS_OK",
        KVX_STATUS_PENDING => c"KVX_STATUS_PENDING",
        KVX_STATUS_NULL_ARGUMENT => c"KVX_STATUS_NULL_ARGUMENT",
        KVX_STATUS_INVALID_ARGUMENT => c"KVX_STATUS_INVALID_ARGUMENT",
        KVX_STATUS_OUT_OF_RANGE => c"KVX_STATUS_OUT_OF_RANGE",
        KVX_STATUS_UNSUPPORTED => c"KVX_STATUS_UNSUPPORTED",
        KVX_STATUS_UNAVAILABLE => c"KVX_STATUS_UNAVAILABLE",
        KVX_STATUS_OUT_OF_MEMORY => c"KVX_STATUS_OUT_OF_MEMORY",
        KVX_STATUS_IO => c"KVX_STATUS_IO",
        KVX_STATUS_CUDA => c"KVX_STATUS_CUDA",
        KVX_STATUS_NIXL => c"KVX_STATUS_NIXL",
        KVX_STATUS_TIMEOUT => c"KVX_STATUS_TIMEOUT",
        KVX_STATUS_PEER => c"KVX_STATUS_PEER",
        KVX_STATUS_PANIC => c"KVX_STATUS_PANIC",
        _ => c"KVX_STATUS_UNKNOWN",
    }
}

/// The detail message of the last call that failed on this thread, "" if none has.
/// Successful calls leave it unchanged. Never NULL; valid until the next kvxfer call that fails
/// on this thread; do not free.
#[unsafe(no_mangle)]
pub extern "C" fn kvx_last_error() -> *const c_char {
    ffi_boundary! { super::boundary::last_error_ptr() }
}

/// The library version, e.g. "0.1.0" (also KVX_VERSION_MAJOR/MINOR/PATCH). Static; do not free.
#[unsafe(no_mangle)]
pub extern "C" fn kvx_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}
