//! Layer-by-layer use of the GPU tiers, as a runtime's scheduling loop sees it:
//! `kvxfer bench --gpu --layerwise`: 32 layers reloaded host -> device in one transfer while
//! the engine's stream runs one kernel per layer that reads its layer, each after
//! `layer_stream_wait` (against the transfer alone, the kernels alone, and waiting for the
//! whole transfer first);
//! `kvxfer bench --gpu --latency`: submit -> `wait` of one layer (32 scattered blocks x K,V x
//! 16 KiB = 1 MiB) and of one 4 KiB block, against one raw copy of the same bytes.

use std::ffi::c_void;
use std::time::Instant;

use cudarc::driver::sys;
use kvxfer::baseline::sm_count;
use kvxfer::{LayoutConfig, LayoutKind, TransferOptions};

use super::common::{
    bench_kernel, ck, err, gpu_context_with, legend, median, pinned_and_device, shuffled_ids,
};

pub struct LayersArgs {
    pub json: bool,
    pub iters: usize,
    pub max_sms: u32,
}

/// Reads its layer (every byte, 16 at a time) and then works `iters` FMA rounds: an engine's
/// per-layer kernel that needs that layer's KV blocks.
const LAYER_KERNEL: &str = r#"
extern "C" __global__ void kvx_bench_layer(const uint4 *layer, unsigned long long n16,
                                           float *out, unsigned iters) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    unsigned s = 0;
    for (; i < n16; i += stride) { uint4 v = layer[i]; s ^= v.x ^ v.y ^ v.z ^ v.w; }
    float a = s * 1e-9f, b = threadIdx.x * 1e-3f;
    for (unsigned k = 0; k < iters; k++) { a = fmaf(a, 0.99999f, 1e-7f); b = fmaf(b, 0.99999f, 1e-7f); }
    if (a + b == 1234.5f) out[0] = a;
}
"#;

const LAYERS: u64 = 32;
/// Blocks per layer of the layerwise reload: 128 x K,V x 16 KiB = 4 MiB per layer.
const RELOAD_BLOCKS: u64 = 128;
const THREADS: u32 = 512;

/// A layer-separate shape with 16 KiB regions (16 tokens x 512 values x 2 bytes), K and V.
fn kv_shape(blocks: u64, layers: u64) -> LayoutConfig {
    LayoutConfig {
        num_blocks: blocks,
        num_layers: layers,
        outer_dim: 2,
        page_size: 16,
        inner_dim: 512,
        dtype_width: 2,
        alignment: 4096,
        kind: LayoutKind::LayerSeparateBlockFirst,
        heads: Default::default(),
    }
}

/// The engine: the per-layer kernel, its stream and a scratch output.
struct Engine {
    function: sys::CUfunction,
    stream: sys::CUstream,
    out: sys::CUdeviceptr,
    blocks: u32,
    iters: u32,
}

impl Engine {
    fn new(dev: &kvxfer::CudaDevice) -> Result<Self, String> {
        let (function, stream, out) = bench_kernel(dev, LAYER_KERNEL, c"kvx_bench_layer")?;
        Ok(Self {
            function,
            stream,
            out,
            blocks: sm_count(dev),
            iters: 1 << 10,
        })
    }

    /// Queues the kernel of one layer of `bytes` at `layer`.
    fn launch(&self, layer: u64, bytes: u64) -> Result<(), String> {
        let (mut layer, mut n16, mut out, mut iters) = (layer, bytes / 16, self.out, self.iters);
        let mut params: [*mut c_void; 4] = [
            (&raw mut layer).cast(),
            (&raw mut n16).cast(),
            (&raw mut out).cast(),
            (&raw mut iters).cast(),
        ];
        // SAFETY: a live function and stream; the parameters match the kernel's and are copied
        // during the call; the layer lies in a live device layout.
        ck(
            unsafe {
                sys::cuLaunchKernel(
                    self.function,
                    self.blocks,
                    1,
                    1,
                    THREADS,
                    1,
                    1,
                    0,
                    self.stream,
                    params.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            },
            "cuLaunchKernel",
        )
    }

    fn sync(&self) -> Result<(), String> {
        // SAFETY: a live stream of the bench's context.
        ck(
            unsafe { sys::cuStreamSynchronize(self.stream) },
            "cuStreamSynchronize",
        )
    }
}

pub fn layerwise(a: &LayersArgs) -> Result<(), String> {
    let (ctx, dev) = gpu_context_with("bench --gpu --layerwise", a.max_sms)?;
    let mut engine = Engine::new(&dev)?;
    let c = kv_shape(RELOAD_BLOCKS, LAYERS);
    let layer_bytes = c.validate().map_err(err)?.allocation_len;
    let (host, gpu) = pinned_and_device(&ctx, c)?;
    let (sb, db) = shuffled_ids(RELOAD_BLOCKS, 7);
    let opts = TransferOptions::default();
    let layer_addr = |l: u64| gpu.region(0, l, 0).map(|r| r.addr).map_err(err);
    let transfer = || -> Result<f64, String> {
        let t0 = Instant::now();
        let t = ctx.submit(&host, &sb, &gpu, &db, &opts).map_err(err)?;
        t.wait(None).map_err(err)?;
        Ok(t0.elapsed().as_secs_f64() * 1e3)
    };
    let compute = |e: &Engine| -> Result<f64, String> {
        let t0 = Instant::now();
        for l in 0..LAYERS {
            e.launch(layer_addr(l)?, layer_bytes)?;
        }
        e.sync()?;
        Ok(t0.elapsed().as_secs_f64() * 1e3)
    };
    // Balanced: each layer's kernel takes about as long as the layer's reload, so that neither
    // side hides the other and the overlap shows.
    let alone = median((0..5).map(|_| transfer()).collect::<Result<Vec<_>, _>>()?);
    compute(&engine)?;
    let ms = compute(&engine)?;
    engine.iters = ((f64::from(engine.iters) * alone / ms.max(1e-3)) as u32).max(1);
    let (mut tr, mut co, mut total, mut serial, mut sms) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), 0);
    for i in 0..=a.iters {
        let t_alone = transfer()?;
        let c_alone = compute(&engine)?;
        // Layer by layer: the engine's kernel for layer l waits for that layer only.
        let t0 = Instant::now();
        let t = ctx.submit(&host, &sb, &gpu, &db, &opts).map_err(err)?;
        for l in 0..LAYERS {
            t.layer_stream_wait(l, engine.stream as usize)
                .map_err(err)?;
            engine.launch(layer_addr(l)?, layer_bytes)?;
        }
        engine.sync()?;
        let both = t0.elapsed().as_secs_f64() * 1e3;
        t.wait(None).map_err(err)?;
        sms = t.stats().sms;
        drop(t);
        // The whole transfer first, then the kernels: what per-layer waits save.
        let t0 = Instant::now();
        let t = ctx.submit(&host, &sb, &gpu, &db, &opts).map_err(err)?;
        t.wait(None).map_err(err)?;
        for l in 0..LAYERS {
            engine.launch(layer_addr(l)?, layer_bytes)?;
        }
        engine.sync()?;
        let one_after = t0.elapsed().as_secs_f64() * 1e3;
        if i > 0 {
            tr.push(t_alone);
            co.push(c_alone);
            total.push(both);
            serial.push(one_after);
        }
    }
    let (tr, co, total, serial) = (median(tr), median(co), median(total), median(serial));
    let ratio = total / tr.max(co);
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "name": "layerwise", "layers": LAYERS, "layer_bytes": layer_bytes,
                "iters": a.iters, "transfer_ms": tr, "compute_ms": co, "total_ms": total,
                "overlap_ratio": ratio, "whole_then_compute_ms": serial, "sms": sms,
            })
        );
    } else {
        println!(
            "{LAYERS} layers of {} MiB reloaded H2D (scattered 16 KiB K,V regions) beside one engine kernel per layer, median of {}",
            layer_bytes >> 20,
            a.iters
        );
        println!(
            "transfer {tr:.3} ms, kernels {co:.3} ms, layer by layer {total:.3} ms (overlap ratio {ratio:.3}), whole transfer first {serial:.3} ms; copy kernel on {sms} SMs"
        );
        legend(&[(
            "overlap ratio",
            "layer by layer / max(transfer alone, kernels alone): 1.0 is perfect overlap",
        )]);
    }
    Ok(())
}

/// Percentile `p` (0..=1) of `v`, sorted here.
fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

pub fn latency(a: &LayersArgs) -> Result<(), String> {
    let (ctx, _dev) = gpu_context_with("bench --gpu --latency", a.max_sms)?;
    let rounds = (a.iters * 400).max(200);
    let mut stream = std::ptr::null_mut();
    // SAFETY: the bench's context is current; the out pointer is a local.
    ck(
        unsafe { sys::cuStreamCreate(&mut stream, 1) },
        "cuStreamCreate",
    )?;
    let clock = super::gpu::GpuClock::new()?;
    if !a.json {
        println!(
            "submit -> wait, host to device, {rounds} rounds after 100 warm-up ones (microseconds)"
        );
        println!(
            "{:<22} {:>9} {:>9} {:>11} {:>9} {:>9} {:>10}",
            "case", "p50", "p99", "submit p50", "wait p50", "raw p50", "device p50"
        );
    }
    // One layer: 32 of 256 blocks, scattered, K and V of 16 KiB; one 4 KiB block.
    let layer_case = kv_shape(256, LAYERS);
    let block_case = LayoutConfig {
        num_layers: 1,
        outer_dim: 1,
        page_size: 4,
        inner_dim: 512,
        kind: LayoutKind::FullyContiguous,
        ..kv_shape(1024, 1)
    };
    for (name, c, pick, one_layer) in [
        ("one layer (32 blocks)", layer_case, 32u64, true),
        ("one 4 KiB block", block_case, 1, false),
    ] {
        let (host, gpu) = pinned_and_device(&ctx, c)?;
        let (all_src, all_dst) = shuffled_ids(c.num_blocks, 3);
        let (mut total, mut submit, mut wait, mut raw, mut device) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut bytes, mut fragments) = (0, 0);
        let (h, d) = (
            host.region(0, 0, 0).map_err(err)?.addr,
            gpu.region(0, 0, 0).map_err(err)?.addr,
        );
        for i in 0..rounds + 100 {
            let k = (i * pick as usize) % (c.num_blocks as usize - pick as usize + 1);
            let (sb, db) = (
                &all_src[k..k + pick as usize],
                &all_dst[k..k + pick as usize],
            );
            let layer = (i as u64) % c.num_layers;
            let opts = TransferOptions {
                layer_begin: if one_layer { layer } else { 0 },
                layer_end: if one_layer { layer + 1 } else { 0 },
                ..Default::default()
            };
            let t0 = Instant::now();
            let t = ctx.submit(&host, sb, &gpu, db, &opts).map_err(err)?;
            let t1 = Instant::now();
            t.wait(None).map_err(err)?;
            let t2 = Instant::now();
            let s = t.stats();
            bytes = s.bytes;
            fragments = s.fragments;
            drop(t);
            // The same bytes in one raw copy and a stream synchronize: the floor.
            let r0 = Instant::now();
            // SAFETY: both layouts hold at least `bytes` bytes from their first region on;
            // the bench's context is current.
            unsafe {
                ck(
                    sys::cuMemcpyHtoDAsync_v2(d, h as *const c_void, bytes as usize, stream),
                    "cuMemcpyHtoDAsync",
                )?;
                ck(sys::cuStreamSynchronize(stream), "cuStreamSynchronize")?;
            }
            let r1 = r0.elapsed();
            // The device's part alone: the same transfer held behind a stream until submit
            // returned, timed by events on that stream (diagnostic; `GpuClock`).
            let gpu = clock.transfer(stream, |s| {
                let opts = TransferOptions {
                    cuda_stream: Some(s),
                    ..opts.clone()
                };
                ctx.submit(&host, sb, &gpu, db, &opts).map_err(err)
            })?;
            if i >= 100 {
                device.push(gpu * 1e6);
                total.push((t2 - t0).as_secs_f64() * 1e6);
                submit.push((t1 - t0).as_secs_f64() * 1e6);
                wait.push((t2 - t1).as_secs_f64() * 1e6);
                raw.push(r1.as_secs_f64() * 1e6);
            }
        }
        let (p50, p99) = (percentile(&mut total, 0.5), percentile(&mut total, 0.99));
        let (s50, w50, r50, d50) = (
            percentile(&mut submit, 0.5),
            percentile(&mut wait, 0.5),
            percentile(&mut raw, 0.5),
            percentile(&mut device, 0.5),
        );
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "name": "latency", "case": name, "bytes": bytes, "fragments": fragments,
                    "rounds": rounds, "p50_us": p50, "p99_us": p99, "submit_p50_us": s50,
                    "wait_p50_us": w50, "raw_copy_p50_us": r50, "device_p50_us": d50,
                })
            );
        } else {
            println!(
                "{name:<22} {p50:>9.1} {p99:>9.1} {s50:>11.1} {w50:>9.1} {r50:>9.1} {d50:>10.1}"
            );
        }
    }
    if !a.json {
        legend(&[
            ("p50, p99", "kvxfer submit -> wait returned"),
            (
                "submit",
                "host time of submit (validation, plan, table, launch, event)",
            ),
            (
                "wait",
                "from submit's return to wait's: the copy and the wake-up",
            ),
            (
                "raw",
                "one cudaMemcpyAsync of the same bytes, contiguous, + stream synchronize",
            ),
            (
                "device",
                "GPU time of the same transfer held behind a stream until submit returned",
            ),
        ]);
    }
    Ok(())
}
