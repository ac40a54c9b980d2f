//! Executors: how a copy list is carried out. Host ↔ host copies run on the context's worker
//! threads; CUDA copies on the device's streams (copy engines or the SM kernel), completed by
//! the CUDA progress engine; NIXL and two-hop executors join with the NIXL tier.

pub mod cuda;
pub mod memcpy;
pub mod nixl;
pub mod two_hop;
pub mod workers;
