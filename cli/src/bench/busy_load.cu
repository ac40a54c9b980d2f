// The compute load of `kvxfer bench --gpu --busy` (busy.rs compiles it with NVRTC), and of
// scripts/experiments/busy4k.cu: tensor-core work, as a GEMM's (see `SPIN` in busy.rs).
extern "C" __global__ void kvx_bench_spin(float *out, unsigned iters) {
    unsigned a0 = threadIdx.x | 0x3f800000u, a1 = a0 ^ 0x10001u, a2 = a0 ^ 0x20002u, a3 = a0 ^ 0x30003u;
    unsigned b0 = blockIdx.x | 0x3f800000u, b1 = b0 ^ 0x40004u;
    float c[4][4] = {};
    for (unsigned i = 0; i < iters; i++) {
#pragma unroll
        for (int k = 0; k < 4; k++) {
            asm volatile(
                "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                : "+f"(c[k][0]), "+f"(c[k][1]), "+f"(c[k][2]), "+f"(c[k][3])
                : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
        }
    }
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < 4; k++) s += c[k][0] + c[k][1] + c[k][2] + c[k][3];
    if (s == 1234.5f) out[0] = s;
}
