#!/usr/bin/env python3
"""kvxfer beside a real engine's GEMMs: PyTorch bf16 matmuls (8192 x 8192, cuBLAS) run for
~50 ms on their own stream while kvxfer moves 256 MiB of scattered pinned <-> device fragments
in one transfer, as `kvxfer bench --gpu --busy` does with its own NVRTC load. A diagnostic
next to the bench (docs/BENCHMARKS.md), run on a GPU machine with PyTorch:

    KVX_LIB_PATH=.gpu/libkvxfer.so PYTHONPATH=python python3 scripts/busy_torch.py [MODE]

MODE: a max_sms for kvxfer (default 0: auto), or `plain` / `plain16`: instead of kvxfer, a plain
warp-per-piece copy kernel on 4 blocks of 1024 threads / 16 of 256 at default stream priority.

One JSON row per direction and fragment size, medians of 5 rounds (alone and with alternate).
"""

import json
import random
import statistics
import sys
import time

import torch

import kvxfer

ROUNDS = 5
TOTAL = 256 << 20

# A plain warp-per-piece copy kernel (the reference of issue 14's measurement), launched on a
# stream of default priority through the driver API, with `plain` as the mode.
PLAIN = r"""
extern "C" __global__ void plain_copy(const char *src, char *dst, const long long *sb,
                                      const long long *db, long long n, long long frag) {
    long long warp = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5;
    long long warps = (gridDim.x * (long long)blockDim.x) >> 5;
    int lane = threadIdx.x & 31;
    for (long long i = warp; i < n; i += warps) {
        const uint4 *s = (const uint4 *)(src + sb[i] * frag);
        uint4 *d = (uint4 *)(dst + db[i] * frag);
        for (long long j = lane; j < frag / 16; j += 32) d[j] = s[j];
    }
}
"""


def plain_kernel():
    import ctypes
    nvrtc = ctypes.CDLL(next(p for p in ("libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so") if _loads(p)))
    cuda = ctypes.CDLL("libcuda.so.1")
    prog = ctypes.c_void_p()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), PLAIN.encode(), b"plain.cu", 0, None, None) == 0
    major, minor = torch.cuda.get_device_capability()
    opt = f"--gpu-architecture=compute_{major}{minor}".encode()
    assert nvrtc.nvrtcCompileProgram(prog, 1, (ctypes.c_char_p * 1)(opt)) == 0
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetPTX(prog, ptx)
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    cuda.cuDeviceGet(ctypes.byref(dev), torch.cuda.current_device())
    cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev)
    cuda.cuCtxSetCurrent(ctx)
    module, fn = ctypes.c_void_p(), ctypes.c_void_p()
    r = cuda.cuModuleLoadData(ctypes.byref(module), ptx)
    if r != 0:
        raise RuntimeError(f"cuModuleLoadData: {r}")
    r = cuda.cuModuleGetFunction(ctypes.byref(fn), module, b"plain_copy")
    if r != 0:
        raise RuntimeError(f"cuModuleGetFunction: {r}")

    def launch(stream, src, dst, sb, db, n, frag, blocks, threads):
        args = [ctypes.c_void_p(src), ctypes.c_void_p(dst), ctypes.c_void_p(sb), ctypes.c_void_p(db),
                ctypes.c_longlong(n), ctypes.c_longlong(frag)]
        ptrs = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args])
        r = cuda.cuLaunchKernel(fn, blocks, 1, 1, threads, 1, 1, 0, ctypes.c_void_p(stream), ptrs, None)
        if r != 0:
            raise RuntimeError(f"cuLaunchKernel: {r}")
    return launch


def _loads(name):
    import ctypes
    try:
        ctypes.CDLL(name)
        return True
    except OSError:
        return False


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else "0"
    max_sms = int(mode) if mode.isdigit() else 0
    plain = plain_kernel() if mode.startswith("plain") else None
    shape_of_plain = {"plain": (4, 1024), "plain16": (16, 256)}.get(mode)
    ctx = kvxfer.Context(nixl_backends=0, max_sms=max_sms)
    stream = torch.cuda.Stream()
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")

    def load(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record()
            for _ in range(n):
                torch.matmul(a, b)
            end.record()
        return start, end

    def ms(events):
        events[1].synchronize()
        return events[0].elapsed_time(events[1])

    ms(load(4))
    n = max(1, round(4 * 50.0 / ms(load(4))))
    for kib in (4, 16, 64):
        frag = kib << 10
        blocks = TOTAL // frag
        shape = dict(num_blocks=blocks, num_layers=1, outer_dim=1, page_size=1, inner_dim=frag // 2,
                     alignment=4096)
        host = ctx.new_layout(**shape, storage="pinned")
        dev = ctx.new_layout(**shape, storage="device")
        rng = random.Random(kib)
        sb, db = list(range(blocks)), list(range(blocks))
        rng.shuffle(sb)
        rng.shuffle(db)
        # Ids as CPU int64 tensors: kvxfer's Python binding reads them in place (a list of 65536
        # ints would cost milliseconds of conversion inside the timed submit).
        sb_ids, db_ids = torch.tensor(sb, dtype=torch.int64), torch.tensor(db, dtype=torch.int64)
        sbt = torch.tensor(sb, dtype=torch.int64, device="cuda")
        dbt = torch.tensor(db, dtype=torch.int64, device="cuda")
        copy_stream = torch.cuda.Stream()
        for direction, src, dst in (("H2D", host, dev), ("D2H", dev, host)):
            alone, with_, gbps, sms = [], [], [], 0
            for i in range(ROUNDS + 1):
                t_alone = ms(load(n))
                ev = load(n)
                t0 = time.perf_counter()
                if plain is None:
                    t = ctx.submit(src, sb_ids, dst, db_ids)
                    t.wait()
                    sms = t.stats["sms"]
                else:
                    copy_stream.synchronize()
                    plain(copy_stream.cuda_stream, src.region(0)[0], dst.region(0)[0],
                          sbt.data_ptr(), dbt.data_ptr(), blocks, frag, *shape_of_plain)
                    copy_stream.synchronize()
                    sms = shape_of_plain[0]
                took = time.perf_counter() - t0
                t_with = ms(ev)
                if i > 0:
                    alone.append(t_alone)
                    with_.append(t_with)
                    gbps.append(TOTAL / took / 1e9)
            a_ms, w_ms = statistics.median(alone), statistics.median(with_)
            print(json.dumps({
                "name": "busy_torch", "direction": direction, "fragment_bytes": frag,
                "mode": mode, "max_sms": max_sms, "sms": sms, "matmuls": n, "transfer_gbps": statistics.median(gbps),
                "compute_alone_ms": a_ms, "compute_with_transfer_ms": w_ms,
                "compute_slowdown": w_ms / a_ms - 1,
            }), flush=True)


if __name__ == "__main__":
    main()
