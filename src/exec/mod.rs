//! Executors: how a copy list is carried out. Host ↔ host copies run on the context's worker
//! threads; CUDA, NIXL and two-hop executors join with the GPU and NIXL tiers.

pub mod memcpy;
pub mod workers;
