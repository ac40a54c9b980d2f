//! NIXL (disk and remote tiers), loaded at run time from NVIDIA's wheel or a system install.

mod agent;
pub mod loader;
pub mod xfer;

pub use agent::NixlAgent;
