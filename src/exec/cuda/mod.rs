//! CUDA through cudarc, loaded at run time: building needs no CUDA toolkit, and a machine
//! without a driver gets `Unavailable` for CUDA storage while everything else works.

pub mod copy;
mod device;
mod driver;
pub mod kernel;
mod nvrtc;
pub(crate) mod pace;
pub(crate) mod progress;

pub use device::{BatchApi, CudaDevice, Direction, TableBuffer};
pub use driver::{Driver, check, driver, symbol};
pub use kernel::{Job as KernelJob, Kernel};
