//! Platform: the CUDA driver through cudarc, loaded at run time (building needs no CUDA toolkit,
//! and a machine without a driver gets `Unavailable` for CUDA storage while everything else
//! works), NVRTC, devices with their streams and pools, caller-stream gates, and what each
//! route has been moving per microsecond. Nothing here knows what a transfer or a layout is.

mod device;
mod driver;
mod gate;
mod ipc;
mod module;
pub(crate) mod nvrtc;
mod pace;

pub use device::CudaDevice;
pub(crate) use device::{BatchApi, Signals, TableBuffer};
pub use driver::symbol;
pub(crate) use driver::{check, driver};
pub(crate) use gate::StreamGate;
#[cfg(test)]
pub(crate) use ipc::HANDLE_LEN;
pub use ipc::same_host_ipc;
pub(crate) use ipc::{IpcHandle, ProcessId, ProcessWatch, host_id, ordinal_of, this_process};
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

/// What the CUDA driver reports: its version (e.g. 13000 for 13.0) and each device's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaInfo {
    pub driver_version: i32,
    pub devices: Vec<String>,
}

/// The driver and its devices; `Err(Unavailable)` says why there are none.
pub fn cuda_info() -> crate::Result<CudaInfo> {
    let d = driver()?;
    let devices = (0..d.device_count)
        .map(|i| {
            let mut dev = 0;
            let mut name = [0 as std::ffi::c_char; 256];
            // SAFETY: the driver is loaded and `i` is in range; the buffer holds 256 bytes.
            let ok = unsafe {
                cudarc::driver::sys::cuDeviceGet(&mut dev, i)
                    == cudarc::driver::sys::CUresult::CUDA_SUCCESS
                    && cudarc::driver::sys::cuDeviceGetName(name.as_mut_ptr(), 256, dev)
                        == cudarc::driver::sys::CUresult::CUDA_SUCCESS
            };
            if ok {
                // SAFETY: the driver wrote a NUL-terminated name into the buffer.
                unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
                    .to_string_lossy()
                    .into_owned()
            } else {
                format!("device {i}")
            }
        })
        .collect();
    Ok(CudaInfo {
        driver_version: d.version,
        devices,
    })
}

/// Where NVRTC (which builds kvxfer's copy kernel) is loaded from, or why it is not found.
pub fn nvrtc_location() -> crate::Result<String> {
    nvrtc::location()
}

/// How many CUDA devices this machine has; `Err(Unavailable)` says why there are none (no
/// driver, no device).
pub fn device_count() -> crate::Result<i32> {
    driver().map(|d| d.device_count)
}
