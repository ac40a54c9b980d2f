//! Logging: where kvxfer's log lines go.

use std::ffi::{c_char, c_void};

use super::boundary::fail;
use super::status::KVX_STATUS_OK;
use crate::error::Error;
use crate::log;

/// Log level: errors only.
pub const KVX_LOG_LEVEL_ERROR: i32 = 1;
/// Log level: warnings (fallbacks, peers taken for dead) and errors.
pub const KVX_LOG_LEVEL_WARN: i32 = 2;
/// Log level: what was loaded from where, backends, contexts; and the above.
pub const KVX_LOG_LEVEL_INFO: i32 = 3;
/// Log level: every plan and mechanism choice, every refused call; and the above.
pub const KVX_LOG_LEVEL_DEBUG: i32 = 4;
/// Log level: everything.
pub const KVX_LOG_LEVEL_TRACE: i32 = 5;

/// A runtime's logger: the level (KVX_LOG_LEVEL_*), the module that logged (e.g.
/// "kvxfer::nixl::loader"), the message, and the `user` pointer given with it. The strings
/// live for the call only. It may be called from any thread, also from kvxfer's own, and must
/// not call back into kvxfer.
pub type kvx_log_fn = Option<
    unsafe extern "C" fn(
        level: i32,
        target: *const c_char,
        message: *const c_char,
        user: *mut c_void,
    ),
>;

/// Sends kvxfer's log lines of at most `max_level` (KVX_LOG_LEVEL_*) to `log_fn`, with `user`;
/// `log_fn` NULL sends them back to stderr, filtered by the environment variable KVX_LOG
/// (env-filter syntax: "info", "kvxfer=debug", ...; unset: nothing). Applies to every
/// context of the process from the next line on. Errors: INVALID_ARGUMENT (max_level outside
/// 1..5).
#[unsafe(no_mangle)]
#[must_use]
pub unsafe extern "C" fn kvx_set_log_callback(
    log_fn: kvx_log_fn,
    max_level: i32,
    user: *mut c_void,
) -> i32 {
    ffi_boundary! {
        let Some(max) = log::level_of(max_level) else {
            return fail(Error::InvalidArgument(format!(
                "max_level {max_level} is not a log level (1 error .. 5 trace)"
            )));
        };
        log::set_callback(log_fn, max, user as usize);
        KVX_STATUS_OK
    }
}
