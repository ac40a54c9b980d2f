//! `kvxfer bench`: transfers against baselines measured in the same run, one module per tier:
//! `host` (host scatter), `gpu` (host <-> device, device <-> device), `busy` (beside a compute
//! kernel), `layers` (layer by layer: `--layerwise`, `--latency`), `pageable`, `gpu_disk`, `gpu_rdma`
//! (device <-> a second process), `nixl` (UCX and POSIX against nixl-sys used directly).
//! Helpers they share are in `common`.

mod busy;
mod common;
mod gpu;
mod gpu_disk;
pub mod gpu_rdma;
mod host;
mod layers;
mod nixl;
mod pageable;
mod plot;
mod transform;

#[derive(clap::Args)]
pub struct Args {
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
    /// Bytes moved per measurement, in MiB [default: 256, with --gpu 1024].
    #[arg(long)]
    total_mib: Option<u64>,
    /// Measurements per point, the median is reported [default: 9, with --gpu 5].
    #[arg(long)]
    iters: Option<usize>,
    /// Worker threads (0 = number of CPUs); the `limit` baseline uses as many.
    #[arg(long, default_value_t = 0)]
    threads: u32,
    /// Fragment sizes in KiB [default: 4,16,64,256,1024,2048; with --gpu 4,16,32,64 for
    /// layer-separate layouts plus one fully contiguous point].
    #[arg(long, value_delimiter = ',')]
    fragments_kib: Option<Vec<u64>>,
    /// With --gpu: the directions to measure (h2d, d2h, d2d; p2p: device to the next device,
    /// on machines with two GPUs).
    #[arg(long, value_delimiter = ',', default_values_t = ["h2d".to_string(), "d2h".to_string(), "d2d".to_string()])]
    directions: Vec<String>,
    /// Benchmark the GPU tiers (H2D, D2H, D2D) instead of host memory; --total-mib defaults
    /// to 1024 there.
    #[arg(long)]
    gpu: bool,
    /// With --gpu: no untimed copy before each measurement (the GPU may then start a
    /// measurement with its clocks down after a slow baseline).
    #[arg(long, requires = "gpu")]
    cold: bool,
    /// With --gpu: skip the per-fragment baselines (naive, batch) and COPY_ENGINE mode, which
    /// take seconds per round at small fragments; they are reported as NaN. For tuning the
    /// kernel path on a short device lease.
    #[arg(long, requires = "gpu")]
    quick: bool,
    /// Benchmark NIXL (UCX write/read between two agents, POSIX disk write/read) against
    /// nixl-sys used directly; --total-mib defaults to 64 there.
    #[arg(long, conflicts_with = "gpu")]
    nixl: bool,
    /// Benchmark device <-> disk through kvxfer's pinned bounce buffers against the D2H/H2D
    /// and disk limits measured in the same run; --total-mib defaults to 1024, --iters to 3,
    /// --fragments-kib to 4,16,64 there.
    #[arg(long, conflicts_with_all = ["gpu", "nixl"])]
    gpu_disk: bool,
    /// Benchmark writes and reads between this process's device 0 and a device of a second
    /// kvxfer process with GPU RDMA (NIXL's UCX backend) against staging through pinned memory;
    /// --total-mib defaults to 256, --iters to 3, --fragments-kib to 4,16,64 there.
    #[arg(long, conflicts_with_all = ["gpu", "nixl", "gpu_disk"])]
    gpu_rdma: bool,
    /// With --gpu-rdma: the CUDA device of the peer process.
    #[arg(long, requires = "gpu_rdma", default_value_t = 0)]
    peer_device: i32,
    /// With --gpu-disk: folder for the disk layouts (default: the system's temporary folder).
    #[arg(long, requires = "gpu_disk")]
    disk_dir: Option<std::path::PathBuf>,
    /// With --gpu-disk: compare with GDS through NIXL's GDS_MT backend instead of GDS.
    #[arg(long, requires = "gpu_disk")]
    gds_mt: bool,
    /// With --gpu: pageable host memory (a wrapped heap pool) <-> device through the pinned
    /// bounce pool, against one pageable and one pinned copy of the same bytes; --total-mib
    /// defaults to 256, --iters to 5, --fragments-kib to 4,16,64 there.
    #[arg(long, requires = "gpu")]
    pageable: bool,
    /// With --gpu: pinned <-> device transfers in each copy mode, back to back while a
    /// compute kernel keeps every SM busy (~50 ms per launch), against the same kernel alone
    /// and the idle link; --total-mib defaults to 256, --iters to 5, --fragments-kib to
    /// 4,16,64 there.
    #[arg(long, requires = "gpu", conflicts_with = "pageable")]
    busy: bool,
    /// With --gpu: 32 layers reloaded host -> device in one transfer while an engine-like
    /// kernel per layer waits for its layer (`layer_stream_wait`), against each alone;
    /// --iters defaults to 5.
    #[arg(long, requires = "gpu", conflicts_with_all = ["pageable", "busy"])]
    layerwise: bool,
    /// With --gpu: submit -> wait latency of one layer (32 scattered blocks x K,V x 16 KiB) and
    /// of one 4 KiB block host -> device, percentiles over 400 x --iters rounds (default 5).
    #[arg(long, requires = "gpu", conflicts_with_all = ["pageable", "busy", "layerwise"])]
    latency: bool,
    /// Head transforms (TP 4 <-> 2 with NHD <-> HND) against the same bytes untransformed; with
    /// --gpu in each direction (H2D, D2H, D2D), else on host memory; --total-mib defaults to
    /// 256, --iters to 5.
    /// With --nixl: host memory to and from a second context's exported layouts over UCX.
    #[arg(long, conflicts_with_all = ["pageable", "busy", "layerwise", "latency"])]
    transform: bool,
    /// With --gpu-rdma: this side does not map the peer's device memory through CUDA IPC
    /// (as with a peer on another host): transfers go through NIXL, small pieces through the
    /// peer's landing arena in device memory.
    #[arg(long, requires = "gpu_rdma")]
    disable_ipc: bool,
    /// With --gpu --busy, --layerwise, --latency, --pageable and with --gpu-rdma: the context's max_sms
    /// (the copy kernel's SM budget; 0 = auto).
    #[arg(long, default_value_t = 0)]
    max_sms: u32,
    /// Host and --gpu benches: also draw GB/s against fragment size, one line per mechanism
    /// with the limit, into this PNG file.
    #[arg(long, conflicts_with_all = ["nixl", "gpu_disk", "gpu_rdma"])]
    plot: Option<std::path::PathBuf>,
}

pub fn run(a: &Args) -> Result<(), String> {
    if a.iters == Some(0) || a.total_mib == Some(0) {
        return Err("--iters and --total-mib must be at least 1".into());
    }
    if a.gpu && a.busy {
        return busy::run(&busy::BusyArgs {
            json: a.json,
            total_mib: a.total_mib.unwrap_or(256),
            iters: a.iters.unwrap_or(5),
            fragments_kib: a.fragments_kib.clone().unwrap_or_else(|| vec![4, 16, 64]),
            max_sms: a.max_sms,
        });
    }
    if a.transform {
        return transform::run(&transform::TransformArgs {
            json: a.json,
            total_mib: a.total_mib.unwrap_or(256),
            iters: a.iters.unwrap_or(5),
            gpu: a.gpu,
            peer: a.nixl,
        });
    }
    if a.gpu && (a.layerwise || a.latency) {
        let args = layers::LayersArgs {
            json: a.json,
            iters: a.iters.unwrap_or(5),
            max_sms: a.max_sms,
        };
        return if a.layerwise {
            layers::layerwise(&args)
        } else {
            layers::latency(&args)
        };
    }
    if a.gpu && a.pageable {
        return pageable::run(&pageable::PageableArgs {
            json: a.json,
            total_mib: a.total_mib.unwrap_or(256),
            iters: a.iters.unwrap_or(5),
            fragments_kib: a.fragments_kib.clone().unwrap_or_else(|| vec![4, 16, 64]),
            max_sms: a.max_sms,
        });
    }
    if a.gpu {
        return gpu::run(&gpu::GpuArgs {
            json: a.json,
            total_mib: a.total_mib.unwrap_or(1024),
            iters: a.iters.unwrap_or(5),
            fragments_kib: a.fragments_kib.clone(),
            directions: a.directions.clone(),
            cold: a.cold,
            quick: a.quick,
            plot: a.plot.clone(),
        });
    }
    if a.gpu_disk {
        return gpu_disk::run(&gpu_disk::GpuDiskArgs {
            json: a.json,
            total_mib: a.total_mib.unwrap_or(1024),
            iters: a.iters.unwrap_or(3),
            fragments_kib: a.fragments_kib.clone().unwrap_or_else(|| vec![4, 16, 64]),
            disk_dir: a.disk_dir.clone(),
            gds_mt: a.gds_mt,
        });
    }
    if a.gpu_rdma {
        return gpu_rdma::run(&gpu_rdma::GpuRdmaArgs {
            json: a.json,
            total_mib: a.total_mib.unwrap_or(256),
            iters: a.iters.unwrap_or(3),
            fragments_kib: a.fragments_kib.clone().unwrap_or_else(|| vec![4, 16, 64]),
            peer_device: a.peer_device,
            max_sms: a.max_sms,
            disable_ipc: a.disable_ipc,
        });
    }
    if a.nixl {
        return nixl::run(&nixl::NixlArgs {
            json: a.json,
            total_mib: a.total_mib.unwrap_or(64),
            iters: a.iters.unwrap_or(5),
            fragments_kib: a
                .fragments_kib
                .clone()
                .unwrap_or_else(|| vec![4, 16, 64, 256, 1024, 2048]),
        });
    }
    host::run(a)
}
