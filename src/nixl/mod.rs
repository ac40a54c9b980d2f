//! Platform: NIXL (disk and remote tiers), loaded at run time from NVIDIA's wheel or a system
//! install, and the context's agent with its backends. Nothing here knows what a transfer or a
//! layout is.

mod agent;
mod loader;
mod remote;

pub(crate) use agent::{CONTROL_PREFIX, NixlAgent, NixlRegion};
pub use loader::load;
pub(crate) use remote::RemoteAgent;

bitflags::bitflags! {
    /// NIXL backends a context's agent is made with (`ContextConfig::nixl_backends`); the bits
    /// are those of the C API's `KVX_BACKEND_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Backends: u32 {
        /// UCX: remote peers.
        const UCX = 1;
        /// POSIX files: the disk tier.
        const POSIX = 2;
        /// GPUDirect Storage (cuFile's batch API).
        const GDS = 4;
        /// GPUDirect Storage, one I/O per thread.
        const GDS_MT = 8;
    }
}

impl Backends {
    /// The NIXL plugin name of each backend bit, in the order backends are created.
    pub(crate) const PLUGINS: [(Backends, &'static str); 4] = [
        (Backends::UCX, "UCX"),
        (Backends::POSIX, "POSIX"),
        (Backends::GDS, "GDS"),
        (Backends::GDS_MT, "GDS_MT"),
    ];
}
