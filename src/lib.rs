//! kvxfer moves KV-cache blocks of LLM inference between storage tiers (GPU memory, pinned
//! host memory, host memory, disk, other machines) and is linked into C/C++ runtimes through
//! its C ABI (`include/kvxfer.h`, made from `ffi/`). This crate's Rust API is the small set of
//! types re-exported below; docs/ARCHITECTURE.md shows how the modules fit together.
//!
//! Modules, lowest first (a module imports only those above it):
//! - `error`: the one error enum, mapped 1:1 onto `KVX_STATUS_*`;
//! - `cuda`, `nixl`: the platform (driver, NVRTC, devices and streams; NIXL's loader and agent);
//! - `memory`: storage kinds and allocations; `layout`: configs, address arithmetic, checks;
//! - `plan`: the strategy table (the seed), request validation, copy lists;
//! - `options`: plain config, option and stats types;
//! - `transfer`: the transfer handle and its completion;
//! - `exec`: the executors and `exec::dispatch`;
//! - `peer`: the export format; `verify`: fill and checksum;
//! - `context`: the object a runtime holds; `ffi`: the C ABI, translation only.

mod context;
mod cuda;
mod error;
mod exec;
// The C ABI: its functions are exported by name, its constants reach C through the header
// (cbindgen reads them), so Rust itself uses neither.
#[allow(dead_code)]
mod ffi;
mod layout;
mod log;
mod memory;
mod metrics;
mod nixl;
mod options;
mod peer;
mod plan;
mod transfer;
mod verify;

pub use context::Context;
pub use cuda::{CudaDevice, CudaInfo, cuda_info, device_count, nvrtc_location, same_host_ipc};
pub use error::{Error, Result};
pub use layout::{HeadOrder, Heads, Layout, LayoutConfig, LayoutKind};
pub use memory::{IpcFallback, Region, StorageKind};
pub use nixl::Backends;
pub use options::{
    ContextConfig, CopyMode, Mechanism, StorageSpec, TransferOptions, TransferStats,
};
pub use peer::{Peer, PeerKey};
pub use plan::{Capabilities, Location, Plan, Strategy, select};
pub use transfer::Transfer;

/// Sends kvxfer's log lines to stderr as far as the environment variable `KVX_LOG` lets them
/// through (env-filter syntax: `info`, `kvxfer=debug`, ...), by installing kvxfer's
/// subscriber as the process's default unless it has one. The C ABI does this by itself; a
/// Rust program calls it, or installs its own `tracing` subscriber.
pub fn log_from_env() {
    log::install();
}

/// Loads NIXL now, as a context with NIXL backends would: the folder it was loaded from, or
/// `Unavailable` with how to install it.
pub fn load_nixl() -> Result<&'static str> {
    nixl::load()
}

/// The raw mechanisms `kvxfer bench` measures kvxfer against, in the same process: copy-engine
/// batches, a host memcpy, host allocations. Not a stable API: it follows what the benchmarks
/// need.
pub mod baseline {
    pub use crate::cuda::symbol as cuda_symbol;
    pub use crate::exec::cuda::copy::Loc;
    pub use crate::memory::HostAllocation;
    pub use crate::plan::CopyOp;

    /// Queues `copies` on `dev`'s copy engines exactly as the COPY_ENGINE mode does
    /// (`cuMemcpyBatchAsync` where the driver has it), with each side's location as a hint.
    ///
    /// # Safety
    /// `stream` is a live stream of `dev`'s context (bound on this thread), and every copy is a
    /// range of memory that stays valid until the stream has passed this work.
    pub unsafe fn copy_engine_batch(
        dev: &crate::CudaDevice,
        stream: cudarc::driver::sys::CUstream,
        src: Loc,
        dst: Loc,
        copies: &[CopyOp],
    ) -> crate::Result<()> {
        // SAFETY: forwarded to the caller.
        unsafe { crate::exec::cuda::copy::enqueue_at(dev, stream, src, dst, copies) }
    }

    /// PTX of CUDA C `source` for `dev`'s architecture, compiled with the NVRTC kvxfer loads
    /// (for the benches' own kernels, e.g. the compute load of `bench --gpu --busy`).
    pub fn compile_ptx(
        dev: &crate::CudaDevice,
        name: &str,
        source: &str,
    ) -> crate::Result<std::ffi::CString> {
        let (major, minor) = dev.compute_capability;
        crate::cuda::nvrtc::compile_ptx(source, name, &format!("compute_{major}{minor}"))
    }

    /// The device's streaming multiprocessors.
    pub fn sm_count(dev: &crate::CudaDevice) -> u32 {
        dev.sm_count
    }

    /// Copies every entry on the calling thread, as one share of a host transfer does
    /// (`streaming`: non-temporal stores, as kvxfer uses for large transfers).
    ///
    /// # Safety
    /// Every range is valid host memory for its length; no destination overlaps a source or
    /// another destination, and nothing else touches them during the call.
    pub unsafe fn host_copy(copies: &[CopyOp], streaming: bool) {
        // SAFETY: forwarded to the caller.
        unsafe { crate::exec::memcpy::copy_all(copies, streaming) }
    }
}

/// The peer-export format for the fuzz targets (`fuzz/`): decode, encode, and sealing arbitrary
/// bytes into a valid header so that the fuzzer reaches the checks behind it.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    pub use crate::peer::PeerBlob;

    /// `body` behind a valid header (magic, version, length, checksum) and, with `key`, its
    /// MAC.
    pub fn seal(body: &[u8], key: Option<&crate::PeerKey>) -> crate::Result<Vec<u8>> {
        crate::peer::seal(body, key)
    }
}
