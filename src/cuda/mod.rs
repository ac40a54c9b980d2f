//! Platform: the CUDA driver through cudarc, loaded at run time (building needs no CUDA toolkit,
//! and a machine without a driver gets `Unavailable` for CUDA storage while everything else
//! works), NVRTC, devices with their streams and pools, caller-stream gates, and what each
//! route has been moving per microsecond. Nothing here knows what a transfer or a layout is.

mod device;
mod driver;
mod gate;
mod module;
mod nvrtc;
mod pace;

pub use device::CudaDevice;
pub(crate) use device::{BatchApi, TableBuffer};
pub use driver::symbol;
pub(crate) use driver::{check, driver};
pub(crate) use gate::StreamGate;
pub(crate) use module::{Entry, Module};
pub(crate) use pace::Route;

/// Which way bytes cross; each direction has its own stream so H2D and D2H overlap on the two
/// copy engines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    HostToDevice = 0,
    DeviceToHost = 1,
    DeviceToDevice = 2,
}

/// How many CUDA devices this machine has; `Err(Unavailable)` says why there are none (no
/// driver, no device).
pub fn device_count() -> crate::Result<i32> {
    driver().map(|d| d.device_count)
}
