//! kvxfer moves KV-cache blocks of LLM inference between storage tiers (GPU memory, pinned
//! host memory, host memory, disk, other machines) and is linked into C/C++ runtimes through
//! the C ABI in [`ffi`] (`include/kvxfer.h`).
//!
//! Module map (see DESIGN.md):
//! - [`layout`]: layout configs, address arithmetic, index checks;
//! - [`memory`]: storage kinds and allocations;
//! - [`plan`]: the strategy table (the seed), request validation, copy lists, coalescing;
//! - [`exec`]: executors and the context's worker threads;
//! - [`transfer`]: transfer state, completion and stats;
//! - [`context`]: the object a runtime holds;
//! - [`verify`]: fill and checksum for verifying data;
//! - [`ffi`]: the C ABI, translation only.

pub mod context;
pub mod error;
pub mod exec;
pub mod ffi;
pub mod layout;
pub mod memory;
pub mod peer;
pub mod plan;
pub mod transfer;
pub mod verify;

pub use context::{Context, ContextConfig, CopyMode, StorageSpec, TransferOptions};
pub use error::{Error, Result};
pub use layout::{Layout, LayoutConfig, LayoutKind};
pub use memory::StorageKind;
pub use plan::{Capabilities, Location, Plan, Strategy};
pub use transfer::{Transfer, TransferStats};
