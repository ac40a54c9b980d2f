//! The C boundary: the thread's last error, the panic guard around every exported body, and
//! the pointer checks every entry point shares.

use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char};

use super::status::{KVX_STATUS_NULL_ARGUMENT, KVX_STATUS_PANIC, status_of};
use crate::error::Error;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

pub(crate) fn set_last_error(msg: impl ToString) {
    let c = CString::new(msg.to_string().replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Points at this thread's last message; valid until the next failing call on the thread.
pub(crate) fn last_error_ptr() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Records `e` as the thread's last error and returns its status.
pub(crate) fn fail(e: Error) -> i32 {
    let s = status_of(&e);
    tracing::debug!(status = ?super::status::name_of(s), "refused: {e}");
    set_last_error(e);
    s
}

pub(crate) fn null_argument(name: &str) -> i32 {
    set_last_error(format!("{name} is NULL"));
    KVX_STATUS_NULL_ARGUMENT
}

/// What an exported function returns when its body panicked.
pub(crate) trait OnPanic {
    fn on_panic() -> Self;
}
impl OnPanic for i32 {
    fn on_panic() -> Self {
        KVX_STATUS_PANIC
    }
}
impl OnPanic for () {
    fn on_panic() {}
}
impl OnPanic for usize {
    fn on_panic() -> Self {
        0
    }
}
impl OnPanic for *const c_char {
    fn on_panic() -> Self {
        c"".as_ptr()
    }
}

/// Runs an exported function's body under `catch_unwind`. It wraps the body, not the `fn`
/// item, so cbindgen still sees a plain `extern "C" fn`.
macro_rules! ffi_boundary {
    ($($body:tt)*) => {
        match ::std::panic::catch_unwind(::std::panic::AssertUnwindSafe(|| { $($body)* })) {
            Ok(v) => v,
            Err(_) => {
                $crate::ffi::boundary::set_last_error("internal panic inside kvxfer");
                $crate::ffi::boundary::OnPanic::on_panic()
            }
        }
    };
}

/// `try_status!(expr)` unwraps `Result<T, i32>` or returns the status.
macro_rules! try_status {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(status) => return status,
        }
    };
}

/// Unwraps a core `Result`, or records the error and returns its status.
macro_rules! try_core {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return $crate::ffi::boundary::fail(e),
        }
    };
}

/// A shared reference from a pointer the caller passed, or NULL_ARGUMENT.
///
/// # Safety
/// A non-NULL `p` must point to a valid `T` that outlives the returned reference.
pub(crate) unsafe fn deref<'a, T>(p: *const T, name: &str) -> Result<&'a T, i32> {
    // SAFETY: forwarded to the caller.
    unsafe { p.as_ref() }.ok_or_else(|| null_argument(name))
}

/// A slice of `n` elements; NULL is accepted only when `n` is 0.
///
/// # Safety
/// A non-NULL `p` must point to `n` valid elements that outlive the slice.
pub(crate) unsafe fn slice<'a, T>(p: *const T, n: usize, name: &str) -> Result<&'a [T], i32> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(null_argument(name));
    }
    // SAFETY: forwarded to the caller; non-NULL and n > 0 checked above.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// An optional NUL-terminated UTF-8 string; NULL gives `None`.
///
/// # Safety
/// A non-NULL `p` must point to a NUL-terminated string.
pub(crate) unsafe fn opt_str(p: *const c_char, name: &str) -> Result<Option<String>, i32> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: forwarded to the caller.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map(|s| Some(s.to_owned()))
        .map_err(|_| fail(Error::InvalidArgument(format!("{name} is not valid UTF-8"))))
}

/// A `uint8_t` flag that must be 0 or 1.
pub(crate) fn flag(v: u8, name: &str) -> Result<bool, i32> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(fail(Error::InvalidArgument(format!(
            "{name} must be 0 or 1, got {v}"
        )))),
    }
}

/// Writes `v` through an output pointer the caller passed (checked non-NULL beforehand).
///
/// # Safety
/// `out` must be valid for writes of `T`.
pub(crate) unsafe fn write_out<T>(out: *mut T, v: T) {
    // SAFETY: forwarded to the caller.
    unsafe { out.write(v) }
}
