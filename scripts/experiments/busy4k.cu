// Session 13's experiment: what limits the copy kernel's 4 KiB pieces host <-> device beside a
// tensor-core load (docs/BENCHMARKS.md, "Session 13: the copy kernel's item loop beside an
// engine"). On the GPU machine, from the repository root:
//   nvcc -O3 -arch=sm_90 -o /tmp/busy4k scripts/experiments/busy4k.cu && /tmp/busy4k
// runs, for 256 MiB of 4 and 16 KiB pieces (scattered or sequential ids; pinned memory from
// cudaHostAlloc or transparent-huge-page memory registered with cudaHostRegister) on 4-16
// blocks, idle and beside the MMA load of `kvxfer bench --gpu --busy`: a plain warp-per-piece
// copy (`warp1`; variants 1-3, not in the list the loop runs now: `warp2`/`warp4`, two or four
// pieces a warp at once, `half16`, a half-warp per piece), kvxfer's own kernel (`lib`,
// copy_blocks.cu included below, its lean entry) and both with the SM of each block recorded (`*probe`, `*probe1k` with 1 KiB of shared memory so that no two share
// an SM). Columns: idle ratio, the first copy beside the load (as the bench's transfer starts
// with it) and the median of the next five, in device time against one copy-engine copy, the
// load's slowdown, and the distinct SMs of each busy copy. Every variant is checked to have
// copied every byte first. `-DONLY_LIB` runs kvxfer's kernel only (4 KiB, scattered,
// 4/8/12 blocks); `-DLIBSRC='"file.cu"'` takes another version of copy_blocks.cu: session 13
// compared the kernel of 8eb9620 with copies changed one way each (the Desc parameter
// __grid_constant__, split() in 32-bit, copy_small() off) and in pairs (their copy_items is no
// template: add -DLIB_LOOP=copy_items). Session 14 added `warp1_L2_256B` (the plain copy with
// the L2::256B prefetch-size hint on each load) and `-DHINT_ONLY`, which runs the
// plain copy, kvxfer's kernel and the hinted copy on 8, 12 and 18 blocks, 4 and 16 KiB,
// scattered, pinned (device runs 3 and 9: the hint changes nothing).
#include <cuda_runtime.h>
#include <sys/mman.h>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>
#ifndef LIBSRC
#define LIBSRC "../../src/exec/cuda/copy_blocks.cu"
#endif
#include LIBSRC
#ifndef LIB_LOOP
#define LIB_LOOP copy_items<unsigned, false>
#endif

#include "common.cuh"

// The bench's compute load, `kvx_bench_spin`.
#include "../../cli/src/bench/busy_load.cu"

__device__ __forceinline__ unsigned smid_() {
  unsigned r;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(r));
  return r;
}

// U pieces per warp at a time, 8 16-byte accesses per lane per piece in flight, each with the
// L2 hint HINT (common.cuh); with `smids`, each block writes down its SM.
template <int U, int HINT = 0>
__global__ void __launch_bounds__(256) copyk(const char* src, char* dst, const unsigned* sid,
                                             const unsigned* did, unsigned n, unsigned frag,
                                             unsigned* smids) {
  if (smids && threadIdx.x == 0) smids[blockIdx.x] = smid_();
  const unsigned lane = threadIdx.x & 31u;
  const unsigned warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const unsigned warps = (gridDim.x * blockDim.x) >> 5;
  const unsigned n16 = frag >> 4;
  for (unsigned p = warp * U; p < n; p += warps * U) {
    const uint4* s[U];
    uint4* d[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const unsigned q = min(p + u, n - 1);
      s[u] = (const uint4*)(src + (size_t)sid[q] * frag);
      d[u] = (uint4*)(dst + (size_t)did[q] * frag);
    }
    for (unsigned j = lane; j < n16; j += 256) {
      uint4 v[U][8];
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int k = 0; k < 8; ++k) v[u][k] = load16<HINT>(s[u] + j + 32 * k);
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int k = 0; k < 8; ++k) d[u][j + 32 * k] = v[u][k];
    }
  }
}

// A half-warp per piece: 16 lanes x 16 B = 256 B per access, 16 accesses in flight a lane.
__global__ void __launch_bounds__(256) copyh(const char* src, char* dst, const unsigned* sid,
                                             const unsigned* did, unsigned n, unsigned frag) {
  const unsigned lane = threadIdx.x & 15u;
  const unsigned half = (blockIdx.x * blockDim.x + threadIdx.x) >> 4;
  const unsigned halves = (gridDim.x * blockDim.x) >> 4;
  const unsigned n16 = frag >> 4;
  for (unsigned p = half; p < n; p += halves) {
    const uint4* s = (const uint4*)(src + (size_t)sid[p] * frag);
    uint4* d = (uint4*)(dst + (size_t)did[p] * frag);
    for (unsigned j = lane; j < n16; j += 256) {
      uint4 v[16];
#pragma unroll
      for (int k = 0; k < 16; ++k) v[k] = s[j + 16 * k];
#pragma unroll
      for (int k = 0; k < 16; ++k) d[j + 16 * k] = v[k];
    }
  }
}

__global__ void __launch_bounds__(256) lib_probe(const Desc d, unsigned* smids) {
  if (threadIdx.x == 0) smids[blockIdx.x] = smid_();
  LIB_LOOP(d, (const u64*)d.table);
}
static float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int main() {
  const size_t total = 256ull << 20;
  int dev = 0, sms = 0, smem_sm = 0;
  CK(cudaSetDevice(dev));
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  CK(cudaDeviceGetAttribute(&smem_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev));
  int lo, hi;
  CK(cudaDeviceGetStreamPriorityRange(&lo, &hi));
  cudaStream_t cs, ts;
  CK(cudaStreamCreateWithFlags(&cs, cudaStreamNonBlocking));
  CK(cudaStreamCreateWithPriority(&ts, cudaStreamNonBlocking, hi));
  char *hbuf, *dbuf;
  CK(cudaHostAlloc(&hbuf, total, cudaHostAllocPortable));
  CK(cudaMalloc(&dbuf, total));
  // THP-backed host memory, registered.
  char* tbuf = nullptr;
  if (posix_memalign((void**)&tbuf, 2 << 20, total) != 0) return 1;
  int adv = madvise(tbuf, total, MADV_HUGEPAGE);
  memset(tbuf, 1, total);
  CK(cudaHostRegister(tbuf, total, cudaHostRegisterPortable));
  memset(hbuf, 2, total);
  CK(cudaMemset(dbuf, 3, total));
  {
    FILE* f = fopen("/proc/meminfo", "r");
    char line[256];
    while (f && fgets(line, sizeof line, f))
      if (strstr(line, "AnonHuge") || strstr(line, "Hugepagesize")) printf("# %s", line);
    if (f) fclose(f);
    printf("# madvise=%d sms=%d smem_sm=%d prio=[%d,%d]\n", adv, sms, smem_sm, lo, hi);
  }
  float* out;
  CK(cudaMalloc(&out, 4));
  int smem = smem_sm / 2 - 2048;
  CK(cudaFuncSetAttribute(kvx_bench_spin, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const unsigned sblocks = sms * 2 * 8;
  unsigned iters = 256;
  cudaEvent_t c0, c1, t0[8], t1[8];
  CK(cudaEventCreate(&c0));
  CK(cudaEventCreate(&c1));
  for (int i = 0; i < 8; ++i) {
    CK(cudaEventCreate(&t0[i]));
    CK(cudaEventCreate(&t1[i]));
  }
  auto launch_compute = [&]() {
    CK(cudaEventRecord(c0, cs));
    for (int i = 0; i < 50; ++i) kvx_bench_spin<<<sblocks, 256, smem, cs>>>(out, iters);
    CK(cudaGetLastError());
    CK(cudaEventRecord(c1, cs));
  };
  auto compute_ms = [&]() {
    CK(cudaEventSynchronize(c1));
    float ms;
    CK(cudaEventElapsedTime(&ms, c0, c1));
    return ms;
  };
  launch_compute();
  compute_ms();
  launch_compute();
  float ms = compute_ms();
  iters = (unsigned)(iters * 50.0 / ms);
  std::vector<float> alone;
  for (int i = 0; i < 3; ++i) {
    launch_compute();
    alone.push_back(compute_ms());
  }
  float alone_ms = median(alone);
  // Limits: one large copy each way.
  float lim[2];
  for (int d = 0; d < 2; ++d) {
    std::vector<float> t;
    for (int r = 0; r < 5; ++r) {
      CK(cudaEventRecord(t0[0], ts));
      if (d == 0)
        CK(cudaMemcpyAsync(dbuf, hbuf, total, cudaMemcpyHostToDevice, ts));
      else
        CK(cudaMemcpyAsync(hbuf, dbuf, total, cudaMemcpyDeviceToHost, ts));
      CK(cudaEventRecord(t1[0], ts));
      CK(cudaEventSynchronize(t1[0]));
      float m;
      CK(cudaEventElapsedTime(&m, t0[0], t1[0]));
      t.push_back(m);
    }
    lim[d] = total / median(t) / 1e6;
  }
  printf("# compute alone %.2f ms; limit H2D %.1f D2H %.1f GB/s\n", alone_ms, lim[0], lim[1]);
  printf("dir mem ids frag variant ctas idle_ratio busy_first busy_ratio slowdown\n");
  unsigned *sid, *did;
  u64* table;
  unsigned* smids;
  CK(cudaMalloc(&smids, 64 * 8 * 4));
  CK(cudaMalloc(&table, (2 + total / 4096) * 8));
  CK(cudaMalloc(&sid, (total / 4096) * 4));
  CK(cudaMalloc(&did, (total / 4096) * 4));
  for (unsigned frag : {4096u, 16384u}) {
    const unsigned n = total / frag;
    for (int seq = 0; seq < 2; ++seq) {
      std::vector<unsigned> a(n), b(n);
      for (unsigned i = 0; i < n; ++i) a[i] = b[i] = i;
      if (!seq) {
        std::mt19937_64 rng(frag);
        std::shuffle(a.begin(), a.end(), rng);
        std::shuffle(b.begin(), b.end(), rng);
      }
      CK(cudaMemcpy(sid, a.data(), n * 4, cudaMemcpyHostToDevice));
      CK(cudaMemcpy(did, b.data(), n * 4, cudaMemcpyHostToDevice));
      // kvxfer's table: the two bases (set per case), then the pairs, 16 bits per id.
      std::vector<u64> words(2 + n / 2);
      for (unsigned i = 0; i < n / 2; ++i)
        words[2 + i] = (u64)a[2 * i] | ((u64)b[2 * i] << 16) | ((u64)a[2 * i + 1] << 32) |
                       ((u64)b[2 * i + 1] << 48);
      for (int mem = 0; mem < 2; ++mem) {
        if (frag != 4096 && mem) continue;
        char* host = mem ? tbuf : hbuf;
        for (int dir = 0; dir < 2; ++dir) {
          for (int var : {0, 4, 5, 6, 7, 8, 9}) {
#ifdef HINT_ONLY
            if (var != 0 && var != 4 && var != 9) continue;
            if (seq || mem) continue;
#endif
            if (frag != 4096 && var == 1) continue;
            if (seq && var == 1) continue;
            if (mem && var == 1) continue;
            for (unsigned ctas : {4u, 8u, 12u, 16u, 18u}) {
#ifdef HINT_ONLY
              if (ctas == 4 || ctas == 16) continue;
#else
              if (ctas == 18) continue;
#endif
#ifdef ONLY_LIB
              if (frag != 4096 || seq || mem || var != 4 || ctas == 16) continue;
#endif
              words[0] = (u64)(dir == 0 ? host : dbuf);
              words[1] = (u64)(dir == 0 ? dbuf : host);
              CK(cudaMemcpy(table, words.data(), words.size() * 8, cudaMemcpyHostToDevice));
              int slot = 0;
              auto go = [&](cudaStream_t s) {
                unsigned* sm = smids + 64 * (slot++ % 8);
                const char* src = dir == 0 ? host : dbuf;
                char* dst = dir == 0 ? dbuf : host;
                if (var == 0) copyk<1><<<ctas, 256, 0, s>>>(src, dst, sid, did, n, frag, nullptr);
                if (var == 1) copyk<2><<<ctas, 256, 0, s>>>(src, dst, sid, did, n, frag, nullptr);
                if (var == 2) copyk<4><<<ctas, 256, 0, s>>>(src, dst, sid, did, n, frag, nullptr);
                if (var == 3) copyh<<<ctas, 256, 0, s>>>(src, dst, sid, did, n, frag);
                if (var >= 4 && var <= 6) {
                  Desc dd = {};
                  dd.src = Side{0, n, frag, frag, 0};
                  dd.dst = Side{0, n, frag, frag, 1};
                  dd.region = frag; dd.outer = 1; dd.layer_begin = 0; dd.layers = 1;
                  dd.piece = 65536; dd.pieces_per_region = 1; dd.pairs = n; dd.pair_ids = 2;
                  dd.id_bytes = 2; dd.items = n; dd.table = (u64)table; dd.signals = 0;
                  dd.system_fence = 0; dd.pieces = 0; dd.run = 1;
                  if (var == 4) kvx_copy_blocks<<<ctas, 256, 0, s>>>(dd);
                  if (var == 5) lib_probe<<<ctas, 256, 0, s>>>(dd, sm);
                  if (var == 6) lib_probe<<<ctas, 256, 1024, s>>>(dd, sm);
                }
                if (var == 7) copyk<1><<<ctas, 256, 0, s>>>(src, dst, sid, did, n, frag, sm);
                if (var == 8) copyk<1><<<ctas, 256, 1024, s>>>(src, dst, sid, did, n, frag, sm);
                if (var == 9) copyk<1, 256><<<ctas, 256, 0, s>>>(src, dst, sid, did, n, frag, nullptr);
              };
              // Correctness: every destination byte gets the source's fill.
              {
                const char* src = dir == 0 ? host : dbuf;
                char* dst = dir == 0 ? dbuf : host;
                if (dir == 0) { memset(host, 9, total); CK(cudaMemset(dbuf, 3, total)); }
                else { memset(host, 5, total); CK(cudaMemset(dbuf, 7, total)); }
                CK(cudaDeviceSynchronize());
                go(ts);
                CK(cudaStreamSynchronize(ts));
                static std::vector<char> chk(total);
                const char* got = host;
                if (dir == 0) { CK(cudaMemcpy(chk.data(), dbuf, total, cudaMemcpyDeviceToHost)); got = chk.data(); }
                const char want = dir == 0 ? 9 : 7;
                size_t bad = 0;
                for (size_t i = 0; i < total; ++i) bad += got[i] != want;
                if (bad) printf("# WRONG: %zu bytes not copied (var %d dir %d)\n", bad, var, dir);
                (void)src; (void)dst;
              }
              // Queues `rounds` copies back to back, each between two events; `times` waits for
              // them and gives each one's milliseconds.
              auto queue = [&](int rounds) {
                for (int r = 0; r < rounds; ++r) {
                  CK(cudaEventRecord(t0[r], ts));
                  go(ts);
                  CK(cudaEventRecord(t1[r], ts));
                }
                CK(cudaGetLastError());
              };
              auto times = [&](int rounds) {
                CK(cudaStreamSynchronize(ts));
                std::vector<float> v(rounds);
                for (int r = 0; r < rounds; ++r) CK(cudaEventElapsedTime(&v[r], t0[r], t1[r]));
                return v;
              };
              // Idle: the first copy warms up.
              queue(4);
              std::vector<float> t = times(4);
              float idle = total / median(std::vector<float>(t.begin() + 1, t.end())) / 1e6 / lim[dir];
              // Busy: the first copy as the load starts, five more inside its window.
              CK(cudaMemset(smids, 0xff, 64 * 8 * 4));
              slot = 0;
              launch_compute();
              queue(6);
              float with = compute_ms();
              t = times(6);
              const float first = total / t[0] / 1e6 / lim[dir];
              t.erase(t.begin());
              float busy = total / median(t) / 1e6 / lim[dir];
              int distinct[6] = {};
              {
                std::vector<unsigned> h(64 * 8);
                CK(cudaMemcpy(h.data(), smids, h.size() * 4, cudaMemcpyDeviceToHost));
                for (int r = 0; r < 6; ++r) {
                  std::vector<unsigned> v(h.begin() + 64 * r, h.begin() + 64 * r + ctas);
                  std::sort(v.begin(), v.end());
                  distinct[r] = std::unique(v.begin(), v.end()) - v.begin();
                  if (v[0] == 0xffffffffu) distinct[r] = -1;
                }
              }
              const char* vn[] = {"warp1", "warp2", "warp4", "half16", "lib", "libprobe", "libprobe1k", "warpprobe", "warpprobe1k", "warp1_L2_256B"};
              printf("%s %s %s %u %s %u %.3f %.3f %.3f %.4f sms %d %d %d %d %d %d\n", dir ? "D2H" : "H2D",
                     mem ? "thp" : "pinned", seq ? "seq" : "scat", frag >> 10, vn[var], ctas,
                     idle, first, busy, with / alone_ms - 1, distinct[0], distinct[1], distinct[2], distinct[3], distinct[4], distinct[5]);
              fflush(stdout);
            }
          }
        }
      }
    }
  }
  return 0;
}
