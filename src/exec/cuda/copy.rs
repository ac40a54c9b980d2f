//! The CUDA executor: a transfer goes to the copy engines (`cuMemcpyBatchAsync` where the
//! driver has it, else a loop of `cuMemcpyAsync`) or to the SM copy kernel (kernel.rs), chosen
//! per transfer by fragment size and direction.

use cudarc::driver::sys::{self, CUmemLocation, CUmemLocationType, CUstream};

use crate::cuda::{BatchApi, CudaDevice, Direction, check};
use crate::error::{Error, Result, bail};
use crate::options::{CopyMode, Mechanism};
use crate::plan::CopyOp;

/// AUTO sends lists whose average copy is below this to the kernel: copy engines pay a fixed
/// cost per copy that small fragments cannot amortise.
const AUTO_KERNEL_MAX_AVG: u64 = 256 << 10;
/// Copies per batch call.
const BATCH_MAX: usize = 1 << 14;

pub(crate) struct Choice {
    pub(crate) mechanism: Mechanism,
    /// AUTO wanted the kernel but it could not be built or loaded.
    pub(crate) kernel_fallback: bool,
}

/// AUTO's rule: the SM kernel for more than one piece when the pieces average at most
/// AUTO_KERNEL_MAX_AVG bytes, and for all device-to-device work. Copy engines reach a fraction of
/// HBM bandwidth on device-to-device copies of any size short of one huge copy (measured on an
/// H100: 2 MiB copies ~400 GB/s against 1.46 TB/s for one 1 GiB copy).
pub(crate) fn prefers_kernel(direction: Direction, avg_piece: u64, pieces: u64) -> bool {
    pieces > 1 && (avg_piece <= AUTO_KERNEL_MAX_AVG || direction == Direction::DeviceToDevice)
}

/// Chooses the mechanism. `kernel`: the copy kernel of the device, or why there is none;
/// `unit`: bytes of the contiguous pieces the transfer is made of (a whole block between fully
/// contiguous layouts, else one region); `pieces`: how many there are; `reachable`: both sides
/// are memory the SMs can address (device memory of this device, or CUDA-pinned host memory).
pub(crate) fn choose(
    kernel: std::result::Result<&super::Kernel, &str>,
    direction: Direction,
    unit: u64,
    pieces: u64,
    mode: CopyMode,
    reachable: bool,
) -> Result<Choice> {
    let ce = Choice {
        mechanism: Mechanism::CopyEngine,
        kernel_fallback: false,
    };
    match mode {
        CopyMode::CopyEngine => Ok(ce),
        CopyMode::Kernel => {
            if !reachable {
                bail!(
                    InvalidArgument,
                    "copy mode KERNEL needs both layouts in device memory of the context's device \
                     or in CUDA-pinned host memory"
                );
            }
            kernel.map_err(|why| Error::Unavailable(why.to_string()))?;
            Ok(Choice {
                mechanism: Mechanism::Kernel,
                kernel_fallback: false,
            })
        }
        CopyMode::Auto => {
            if !(reachable && prefers_kernel(direction, unit, pieces)) {
                return Ok(ce);
            }
            Ok(match kernel {
                Ok(_) => Choice {
                    mechanism: Mechanism::Kernel,
                    kernel_fallback: false,
                },
                Err(_) => Choice {
                    kernel_fallback: true,
                    ..ce
                },
            })
        }
    }
}

/// Queues `copies` on the copy engines, as the COPY_ENGINE path does (also the raw-batch
/// baseline of `kvxfer bench --gpu`).
///
/// # Safety
/// `stream` is a live stream of `dev`'s context, and every copy is a validated range of memory
/// that stays alive until the stream has passed this work.
pub(crate) unsafe fn enqueue_copy_engine(
    dev: &CudaDevice,
    stream: CUstream,
    direction: Direction,
    copies: &[CopyOp],
) -> Result<()> {
    let here = Loc::Device(dev.ordinal);
    let (src, dst) = match direction {
        Direction::HostToDevice => (Loc::Host, here),
        Direction::DeviceToHost => (here, Loc::Host),
        Direction::DeviceToDevice => (here, here),
    };
    // SAFETY: forwarded to the caller.
    unsafe { enqueue_at(dev, stream, src, dst, copies) }
}

/// Where one side of a copy lives, for the batch API's hints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loc {
    Host,
    Device(i32),
}

impl Loc {
    fn cu(self) -> CUmemLocation {
        match self {
            Loc::Host => CUmemLocation {
                type_: CUmemLocationType::CU_MEM_LOCATION_TYPE_HOST,
                id: 0,
            },
            Loc::Device(id) => CUmemLocation {
                type_: CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
                id,
            },
        }
    }
}

/// As `enqueue_copy_engine`, with each side's location given: device memory of a device other
/// than `dev` (peer copies between two devices, or host copies to another device's memory).
///
/// # Safety
/// As `enqueue_copy_engine`.
pub unsafe fn enqueue_at(
    dev: &CudaDevice,
    stream: CUstream,
    src: Loc,
    dst: Loc,
    copies: &[CopyOp],
) -> Result<()> {
    let batch = dev.batch;
    if matches!(batch, BatchApi::None) || copies.len() < 2 {
        for c in copies {
            // SAFETY: validated ranges in memory this device reaches; the layouts' memory is
            // held until the stream passes the copy.
            let r = unsafe { sys::cuMemcpyAsync(c.dst, c.src, c.len as usize, stream) };
            check(r, "cuMemcpyAsync")?;
        }
        return Ok(());
    }
    let mut attrs = sys::CUmemcpyAttributes {
        srcAccessOrder: sys::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM,
        srcLocHint: src.cu(),
        dstLocHint: dst.cu(),
        flags: 0,
    };
    // Reused across calls, so that nothing but the driver runs between them (see
    // `exec::cuda::submit` on pauses between batch calls).
    let cap = copies.len().min(BATCH_MAX);
    let (mut dsts, mut srcs, mut sizes) = (
        Vec::with_capacity(cap),
        Vec::with_capacity(cap),
        Vec::with_capacity(cap),
    );
    for chunk in copies.chunks(BATCH_MAX) {
        dsts.clear();
        srcs.clear();
        sizes.clear();
        dsts.extend(chunk.iter().map(|c| c.dst));
        srcs.extend(chunk.iter().map(|c| c.src));
        sizes.extend(chunk.iter().map(|c| c.len as usize));
        let mut attr_idx: usize = 0;
        // SAFETY: the arrays hold `chunk.len()` entries and are read during the call; one
        // attribute applies from index 0; the signature matches the driver's version (BatchApi).
        let r = unsafe {
            match batch {
                BatchApi::V2(f) => f(
                    dsts.as_mut_ptr(),
                    srcs.as_mut_ptr(),
                    sizes.as_mut_ptr(),
                    chunk.len(),
                    &mut attrs,
                    &mut attr_idx,
                    1,
                    stream,
                ),
                BatchApi::V1(f) => {
                    let mut fail_idx: usize = 0;
                    f(
                        dsts.as_mut_ptr(),
                        srcs.as_mut_ptr(),
                        sizes.as_mut_ptr(),
                        chunk.len(),
                        &mut attrs,
                        &mut attr_idx,
                        1,
                        &mut fail_idx,
                        stream,
                    )
                }
                BatchApi::None => sys::CUresult::CUDA_ERROR_NOT_SUPPORTED,
            }
        };
        check(r, "cuMemcpyBatchAsync")?;
    }
    Ok(())
}
