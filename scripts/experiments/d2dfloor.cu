// Session 16's experiment: the best a kvxfer-shaped device-to-device transfer can do from
// submit to completion on this machine (issue: busy engine, point 5: D2D >= 0.90 of one large
// copy as a runtime sees it). The same 1 GiB as `bench --gpu --quick --directions d2d`
// (layer-separate, 32 layers x K,V, 4096 / 1024 / 512 / 256 blocks of 4 / 16 / 32 / 64 KiB
// pieces, shuffled ids on both sides) moves with a bare kernel that has nothing kvxfer's has
// beyond what any such transfer needs: its ids packed into a pinned table, uploaded, one
// launch, an event, and a thread spinning on the event. Wall times, against one
// cudaMemcpyAsync of the same 1 GiB seen done the same way:
//   ce         one contiguous copy-engine copy (the bench's `limit`)
//   bare       pack the ids (u16 pairs) + upload + launch + spin
//   +check     the same after checking the ids as kvxfer must (every id below the layout's
//              block count, no destination twice: a bitmap; `check us`, and with a byte per
//              block instead)
//   device     the bare kernel's device time (CUDA events around the upload and launch), and
//              the copy engine's device time over it (`dev`)
//   kvxfer     kvxfer itself over the same memory (wrapped layer-separate layouts, AUTO,
//              submit -> wait through the C API), interleaved round by round with the others
// Each figure is the median of 15 rounds after 3 warm-up ones; every round starts right after
// an untimed copy of the whole GiB (as the bench's `warm`). The bare kernel's result is checked
// against the source once per size. On the GPU machine, from the repository root, with
// .gpu/libkvxfer.so from `scripts/gpu-test build` (and its soname, libkvxfer.so.0.2, linked
// beside it):
//   nvcc -O3 -arch=sm_90 -o /tmp/d2dfloor scripts/experiments/d2dfloor.cu -L.gpu -lkvxfer \
//     -Xlinker -rpath=$PWD/.gpu && /tmp/d2dfloor
// Session 16, device runs 6, 7 and 12 (the first two before the check with bytes and the
// kvxfer column were added): docs/BENCHMARKS.md, "Session 16".
#include <cuda_runtime.h>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <vector>
#include "common.cuh"
#include "kvx.cuh"

typedef unsigned long long u64;
constexpr size_t TOTAL = 1ull << 30;
constexpr unsigned LAYERS = 32, OUTER = 2;

struct Job {
  const char* src;
  char* dst;
  const unsigned short* ids;  // (src, dst) pairs
  u64 piece;                  // bytes of one (block, layer, K/V) piece
  u64 pairs;
  u64 items;                  // LAYERS * pairs * OUTER
  u64 layer_bytes;            // blocks * OUTER * piece
  u64 run;                    // consecutive items a warp takes
};

// Items (layer, pair, K/V), K/V fastest; warp w takes runs w, w + warps, ... of `run` items
// (kvxfer's walk device to device), 8 loads of 16 bytes in flight per lane.
__global__ void __launch_bounds__(256) bare(const Job j) {
  const unsigned lane = threadIdx.x & 31u;
  const u64 warp = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const u64 warps = ((u64)gridDim.x * blockDim.x) >> 5;
  for (u64 r = warp; r * j.run < j.items; r += warps) {
    for (u64 i = r * j.run; i < (r + 1) * j.run && i < j.items; ++i) {
      const u64 o = i % OUTER, p = (i / OUTER) % j.pairs, l = i / (OUTER * j.pairs);
      const u64 sb = j.ids[2 * p], db = j.ids[2 * p + 1];
      const uint4* s = (const uint4*)(j.src + l * j.layer_bytes + (sb * OUTER + o) * j.piece);
      uint4* d = (uint4*)(j.dst + l * j.layer_bytes + (db * OUTER + o) * j.piece);
      for (u64 k = lane; k < j.piece / 16; k += 256) {
        uint4 v[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) v[u] = s[k + 32 * u];
#pragma unroll
        for (int u = 0; u < 8; ++u) d[k + 32 * u] = v[u];
      }
    }
  }
}

// common.cuh's check_ids with a byte per block (kvxfer's check for small, dense id spaces
// since session 16).
static bool check_ids_bytes(const std::vector<u64>& s, const std::vector<u64>& d, u64 n,
                            std::vector<unsigned char>& marks) {
  u64 bad = 0;
  for (size_t i = 0; i < s.size(); ++i) bad |= (s[i] >= n) | (d[i] >= n);
  if (bad) return false;
  marks.assign(n, 0);
  for (u64 x : d) marks[x] = 1;
  size_t distinct = 0;
  for (unsigned char m : marks) distinct += m;
  return distinct == d.size();
}

int main() {
  cudaStream_t st;
  const int sms = start(&st);
  char *src, *dst;
  CK(cudaMalloc(&src, TOTAL));
  CK(cudaMalloc(&dst, TOTAL));
  fill<<<1024, 256, 0, st>>>(src, TOTAL);
  unsigned short *pinned, *table;
  CK(cudaHostAlloc(&pinned, 1 << 20, cudaHostAllocPortable));
  CK(cudaMalloc(&table, 1 << 20));
  cudaEvent_t done, e0, e1;
  CK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  CK(cudaStreamSynchronize(st));
  auto spin = [&] {
    CK(cudaEventRecord(done, st));
    while (cudaEventQuery(done) == cudaErrorNotReady) {
    }
  };
  auto now = [] { return std::chrono::steady_clock::now(); };
  auto us = [](auto a, auto b) { return std::chrono::duration<double, std::micro>(b - a).count(); };
  auto ce = [&] { CK(cudaMemcpyAsync(dst, src, TOTAL, cudaMemcpyDeviceToDevice, st)); };
  auto warm = [&] {
    ce();
    CK(cudaStreamSynchronize(st));
  };
  kvx_context* ctx = kvx_gpu_context();
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("# %s, %d SMs; 1 GiB device to device, layer-separate 32 layers x K,V; median of 15\n",
         prop.name, sms);
  printf("%-8s %6s %9s %9s %9s %9s %8s %8s %8s %8s\n", "piece", "pairs", "ce us", "bare us",
         "+check", "device", "bare/ce", "+chk/ce", "dev", "check us");
  std::mt19937_64 rng(11);
  std::vector<u64> seen;
  for (u64 piece : {4096ull, 16384ull, 32768ull, 65536ull}) {
    const u64 blocks = TOTAL / (LAYERS * OUTER * piece);
    std::vector<u64> s(blocks), d(blocks);
    for (u64 i = 0; i < blocks; ++i) s[i] = d[i] = i;
    std::shuffle(s.begin(), s.end(), rng);
    std::shuffle(d.begin(), d.end(), rng);
    Job j;
    j.src = src;
    j.dst = dst;
    j.ids = table;
    j.piece = piece;
    j.pairs = blocks;
    j.items = LAYERS * blocks * OUTER;
    j.layer_bytes = blocks * OUTER * piece;
    // kvxfer's run length: 64 KiB of pieces, at most 32, never fewer items than warps.
    const unsigned grid = sms * 3;
    const u64 warps = grid * 8;
    u64 run = std::min<u64>(std::max<u64>(65536 / piece, 1), std::max<u64>(j.items / warps, 1));
    run = std::min<u64>(run, 32);
    while (run & (run - 1)) run &= run - 1;
    j.run = run;
    // Host time of packing the ids, the upload call and the launch call (bare rounds).
    std::vector<double> tpack, tup, tlaunch;
    auto launch = [&](bool check, bool timed = false) {
      if (check && !check_ids(s, d, blocks, seen)) {
        fprintf(stderr, "ids rejected\n");
        exit(1);
      }
      const auto a = now();
      for (u64 i = 0; i < blocks; ++i) {
        pinned[2 * i] = (unsigned short)s[i];
        pinned[2 * i + 1] = (unsigned short)d[i];
      }
      const auto b = now();
      CK(cudaMemcpyAsync(table, pinned, blocks * 4, cudaMemcpyHostToDevice, st));
      const auto c = now();
      bare<<<grid, 256, 0, st>>>(j);
      if (timed) {
        tpack.push_back(us(a, b));
        tup.push_back(us(b, c));
        tlaunch.push_back(us(c, now()));
      }
    };
    // Correctness once: every destination piece holds its source piece (first 8 bytes of
    // each 4 KiB of it checked on the host, through a small pinned buffer).
    CK(cudaMemsetAsync(dst, 0, TOTAL, st));
    launch(false);
    CK(cudaStreamSynchronize(st));
    u64 wrong = 0;
    for (unsigned l = 0; l < LAYERS; l += 7)
      for (u64 p = 0; p < blocks; p += blocks / 16)
        for (u64 o = 0; o < OUTER; ++o)
          for (u64 off = 0; off < piece; off += 4096) {
            u64 a = 0, b = 0;
            const u64 at = l * j.layer_bytes + o * piece + off;
            CK(cudaMemcpy(&a, src + at + s[p] * OUTER * piece, 8, cudaMemcpyDeviceToHost));
            CK(cudaMemcpy(&b, dst + at + d[p] * OUTER * piece, 8, cudaMemcpyDeviceToHost));
            wrong += a != b;
          }
    if (wrong) {
      printf("%-8llu WRONG (%llu samples)\n", piece, wrong);
      continue;
    }
    // kvxfer over the same memory: both sides wrapped as layer-separate layouts.
    kvx_layout_config lc;
    kvx_layout_config_init(&lc);
    lc.num_blocks = blocks; lc.num_layers = LAYERS; lc.outer_dim = OUTER; lc.page_size = 1;
    lc.inner_dim = piece / 2; lc.dtype_width_bytes = 2;
    lc.kind = KVX_LAYOUT_KIND_LAYER_SEPARATE_BLOCK_FIRST;
    kvx_storage ds = {KVX_STORAGE_KIND_DEVICE, 0, nullptr};
    kvx_memory sm[LAYERS], dm[LAYERS];
    for (unsigned l = 0; l < LAYERS; ++l) {
      sm[l] = {(uint64_t)(src + l * j.layer_bytes), j.layer_bytes};
      dm[l] = {(uint64_t)(dst + l * j.layer_bytes), j.layer_bytes};
    }
    kvx_layout *sl = nullptr, *dl = nullptr;
    if (kvx_layout_wrap(ctx, &lc, &ds, sm, LAYERS, &sl) != KVX_STATUS_OK ||
        kvx_layout_wrap(ctx, &lc, &ds, dm, LAYERS, &dl) != KVX_STATUS_OK) {
      printf("kvx_layout_wrap: %s\n", kvx_last_error());
      return 1;
    }
    auto kvx = [&] {
      kvx_transfer* t = nullptr;
      if (kvx_transfer_submit(ctx, sl, (const uint64_t*)s.data(), dl, (const uint64_t*)d.data(), blocks, nullptr, &t) != KVX_STATUS_OK ||
          kvx_transfer_wait(t, -1) != KVX_STATUS_OK) {
        printf("kvxfer: %s\n", kvx_last_error());
        exit(1);
      }
      kvx_transfer_free(t);
    };
    std::vector<double> tce, tbare, tchk, tdev, tcheck, tcedev, tbytes, tkvx;
    std::vector<unsigned char> marks;
    for (int r = 0; r < 18; ++r) {
      warm();
      auto t0 = now();
      ce();
      spin();
      const double c = us(t0, now());
      warm();
      t0 = now();
      launch(false, r >= 3);
      spin();
      const double b = us(t0, now());
      warm();
      t0 = now();
      launch(true);
      spin();
      const double k = us(t0, now());
      warm();
      t0 = now();
      kvx();
      const double x = us(t0, now());
      warm();
      CK(cudaEventRecord(e0, st));
      launch(false);
      CK(cudaEventRecord(e1, st));
      CK(cudaEventSynchronize(e1));
      float ms = 0;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      warm();
      CK(cudaEventRecord(e0, st));
      ce();
      CK(cudaEventRecord(e1, st));
      CK(cudaEventSynchronize(e1));
      float ms_ce = 0;
      CK(cudaEventElapsedTime(&ms_ce, e0, e1));
      t0 = now();
      check_ids(s, d, blocks, seen);
      const double v = us(t0, now());
      t0 = now();
      if (!check_ids_bytes(s, d, blocks, marks)) exit(1);
      const double vb = us(t0, now());
      if (r >= 3) {
        tce.push_back(c);
        tbare.push_back(b);
        tchk.push_back(k);
        tdev.push_back(ms * 1000.0);
        tcheck.push_back(v);
        tcedev.push_back(ms_ce * 1000.0);
        tbytes.push_back(vb);
        tkvx.push_back(x);
      }
    }
    const double c = med(tce), b = med(tbare), k = med(tchk), dv = med(tdev);
    printf("%-8llu %6llu %9.1f %9.1f %9.1f %9.1f %8.3f %8.3f %8.3f %8.1f   pack %.1f upload %.1f launch %.1f us, check with bytes %.1f us; kvxfer %.1f us (%.3f)\n",
           piece, blocks, c, b, k, dv, c / b, c / k, med(tcedev) / dv, med(tcheck), med(tpack),
           med(tup), med(tlaunch), med(tbytes), med(tkvx), c / med(tkvx));
    kvx_layout_free(sl);
    kvx_layout_free(dl);
  }
  CK(cudaGetLastError());
  return 0;
}
