//! Helpers of the GPU tests (tests/gpu_*.rs): contexts on the GPU, layout shapes, a checked
//! move with guard blocks, and the two-process GPU RDMA exchange.

use std::time::Duration;

use cudarc::driver::sys;
use kvxfer::{
    Context, ContextConfig, Layout, LayoutConfig, LayoutKind, Mechanism, Plan, StorageKind,
    StorageSpec, Strategy, TransferOptions, TransferStats,
};

use super::all;

pub fn ctx() -> Context {
    let c = Context::new(ContextConfig {
        worker_threads: 4,
        nixl_backends: kvxfer::Backends::empty(),
        ..Default::default()
    })
    .expect("context");
    assert!(c.has_cuda(), "these tests need a CUDA GPU and driver");
    c
}

pub fn cfg(
    kind: LayoutKind,
    blocks: u64,
    layers: u64,
    page: u64,
    inner: u64,
    width: u32,
) -> LayoutConfig {
    LayoutConfig {
        num_blocks: blocks,
        num_layers: layers,
        outer_dim: 2,
        page_size: page,
        inner_dim: inner,
        dtype_width: width,
        alignment: 1,
        kind,
        heads: Default::default(),
    }
}

/// `blocks` blocks of 2 layers, K and V, 16 tokens of heads of 128 bf16, holding `n` heads from
/// `begin` in `order` (head transform tests).
pub fn heads_cfg(
    kind: LayoutKind,
    blocks: u64,
    n: u32,
    begin: u32,
    order: kvxfer::HeadOrder,
) -> LayoutConfig {
    LayoutConfig {
        num_blocks: blocks,
        num_layers: 2,
        outer_dim: 2,
        page_size: 16,
        inner_dim: u64::from(n) * 128,
        dtype_width: 2,
        alignment: 4096,
        kind,
        heads: kvxfer::Heads {
            num_heads: n,
            head_begin: begin,
            order,
        },
    }
}

pub fn layout(ctx: &Context, c: LayoutConfig, storage: StorageKind) -> Layout {
    ctx.new_layout(c, &StorageSpec::new(storage))
        .expect("layout")
}

/// A layout on device `id`.
pub fn layout_on(ctx: &Context, c: LayoutConfig, id: i32) -> Layout {
    ctx.new_layout(
        c,
        &StorageSpec {
            kind: StorageKind::Device,
            device_id: id,
            path: None,
        },
    )
    .expect("device layout (two-GPU tests need two GPUs)")
}

/// Moves reversed, interleaved ids and checks the moved blocks and the untouched guards.
pub fn check_move(ctx: &Context, src: &Layout, dst: &Layout, opts: &TransferOptions) -> Mechanism {
    check_move_stats(ctx, src, dst, opts).mechanism
}

/// As `check_move`, returning the transfer's stats: moved pieces are checked by the checksum
/// of whole blocks when every layer moves, else the moved blocks must have changed.
pub fn check_move_stats(
    ctx: &Context,
    src: &Layout,
    dst: &Layout,
    opts: &TransferOptions,
) -> TransferStats {
    let n = src.config().num_blocks;
    ctx.fill(src, &all(n), 11).unwrap();
    ctx.fill(dst, &all(n), 22).unwrap();
    let before = ctx.checksum(dst, &all(n)).unwrap();
    let sb: Vec<u64> = (0..n / 2).map(|i| 2 * i).collect();
    let db: Vec<u64> = (0..n / 2).map(|i| n - 1 - 2 * i).collect();
    let t = ctx.submit(src, &sb, dst, &db, opts).expect("submit");
    t.wait(Some(Duration::from_secs(60))).expect("transfer");
    let layers = opts.layer_begin..if opts.layer_end == 0 {
        src.config().num_layers
    } else {
        opts.layer_end
    };
    let every_layer = layers == (0..src.config().num_layers);
    if every_layer {
        assert_eq!(
            ctx.checksum(src, &sb).unwrap(),
            ctx.checksum(dst, &db).unwrap()
        );
    }
    let after = ctx.checksum(dst, &all(n)).unwrap();
    for b in 0..n {
        if !db.contains(&b) {
            assert_eq!(
                after[b as usize], before[b as usize],
                "guard block {b} changed"
            );
        } else if !every_layer {
            assert_ne!(
                after[b as usize], before[b as usize],
                "block {b} not written"
            );
        }
    }
    t.stats()
}

pub const KINDS: [LayoutKind; 3] = LayoutKind::ALL;

pub fn check(r: sys::CUresult) {
    assert_eq!(r, sys::CUresult::CUDA_SUCCESS);
}

pub const RDMA_ROLE: &str = "KVX_TEST_GPU_RDMA_SERVER";

pub const RDMA_DEVICE: &str = "KVX_TEST_GPU_RDMA_DEVICE";

pub fn rdma_ctx(device: i32) -> Context {
    rdma_ctx_with(device, false)
}

/// A context on `device` with GPU RDMA allowed; `disable_ipc`: same-host peers stay on NIXL.
pub fn rdma_ctx_with(device: i32, disable_ipc: bool) -> Context {
    let c = Context::new(ContextConfig {
        worker_threads: 2,
        cuda_device: device,
        nixl_backends: kvxfer::Backends::UCX,
        capabilities: kvxfer::Capabilities {
            allow_gds: false,
            allow_gpu_rdma: true,
        },
        disable_ipc,
        ..Default::default()
    })
    .expect("a context with NIXL's UCX backend (set KVX_NIXL_LIB_DIR)");
    assert!(c.has_cuda(), "these tests need a CUDA GPU and driver");
    c
}

/// The server process of the GPU RDMA tests (common::serve on device memory of `device`).
fn gpu_rdma_server(dir: &std::path::Path, device: i32) {
    let ctx = rdma_ctx(device);
    let c = cfg(LayoutKind::LayerSeparateBlockFirst, 12, 4, 16, 128, 2);
    let pool = layout_on(&ctx, c, device);
    super::serve(&ctx, &pool, dir);
}

/// Both halves of a GPU RDMA test: run as a test it is the client on device 0 and starts
/// itself again (`test`, with RDMA_ROLE naming the folder they share) as the server on
/// `server_device`.
pub fn gpu_rdma_between_processes(test: &str, server_device: i32) {
    if let Some(dir) = std::env::var_os(RDMA_ROLE) {
        let device = std::env::var(RDMA_DEVICE)
            .ok()
            .and_then(|d| d.parse().ok())
            .expect("the server's device");
        gpu_rdma_server(std::path::Path::new(&dir), device);
        return;
    }
    let dir = super::scratch_dir("gpu-rdma");
    let mut server = server_process(test, (RDMA_ROLE, &dir), (RDMA_DEVICE, server_device));
    let peer_file = dir.join("server.peer");
    super::wait_for_child(&peer_file, "the server's export", &mut server);
    let ctx = rdma_ctx(0);
    let peer = ctx.import(&std::fs::read(&peer_file).unwrap()).unwrap();
    let remote = &peer.layouts()[0];
    assert_eq!(remote.storage_kind(), StorageKind::Device);
    assert_eq!(remote.memory().device_id(), server_device);
    let c = cfg(LayoutKind::LayerSeparateOuterFirst, 12, 4, 16, 128, 2);
    let (mine, back) = (
        layout(&ctx, c, StorageKind::Device),
        layout(&ctx, c, StorageKind::Device),
    );
    let expected = layout(&ctx, c, StorageKind::Pinned);
    let layouts = super::ClientLayouts {
        mine: &mine,
        back: &back,
        expected: &expected,
    };
    // Remote device -> local device, then local device -> remote device with a notification.
    let (read, write) = super::exchange(&ctx, remote, layouts, &dir);
    assert_eq!(read.plan, Plan::Direct(Strategy::NixlReadFlipped));
    assert_eq!(write.plan, Plan::Direct(Strategy::NixlWrite));
    assert!(
        server.wait().unwrap().success(),
        "the server process failed"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// This test binary started again to run only `test`, as the server half of a two-process GPU
/// test: `role` names the folder the halves share, `device` the server's GPU.
pub fn server_process(
    test: &str,
    role: (&str, &std::path::Path),
    device: (&str, i32),
) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--include-ignored", "--test-threads=1"])
        .env(role.0, role.1)
        .env(device.0, device.1.to_string())
        .spawn()
        .unwrap()
}

/// Bytes of (block, layer, outer) of a pinned layout.
pub fn bytes(l: &Layout, b: u64, layer: u64, o: u64) -> Vec<u8> {
    let r = l.region(b, layer, o).unwrap();
    // SAFETY: a region of a live pinned host layout.
    unsafe { std::slice::from_raw_parts(r.addr as *const u8, r.len as usize) }.to_vec()
}
