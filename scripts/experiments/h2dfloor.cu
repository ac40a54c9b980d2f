// Session 16's experiment: the best a kvxfer-shaped host-to-device transfer of 4 KiB pieces can
// do beside the compute load, from submit to completion (issue: busy engine, point 2: AUTO
// transfer_ratio >= 0.85 at 4 KiB). It repeats `kvxfer bench --gpu --busy --fragments-kib 4`'s
// round with nothing of kvxfer's library around the kernel: the load runs alone (the thread
// waits on its event), then the load is queued again and at once 256 MiB of 65536 scattered
// 4 KiB pieces move from pinned memory to the device: the ids (u64, as callers pass them)
// checked as kvxfer must (all below the block count, no destination twice: a bitmap), packed
// into a pinned table of u16 pairs that kvxfer's own lean kernel (copy_blocks.cu, included)
// reads in place on 18 blocks of a highest-priority stream, an event, and the thread spinning
// on it. Wall time from the first id read to the event seen, against one idle blocking
// copy-engine copy of the 256 MiB (the bench's `limit`), four rows interleaved round by round:
//   bare    pack + launch + spin (the ids' check skipped)
//   checked check, then pack (two passes) + launch + spin
//   kvxfer  kvxfer itself over the same memory (wrapped layouts, AUTO, submit -> wait through
//           the C API); its device time in a round of its own, from an event after a kernel
//           that holds the caller's stream (the options' cuda_stream) until submit returned
//   fused   check and pack in one pass over the ids + launch + spin
// with each host step's time, the kernel's device time beside the load and the load's
// slowdown. Each figure is the median of 9 rounds after 2 warm-up ones. With
// H2DFLOOR_IDLE_FIRST set, kvxfer's first transfer (which builds its kernel and measures its SM
// budget) runs before any load. On the GPU machine, from the repository root, with
// .gpu/libkvxfer.so from `scripts/gpu-test build` (and its soname, libkvxfer.so.0.2, linked
// beside it):
//   nvcc -O3 -arch=sm_90 -o /tmp/h2dfloor scripts/experiments/h2dfloor.cu -L.gpu -lkvxfer \
//     -Xlinker -rpath=$PWD/.gpu && /tmp/h2dfloor
// Session 16, device runs 7 and 12-14: docs/BENCHMARKS.md, "Session 16".
#include <cuda_runtime.h>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>
#include "../../src/exec/cuda/copy_blocks.cu"
#include "common.cuh"
#include "kvx.cuh"
#include "../../cli/src/bench/busy_load.cu"

// The check and the packing in one pass over the ids (two pairs a table word): each id is read
// from memory once.
static bool check_and_pack(const std::vector<u64>& s, const std::vector<u64>& d, u64 n,
                           std::vector<u64>& seen, u64* words) {
  seen.assign((n + 63) / 64, 0);
  u64 bad = 0, repeated = 0;
  for (size_t i = 0; i + 1 < s.size(); i += 2) {
    const u64 s0 = s[i], d0 = d[i], s1 = s[i + 1], d1 = d[i + 1];
    bad |= (s0 >= n) | (d0 >= n) | (s1 >= n) | (d1 >= n);
    words[i / 2] = s0 | (d0 << 16) | (s1 << 32) | (d1 << 48);
    if (bad) return false;
    const u64 b0 = 1ull << (d0 % 64), b1 = 1ull << (d1 % 64);
    repeated |= seen[d0 / 64] & b0;
    seen[d0 / 64] |= b0;
    repeated |= seen[d1 / 64] & b1;
    seen[d1 / 64] |= b1;
  }
  return repeated == 0;
}

// Holds a stream until the host sets the flag.
__global__ void hold(volatile unsigned* flag) {
  while (*flag == 0) {
  }
}

int main() {
  const size_t total = 256ull << 20;
  const unsigned frag = 4096, n = total / frag, ctas = 18;
  int sms = 0, smem_sm = 0, lo, hi;
  CK(cudaSetDevice(0));
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  CK(cudaDeviceGetAttribute(&smem_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, 0));
  CK(cudaDeviceGetStreamPriorityRange(&lo, &hi));
  cudaStream_t cs, ts;
  CK(cudaStreamCreateWithFlags(&cs, cudaStreamNonBlocking));
  CK(cudaStreamCreateWithPriority(&ts, cudaStreamNonBlocking, hi));
  char *hbuf, *dbuf;
  CK(cudaHostAlloc(&hbuf, total, cudaHostAllocPortable));
  CK(cudaMalloc(&dbuf, total));
  for (size_t i = 0; i < total; i += 8) *(u64*)(hbuf + i) = i * 0x9E3779B97F4A7C15ull + 1;
  const size_t words = 2 + n / 2;
  u64 *table, *table_dev;
  CK(cudaHostAlloc(&table, words * 8, cudaHostAllocMapped | cudaHostAllocPortable));
  CK(cudaHostGetDevicePointer((void**)&table_dev, table, 0));
  float* out;
  CK(cudaMalloc(&out, 4));
  const int smem = smem_sm / 2 - 2048;
  CK(cudaFuncSetAttribute(kvx_bench_spin, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const unsigned sblocks = sms * 2 * 8;
  unsigned iters = 256;
  cudaEvent_t c0, c1, done, k0, k1;
  CK(cudaEventCreate(&c0));
  CK(cudaEventCreate(&c1));
  CK(cudaEventCreate(&k0));
  CK(cudaEventCreate(&k1));
  CK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
  auto launch_compute = [&] {
    CK(cudaEventRecord(c0, cs));
    for (int i = 0; i < 50; ++i) kvx_bench_spin<<<sblocks, 256, smem, cs>>>(out, iters);
    CK(cudaGetLastError());
    CK(cudaEventRecord(c1, cs));
  };
  auto compute_ms = [&] {
    CK(cudaEventSynchronize(c1));
    float ms;
    CK(cudaEventElapsedTime(&ms, c0, c1));
    return (double)ms;
  };
  launch_compute();
  compute_ms();
  launch_compute();
  iters = (unsigned)(iters * 50.0 / compute_ms());
  auto now = [] { return std::chrono::steady_clock::now(); };
  auto us = [](auto a, auto b) { return std::chrono::duration<double, std::micro>(b - a).count(); };
  // The bench's limit: one blocking copy-engine copy, idle, wall time.
  std::vector<double> lim;
  for (int r = 0; r < 6; ++r) {
    auto a = now();
    CK(cudaMemcpy(dbuf, hbuf, total, cudaMemcpyHostToDevice));
    if (r) lim.push_back(us(a, now()));
  }
  const double limit_us = med(lim);
  std::vector<u64> s(n), d(n), seen;
  for (unsigned i = 0; i < n; ++i) s[i] = d[i] = i;
  std::mt19937_64 rng(4);
  std::shuffle(s.begin(), s.end(), rng);
  std::shuffle(d.begin(), d.end(), rng);
  Desc dd = {};
  dd.src = Side{KVX_FC, n, frag, frag, 0};
  dd.dst = Side{KVX_FC, n, frag, frag, 1};
  dd.region = frag; dd.outer = 1; dd.layer_begin = 0; dd.layers = 1;
  dd.piece = 65536; dd.pieces_per_region = 1; dd.pairs = n; dd.pair_ids = 2;
  dd.id_bytes = 2; dd.items = n; dd.table = (u64)table_dev; dd.signals = 0;
  dd.system_fence = 0; dd.pieces = 0; dd.run = 1;
  auto pack = [&] {
    table[0] = (u64)hbuf;
    table[1] = (u64)dbuf;
    for (unsigned i = 0; i < n / 2; ++i)
      table[2 + i] = s[2 * i] | (d[2 * i] << 16) | (s[2 * i + 1] << 32) | (d[2 * i + 1] << 48);
  };
  // Correctness once.
  CK(cudaMemset(dbuf, 0, total));
  pack();
  kvx_copy_blocks<<<ctas, 256, 0, ts>>>(dd);
  CK(cudaStreamSynchronize(ts));
  {
    u64 wrong = 0;
    for (unsigned i = 0; i < n; i += 97) {
      u64 v = 0;
      CK(cudaMemcpy(&v, dbuf + d[i] * frag + 8 * (i % 512), 8, cudaMemcpyDeviceToHost));
      wrong += v != *(u64*)(hbuf + s[i] * frag + 8 * (i % 512));
    }
    if (wrong) {
      printf("WRONG: %llu samples\n", wrong);
      return 1;
    }
  }
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("# %s; 256 MiB H2D in 65536 scattered 4 KiB pieces beside the load, %u blocks; limit %.1f us (%.1f GB/s)\n",
         prop.name, ctas, limit_us, total / limit_us / 1e3);
  // kvxfer itself through its C API over the same memory (wrapped), interleaved round by round.
  kvx_context* ctx = kvx_gpu_context();
  kvx_layout_config lc;
  kvx_layout_config_init(&lc);
  lc.num_blocks = n; lc.num_layers = 1; lc.outer_dim = 1; lc.page_size = 1;
  lc.inner_dim = frag / 2; lc.dtype_width_bytes = 2; lc.kind = KVX_LAYOUT_KIND_FULLY_CONTIGUOUS;
  kvx_storage hs = {KVX_STORAGE_KIND_PINNED, 0, nullptr}, ds = {KVX_STORAGE_KIND_DEVICE, 0, nullptr};
  kvx_memory hm = {(uint64_t)hbuf, total}, dm = {(uint64_t)dbuf, total};
  kvx_layout *hl = nullptr, *dl = nullptr;
  if (kvx_layout_wrap(ctx, &lc, &hs, &hm, 1, &hl) != KVX_STATUS_OK ||
      kvx_layout_wrap(ctx, &lc, &ds, &dm, 1, &dl) != KVX_STATUS_OK) {
    printf("kvx_layout_wrap: %s\n", kvx_last_error());
    return 1;
  }
  // With H2DFLOOR_IDLE_FIRST set, kvxfer's first transfer (which builds its kernel and
  // measures the SM budget) runs while the GPU is idle, as the bench's does; without it, beside
  // the load, as a runtime's first transfer may.
  if (getenv("H2DFLOOR_IDLE_FIRST")) {
    kvx_transfer* t = nullptr;
    if (kvx_transfer_submit(ctx, hl, (const uint64_t*)s.data(), dl, (const uint64_t*)d.data(), 1,
                            nullptr, &t) != KVX_STATUS_OK ||
        kvx_transfer_wait(t, -1) != KVX_STATUS_OK)
      return 1;
    kvx_transfer_free(t);
  }
  unsigned kvx_sms = 0;
  const char* names[] = {"bare", "checked", "kvxfer", "fused"};
  std::vector<double> wall[4], tcheck[4], tpack[4], tlaunch[4], dev[4], slow[4];
  for (int r = 0; r < 11; ++r) {
    for (int v = 0; v < 4; ++v) {
      launch_compute();
      const double alone = compute_ms();
      launch_compute();
      const auto a = now();
      double w;
      float ms = 0;
      std::chrono::steady_clock::time_point b = a, c = a, e = a;
      if (v != 2) {
        if (v == 1 && !check_ids(s, d, n, seen)) return 1;
        b = now();
        if (v == 3) {
          table[0] = (u64)hbuf;
          table[1] = (u64)dbuf;
          if (!check_and_pack(s, d, n, seen, table + 2)) return 1;
        } else {
          pack();
        }
        c = now();
        CK(cudaEventRecord(k0, ts));
        kvx_copy_blocks<<<ctas, 256, 0, ts>>>(dd);
        CK(cudaEventRecord(k1, ts));
        CK(cudaEventRecord(done, ts));
        e = now();
        while (cudaEventQuery(done) == cudaErrorNotReady) {
        }
        w = us(a, now());
      } else {
        kvx_transfer* t = nullptr;
        if (kvx_transfer_submit(ctx, hl, (const uint64_t*)s.data(), dl, (const uint64_t*)d.data(), n, nullptr, &t) != KVX_STATUS_OK) {
          printf("submit: %s\n", kvx_last_error());
          return 1;
        }
        e = now();
        if (kvx_transfer_wait(t, -1) != KVX_STATUS_OK) return 1;
        w = us(a, now());
        kvx_transfer_stats st;
        if (kvx_transfer_get_stats(t, &st) == KVX_STATUS_OK) kvx_sms = st.sms;
        kvx_transfer_free(t);
      }
      const double with = compute_ms();
      if (v != 2) CK(cudaEventElapsedTime(&ms, k0, k1));
      if (v == 2) {
        // kvxfer's device time beside the load, in a round of its own: its work ordered
        // after an event on `ts` (the options' cuda_stream) and `ts` made to wait for it.
        launch_compute();
        kvx_transfer_options o;
        kvx_transfer_options_init(&o);
        o.cuda_stream = ts;
        kvx_transfer* t = nullptr;
        unsigned *flag, *flag_dev;
        CK(cudaHostAlloc(&flag, 64, cudaHostAllocMapped));
        CK(cudaHostGetDevicePointer((void**)&flag_dev, flag, 0));
        *(volatile unsigned*)flag = 0;
        hold<<<1, 1, 0, ts>>>(flag_dev);
        CK(cudaEventRecord(k0, ts));
        if (kvx_transfer_submit(ctx, hl, (const uint64_t*)s.data(), dl, (const uint64_t*)d.data(), n, &o, &t) != KVX_STATUS_OK ||
            kvx_transfer_stream_wait(t, ts) != KVX_STATUS_OK)
          return 1;
        CK(cudaEventRecord(k1, ts));
        *(volatile unsigned*)flag = 1;
        CK(cudaEventSynchronize(k1));
        if (kvx_transfer_wait(t, -1) != KVX_STATUS_OK) return 1;
        kvx_transfer_free(t);
        CK(cudaEventElapsedTime(&ms, k0, k1));
        CK(cudaFreeHost(flag));
        compute_ms();
      }
      if (r >= 2) {
        wall[v].push_back(w);
        tcheck[v].push_back(us(a, b));
        tpack[v].push_back(us(b, c));
        tlaunch[v].push_back(us(c, e));
        dev[v].push_back(ms * 1000.0);
        slow[v].push_back(with / alone - 1);
      }
    }
  }
  for (int v = 0; v < 4; ++v) {
    printf("%-8s ratio %.3f (wall %.1f us)  device %.3f (%.1f us)  check %.1f pack %.1f launch %.1f us  load slowdown %.4f\n",
           names[v], limit_us / med(wall[v]), med(wall[v]), limit_us / med(dev[v]),
           med(dev[v]), med(tcheck[v]), med(tpack[v]), med(tlaunch[v]), med(slow[v]));
  }
  printf("# kvxfer's transfers ran on %u SMs%s\n", kvx_sms,
         getenv("H2DFLOOR_IDLE_FIRST") ? " (its first transfer ran idle)" : " (its first transfer ran beside the load)");
  printf("# kvxfer row: launch = the whole submit call; device: in a round of its own, from an event after a kernel that holds the caller's stream until submit returned; check/pack not separable. fused row: check and pack in one pass (its time under pack)\n");
  kvx_layout_free(hl);
  kvx_layout_free(dl);
  kvx_context_free(ctx);
  return 0;
}
