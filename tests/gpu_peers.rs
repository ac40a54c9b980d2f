//! GPU tests of device memory of a peer process through GPU RDMA.
//! They need a CUDA GPU, so they are `#[ignore]`d: on a machine without one, cargo lists them as
//! ignored (never as passed). `scripts/gpu-test` builds them and runs them with
//! `--include-ignored` on a GPU machine.

mod common;

use common::gpu::*;

#[test]
#[ignore = "needs a CUDA GPU and NIXL's UCX backend: run scripts/gpu-test"]
fn gpu_rdma_between_two_processes_moves_device_blocks_both_ways() {
    gpu_rdma_between_processes(
        "gpu_rdma_between_two_processes_moves_device_blocks_both_ways",
        0,
    );
}
