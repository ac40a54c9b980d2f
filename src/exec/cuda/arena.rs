//! The copy kernel as the device side of landing arenas in device memory (`DeviceCopier`): the
//! exporter places and gathers its device slots, the importer fills and empties its staging
//! area, one list launch per request on the device-to-device stream, waited for on the
//! calling thread (a 4 MiB slot takes microseconds).

use std::sync::Arc;

use super::{CudaExec, Kernel};
use crate::cuda::{CudaDevice, Direction};
use crate::error::Result;
use crate::memory::{DeviceCopier, Memory, StorageKind};
use crate::plan::CopyOp;

#[derive(Debug)]
pub(crate) struct KernelCopier {
    dev: Arc<CudaDevice>,
    kernel: Arc<Kernel>,
}

impl KernelCopier {
    /// The copier of `cuda`'s device, where its copy kernel has the list entry.
    pub(crate) fn of(cuda: &CudaExec) -> Option<Arc<dyn DeviceCopier>> {
        let dev = cuda.primary.clone();
        let kernel = cuda.kernel(&dev).ok().filter(|k| k.has_list())?;
        Some(Arc::new(Self { dev, kernel }))
    }
}

impl DeviceCopier for KernelCopier {
    fn device_id(&self) -> i32 {
        self.dev.ordinal
    }

    fn allocate(&self, bytes: u64) -> Result<Memory> {
        Memory::allocate_cuda(&self.dev, StorageKind::Device, &[bytes], 4096)
    }

    fn copy(&self, copies: &[(u64, u64, u64)]) -> Result<()> {
        if copies.is_empty() {
            return Ok(());
        }
        let ops: Vec<CopyOp> = copies
            .iter()
            .map(|&(src, dst, len)| CopyOp { src, dst, len })
            .collect();
        self.dev.bind()?;
        let d = Direction::DeviceToDevice;
        let stream = self.dev.stream(d);
        // SAFETY: the stream is this device's; the caller vouches that every range is device
        // memory of this device (an arena, a staging area, a validated layout region) that
        // stays allocated until this returns, which is after the stream passed the copies.
        let (table, _) = unsafe {
            self.kernel
                .enqueue_list(&self.dev, stream, &ops, self.kernel.ctas(d))
        }?;
        let (event, table) = self.dev.record_or_abandon(stream, Some(table))?;
        // Of unknown length: a transfer queued behind it teaches the device's pace nothing.
        let place = self.dev.backlog.queue(d, std::time::Instant::now(), None);
        self.dev
            .wait_recorded(event, table, "a landing arena's device copy")?;
        self.dev.backlog.seen(d, place.number);
        Ok(())
    }
}
