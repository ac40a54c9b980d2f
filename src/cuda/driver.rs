//! Loading the CUDA driver at run time. The library is probed before any cudarc call, because
//! cudarc's loader panics when it cannot find libcuda; a machine without a driver gets
//! `Unavailable` instead.

use std::ffi::CStr;
use std::sync::OnceLock;

use cudarc::driver::sys::{self, CUresult};

use crate::error::{Error, Result};

/// What the driver reported when it was loaded.
#[derive(Debug, Clone, Copy)]
pub struct Driver {
    /// `cuDriverGetVersion`, e.g. 13000 for CUDA 13.0.
    pub version: i32,
    pub device_count: i32,
}

static DRIVER: OnceLock<std::result::Result<Driver, String>> = OnceLock::new();

/// The loaded and initialised driver, or why there is none (`Unavailable`).
pub fn driver() -> Result<&'static Driver> {
    DRIVER
        .get_or_init(|| {
            let d = load();
            match &d {
                Ok(d) => tracing::info!(
                    "CUDA driver {}.{} loaded, {} device(s)",
                    d.version / 1000,
                    d.version % 1000 / 10,
                    d.device_count
                ),
                Err(why) => tracing::info!("no CUDA: {why}"),
            }
            d
        })
        .as_ref()
        .map_err(|why| Error::Unavailable(why.clone()))
}

fn load() -> std::result::Result<Driver, String> {
    // SAFETY: only tries to open candidate library names; no CUDA call is made.
    if !unsafe { sys::is_culib_present() } {
        return Err(
            "no CUDA driver: libcuda.so.1 was not found (this machine has no NVIDIA \
                    driver, or it is not on the library path)"
                .into(),
        );
    }
    // SAFETY: the library is present; cuInit is the first call the driver API requires.
    let r = unsafe { sys::cuInit(0) };
    if r == CUresult::CUDA_ERROR_NO_DEVICE {
        return Err("the CUDA driver found no device".into());
    }
    check(r, "cuInit").map_err(|e| e.to_string())?;
    let mut version = 0;
    // SAFETY: the driver is initialised; the out pointer is a live local.
    check(
        unsafe { sys::cuDriverGetVersion(&mut version) },
        "cuDriverGetVersion",
    )
    .map_err(|e| e.to_string())?;
    let mut device_count = 0;
    // SAFETY: as above.
    check(
        unsafe { sys::cuDeviceGetCount(&mut device_count) },
        "cuDeviceGetCount",
    )
    .map_err(|e| e.to_string())?;
    if device_count == 0 {
        return Err("the CUDA driver found no device".into());
    }
    Ok(Driver {
        version,
        device_count,
    })
}

/// Turns a driver result into `Error::Cuda` naming the call. Only used once the driver loaded.
pub fn check(r: CUresult, what: &str) -> Result<()> {
    if r == CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut name: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: the driver is loaded (callers only run after `driver()` succeeded); the out
    // pointer is a live local, and the driver returns a static string or leaves it NULL.
    let known = unsafe { sys::cuGetErrorName(r, &mut name) } == CUresult::CUDA_SUCCESS;
    let name = if known && !name.is_null() {
        // SAFETY: a NUL-terminated static string from the driver.
        unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned()
    } else {
        format!("{r:?}")
    };
    Err(Error::Cuda(format!("{what} failed: {name}")))
}

/// The address of `symbol` in libcuda, for entry points newer than the bindings kvxfer is
/// built against; `None` when this driver lacks it.
pub fn symbol(symbol: &CStr) -> Option<*mut std::ffi::c_void> {
    // SAFETY: RTLD_NOLOAD only finds a library already loaded (the driver, after `driver()`),
    // so the handle stays valid after dlclose drops this extra reference; dlsym has no side
    // effects.
    unsafe {
        let lib = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
        if lib.is_null() {
            return None;
        }
        let f = libc::dlsym(lib, symbol.as_ptr());
        libc::dlclose(lib);
        (!f.is_null()).then_some(f)
    }
}
