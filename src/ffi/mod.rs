//! The C ABI (`include/kvxfer.h`). This layer only translates: it checks pointers, converts
//! integers to core enums, calls the core and maps errors to `KVX_STATUS_*` with a message for
//! `kvx_last_error()`. No panic crosses it.
//!
//! Conventions: every fallible function returns an `int32_t` status; outputs come last, end in
//! `_out` and are written only on success; `_free(NULL)` is a no-op; objects can be freed in any
//! order; contexts and layouts are thread-safe, a transfer handle is used by one thread at a
//! time.

#![allow(non_camel_case_types)]
#![allow(clippy::missing_safety_doc)] // the safety contract of each function is in the header

#[macro_use]
pub(crate) mod boundary;
pub mod context;
pub mod layout;
pub mod log;
pub mod peer;
pub mod plan;
pub mod status;
pub mod transfer;
pub mod verify;
