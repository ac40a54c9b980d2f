//! The CUDA executor: transfers between pinned host memory and devices, and between devices, on
//! the context's device's streams: copy engines (`copy.rs`) or kvxfer's SM copy kernel
//! (`kernel.rs`), completed by the progress engine (`progress.rs`) when their event fires.

pub(crate) mod arena;
mod budget;
pub(crate) mod copy;
mod kernel;
mod progress;
mod submit;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub(crate) use kernel::{Kernel, PreparedList};
pub(crate) use submit::submit;

use crate::cuda::{CudaDevice, Direction, StreamGate};
use crate::error::{Error, Result};
use progress::Progress;

/// The CUDA side of a context: the configured device (its streams carry asynchronous
/// transfers, its progress engine completes them), any other device a layout was made on, and
/// each device's copy kernel. Fields drop in order: the progress engine first (it waits for what
/// is queued), the devices last.
#[derive(Debug)]
pub(crate) struct CudaExec {
    progress: Progress,
    /// The copy kernel by device ordinal, built on first use; `Err` says why it cannot be.
    kernels: Mutex<HashMap<i32, std::result::Result<Arc<Kernel>, String>>>,
    others: Mutex<HashMap<i32, Arc<CudaDevice>>>,
    /// The context's `max_sms` (0 = auto).
    max_sms: u32,
    pub(crate) primary: Arc<CudaDevice>,
}

impl CudaExec {
    /// Opens device `ordinal` and starts its progress engine. The copy kernel is built now
    /// (with its SM budget under `max_sms`) rather than on the first, latency-critical
    /// transfer; if it cannot be built, AUTO falls back to copy engines and says so per
    /// transfer.
    pub(crate) fn open(ordinal: i32, max_sms: u32) -> Result<Self> {
        let primary = CudaDevice::open(ordinal)?;
        let this = Self {
            progress: Progress::new(&primary)?,
            kernels: Mutex::default(),
            others: Mutex::default(),
            max_sms,
            primary,
        };
        let _ = this.kernel(&this.primary);
        Ok(this)
    }

    /// `open` for a context, which works on without CUDA: `Ok(Err(why))` where there is none
    /// to open (`ordinal` -1, no driver, no such device); any other failure is an error.
    pub(crate) fn open_if_any(
        ordinal: i32,
        max_sms: u32,
    ) -> Result<std::result::Result<Self, String>> {
        if ordinal < 0 {
            return Ok(Err("this context was made with cuda_device = -1".into()));
        }
        match Self::open(ordinal, max_sms) {
            Ok(c) => Ok(Ok(c)),
            Err(Error::Unavailable(why)) => Ok(Err(why)),
            Err(e) => Err(e),
        }
    }

    /// The device of `ordinal`, opened on first use.
    pub(crate) fn device(&self, ordinal: i32) -> Result<Arc<CudaDevice>> {
        if ordinal == self.primary.ordinal {
            return Ok(self.primary.clone());
        }
        let mut others = self.others.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = others.get(&ordinal) {
            return Ok(d.clone());
        }
        let d = CudaDevice::open(ordinal)?;
        others.insert(ordinal, d.clone());
        Ok(d)
    }

    /// The copy kernel on `dev`, built on first use; `Err` says why it is unavailable.
    pub(crate) fn kernel(&self, dev: &Arc<CudaDevice>) -> std::result::Result<Arc<Kernel>, String> {
        let mut kernels = self.kernels.lock().unwrap_or_else(|p| p.into_inner());
        kernels
            .entry(dev.ordinal)
            .or_insert_with(|| {
                Kernel::build(dev, self.max_sms).map(Arc::new).map_err(|e| {
                    tracing::warn!(
                        "the copy kernel cannot run on CUDA device {}: {e}; AUTO moves small \
                         fragments with the copy engines",
                        dev.ordinal
                    );
                    e.to_string()
                })
            })
            .clone()
    }

    /// SMs the copy kernel takes on the context's device per direction (host -> device,
    /// device -> host, device -> device); `None` without the kernel.
    pub(crate) fn kernel_sms(&self) -> Option<[u32; 3]> {
        let k = self.kernel(&self.primary).ok()?;
        let sms = |d| k.sms(&self.primary, k.ctas(d));
        Some([
            sms(Direction::HostToDevice),
            sms(Direction::DeviceToHost),
            sms(Direction::DeviceToDevice),
        ])
    }

    /// An event on the caller's stream, after which a transfer must start.
    pub(crate) fn gate(&self, stream: Option<usize>) -> Result<Option<Arc<StreamGate>>> {
        stream
            .map(|s| StreamGate::record(&self.primary, s).map(Arc::new))
            .transpose()
    }

    /// As `gate`, for work on kvxfer's streams only (`StreamGate::for_streams`).
    pub(crate) fn stream_gate(&self, stream: Option<usize>) -> Result<Option<Arc<StreamGate>>> {
        stream
            .map(|s| StreamGate::for_streams(&self.primary, s).map(Arc::new))
            .transpose()
    }
}
