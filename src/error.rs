//! The one error type of the core. Each variant maps onto exactly one `KVX_STATUS_*` code
//! (see `ffi::status`), and carries the human-readable detail `kvx_last_error` returns.

/// Why an operation failed. The message says what was wrong and, where it helps, what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A value the caller passed is not acceptable (bad enum, bad size, mismatched layouts, ...).
    #[error("{0}")]
    InvalidArgument(String),
    /// An index (block, layer, outer, region) is outside the object it refers to.
    #[error("{0}")]
    OutOfRange(String),
    /// The planner refuses this pair of locations.
    #[error("{0}")]
    Unsupported(String),
    /// The feature exists in the API but not on this machine or in this build.
    #[error("{0}")]
    Unavailable(String),
    /// Memory could not be allocated or locked.
    #[error("{0}")]
    OutOfMemory(String),
    /// A file or operating-system I/O call failed.
    #[error("{0}")]
    Io(String),
    /// A CUDA driver call failed.
    #[error("{0}")]
    Cuda(String),
    /// A NIXL call failed.
    #[error("{0}")]
    Nixl(String),
    /// A wait ran out of time; the operation is still running.
    #[error("{0}")]
    Timeout(String),
    /// A remote peer is malformed, unknown or gone.
    #[error("{0}")]
    Peer(String),
    /// A bug inside kvxfer (a caught panic); the operation did not complete.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// `bail!(Variant, "fmt", args)` returns `Err(Error::Variant(format!(..)))`.
macro_rules! bail {
    ($variant:ident, $($fmt:tt)*) => {
        return Err($crate::error::Error::$variant(format!($($fmt)*)))
    };
}
pub(crate) use bail;
