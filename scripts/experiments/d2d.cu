// Session 16's experiment: how close can any SM copy come to one large copy-engine copy device
// to device on this GPU (issue: busy engine, point 5: scattered D2D >= 0.90 of one large copy,
// submit -> completion)? kvxfer's kernel moves 1 GiB of 4 KiB pieces in 0.90-0.94 of the copy
// engine's device time on the H200s; this program times, with CUDA events and nothing of
// kvxfer's around them, plain copies of the same 1 GiB: contiguous, and as 262144 scattered
// 4 KiB pieces (shuffled ids on both sides, read from device memory), with several grids, load
// and store hints, and Hopper bulk copies (TMA) pipelined through shared memory. On the GPU
// machine, from the repository root:
//   nvcc -O3 -arch=sm_90 -o /tmp/d2d scripts/experiments/d2d.cu && /tmp/d2d
// Each way: 3 warm-up runs, then the median of 15 (device µs) and its ratio to the copy
// engine's median (measured before and after every way; their mean is used). Every scattered
// way is first checked to have moved every piece to its place. Session 16, device run 2:
// docs/BENCHMARKS.md, "Session 16".
#include <cuda_runtime.h>
#include <algorithm>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>
#include "common.cuh"

constexpr size_t TOTAL = 1ull << 30;
constexpr unsigned PIECE = 4096, PIECES = TOTAL / PIECE;

// Loads and stores: plain, non-coherent loads that skip L1, or both with an L2 evict-first
// policy (createpolicy): the copy reuses nothing.
enum Hint { PLAIN = 0, NC = 1, EVICT_FIRST = 2, STREAM_STORE = 3 };

template <int H>
__device__ __forceinline__ uint4 ld(const uint4* p, unsigned long long pol) {
  uint4 v;
  if (H == NC) {
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
  } else if (H == EVICT_FIRST) {
    asm volatile("ld.global.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p), "l"(pol));
  } else {
    v = *p;
  }
  return v;
}

template <int H>
__device__ __forceinline__ void st(uint4* p, uint4 v, unsigned long long pol) {
  if (H == EVICT_FIRST) {
    asm volatile("st.global.L2::cache_hint.v4.u32 [%0], {%1,%2,%3,%4}, %5;" ::"l"(p), "r"(v.x),
                 "r"(v.y), "r"(v.z), "r"(v.w), "l"(pol)
                 : "memory");
  } else if (H == STREAM_STORE) {
    __stcs(p, v);
  } else {
    *p = v;
  }
}

__device__ __forceinline__ unsigned long long policy() {
  unsigned long long pol;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
  return pol;
}

// One warp copies one 4 KiB piece: 8 loads of 16 bytes in flight per lane, then 8 stores (as
// kvxfer's copy_piece). Piece i of the destination takes piece sid[i] of the source to did[i];
// contiguous when the ids are null.
template <int H>
__global__ void __launch_bounds__(256) warp_pieces(const char* src, char* dst, const unsigned* sid,
                                                   const unsigned* did, unsigned n) {
  const unsigned lane = threadIdx.x & 31u;
  const unsigned warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const unsigned warps = (gridDim.x * blockDim.x) >> 5;
  const unsigned long long pol = H == EVICT_FIRST ? policy() : 0;
  for (unsigned i = warp; i < n; i += warps) {
    const size_t s = (size_t)(sid ? sid[i] : i) * PIECE, d = (size_t)(did ? did[i] : i) * PIECE;
    const uint4* a = (const uint4*)(src + s) + lane;
    uint4* b = (uint4*)(dst + d) + lane;
    uint4 v[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = ld<H>(a + 32 * k, pol);
#pragma unroll
    for (int k = 0; k < 8; ++k) st<H>(b + 32 * k, v[k], pol);
  }
}

// Two pieces in flight per warp (16 loads per lane), as one unrolled step.
__global__ void __launch_bounds__(256) warp_pairs(const char* src, char* dst, const unsigned* sid,
                                                  const unsigned* did, unsigned n) {
  const unsigned lane = threadIdx.x & 31u;
  const unsigned warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const unsigned warps = (gridDim.x * blockDim.x) >> 5;
  for (unsigned i = 2 * warp; i < n; i += 2 * warps) {
    const uint4* a0 = (const uint4*)(src + (size_t)sid[i] * PIECE) + lane;
    const uint4* a1 = (const uint4*)(src + (size_t)sid[i + 1] * PIECE) + lane;
    uint4* b0 = (uint4*)(dst + (size_t)did[i] * PIECE) + lane;
    uint4* b1 = (uint4*)(dst + (size_t)did[i + 1] * PIECE) + lane;
    uint4 v[16];
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = a0[32 * k];
#pragma unroll
    for (int k = 0; k < 8; ++k) v[8 + k] = a1[32 * k];
#pragma unroll
    for (int k = 0; k < 8; ++k) b0[32 * k] = v[k];
#pragma unroll
    for (int k = 0; k < 8; ++k) b1[32 * k] = v[8 + k];
  }
}

// A whole block (256 threads) copies one piece with one 16-byte load each.
__global__ void __launch_bounds__(256) block_pieces(const char* src, char* dst, const unsigned* sid,
                                                    const unsigned* did, unsigned n) {
  for (unsigned i = blockIdx.x; i < n; i += gridDim.x) {
    const uint4* a = (const uint4*)(src + (size_t)sid[i] * PIECE);
    uint4* b = (uint4*)(dst + (size_t)did[i] * PIECE);
    b[threadIdx.x] = a[threadIdx.x];
  }
}

// Hopper bulk copies, pipelined: one thread per block keeps STAGES pieces in flight through
// shared memory (a load completing on the stage's mbarrier, then a bulk store; a stage is
// reused once its store has read the buffer).
template <unsigned STAGES>
__global__ void __launch_bounds__(32) bulk_pipe(const char* src, char* dst, const unsigned* sid,
                                                const unsigned* did, unsigned n) {
  extern __shared__ __align__(128) char buf[];
  __shared__ __align__(8) unsigned long long bar[STAGES];
  if (threadIdx.x != 0) return;
  for (unsigned s = 0; s < STAGES; ++s) {
    asm volatile("mbarrier.init.shared.b64 [%0], 1;" ::"r"((unsigned)__cvta_generic_to_shared(&bar[s])));
  }
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  unsigned phase[STAGES];
  for (unsigned s = 0; s < STAGES; ++s) phase[s] = 0;
  auto issue = [&](unsigned i, unsigned s) {
    const unsigned b = (unsigned)__cvta_generic_to_shared(&bar[s]);
    const unsigned sb = (unsigned)__cvta_generic_to_shared(buf + s * PIECE);
    asm volatile("mbarrier.arrive.expect_tx.shared.b64 _, [%0], %1;" ::"r"(b), "r"(PIECE) : "memory");
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(sb),
        "l"(src + (size_t)sid[i] * PIECE), "r"(PIECE), "r"(b)
        : "memory");
  };
  unsigned first = blockIdx.x;
  // Prime: the first STAGES pieces of this block.
  for (unsigned s = 0; s < STAGES; ++s) {
    const unsigned i = first + s * gridDim.x;
    if (i < n) issue(i, s);
  }
  unsigned k = 0;  // pieces of this block done
  for (unsigned i = first; i < n; i += gridDim.x, ++k) {
    const unsigned s = k % STAGES;
    const unsigned b = (unsigned)__cvta_generic_to_shared(&bar[s]);
    unsigned done = 0;
    while (!done) {
      asm volatile(
          "{ .reg .pred p; mbarrier.try_wait.parity.shared.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
          : "=r"(done)
          : "r"(b), "r"(phase[s])
          : "memory");
    }
    phase[s] ^= 1;
    const unsigned sb = (unsigned)__cvta_generic_to_shared(buf + s * PIECE);
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(
                     dst + (size_t)did[i] * PIECE),
                 "r"(sb), "r"(PIECE)
                 : "memory");
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
    // Refill this stage once its store has read it: allow the other STAGES-1 groups pending.
    const unsigned next = i + STAGES * gridDim.x;
    if (next < n) {
      asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(0) : "memory");
      issue(next, s);
    }
  }
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

__global__ void check(const char* src, const char* dst, const unsigned* sid, const unsigned* did,
                      unsigned n, unsigned* bad) {
  for (size_t w = (size_t)blockIdx.x * blockDim.x + threadIdx.x; w < (size_t)n * (PIECE / 8);
       w += (size_t)gridDim.x * blockDim.x) {
    const size_t i = w / (PIECE / 8), o = (w % (PIECE / 8)) * 8;
    if (*(const unsigned long long*)(src + (size_t)sid[i] * PIECE + o) !=
        *(const unsigned long long*)(dst + (size_t)did[i] * PIECE + o))
      atomicAdd(bad, 1u);
  }
}

int main() {
  cudaStream_t st;
  const int sms = start(&st);
  char *src, *dst;
  CK(cudaMalloc(&src, TOTAL));
  CK(cudaMalloc(&dst, TOTAL));
  fill<<<1024, 256, 0, st>>>(src, TOTAL);
  std::vector<unsigned> s(PIECES), d(PIECES);
  for (unsigned i = 0; i < PIECES; ++i) s[i] = d[i] = i;
  std::mt19937_64 rng(7);
  std::shuffle(s.begin(), s.end(), rng);
  std::shuffle(d.begin(), d.end(), rng);
  unsigned *sid, *did, *bad;
  CK(cudaMalloc(&sid, PIECES * 4));
  CK(cudaMalloc(&did, PIECES * 4));
  CK(cudaMalloc(&bad, 4));
  CK(cudaMemcpy(sid, s.data(), PIECES * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(did, d.data(), PIECES * 4, cudaMemcpyHostToDevice));
  CK(cudaStreamSynchronize(st));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  auto time = [&](const std::function<void()>& go, int reps) {
    std::vector<double> t;
    for (int r = 0; r < 3 + reps; ++r) {
      CK(cudaEventRecord(e0, st));
      go();
      CK(cudaEventRecord(e1, st));
      CK(cudaEventSynchronize(e1));
      float ms = 0;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      if (r >= 3) t.push_back(ms * 1000.0);
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
  };
  auto ce = [&] { CK(cudaMemcpyAsync(dst, src, TOTAL, cudaMemcpyDeviceToDevice, st)); };
  struct Way {
    std::string name;
    bool scattered;
    std::function<void()> go;
  };
  std::vector<Way> ways;
  for (int per : {2, 4, 8}) {
    const unsigned g = sms * per;
    ways.push_back({"contiguous, warp per 4 KiB, " + std::to_string(per) + " blocks/SM", false,
                    [=] { warp_pieces<PLAIN><<<g, 256, 0, st>>>(src, dst, nullptr, nullptr, PIECES); }});
  }
  for (int per : {2, 3, 4, 8}) {
    const unsigned g = sms * per;
    ways.push_back({"scattered, warp per piece, " + std::to_string(per) + " blocks/SM", true,
                    [=] { warp_pieces<PLAIN><<<g, 256, 0, st>>>(src, dst, sid, did, PIECES); }});
  }
  ways.push_back({"scattered, nc loads, 2 blocks/SM", true,
                  [=] { warp_pieces<NC><<<sms * 2, 256, 0, st>>>(src, dst, sid, did, PIECES); }});
  ways.push_back({"scattered, nc loads, 4 blocks/SM", true,
                  [=] { warp_pieces<NC><<<sms * 4, 256, 0, st>>>(src, dst, sid, did, PIECES); }});
  ways.push_back({"scattered, L2 evict_first, 2 blocks/SM", true,
                  [=] { warp_pieces<EVICT_FIRST><<<sms * 2, 256, 0, st>>>(src, dst, sid, did, PIECES); }});
  ways.push_back({"scattered, L2 evict_first, 4 blocks/SM", true,
                  [=] { warp_pieces<EVICT_FIRST><<<sms * 4, 256, 0, st>>>(src, dst, sid, did, PIECES); }});
  ways.push_back({"scattered, .cs stores, 2 blocks/SM", true,
                  [=] { warp_pieces<STREAM_STORE><<<sms * 2, 256, 0, st>>>(src, dst, sid, did, PIECES); }});
  ways.push_back({"scattered, two pieces per warp, 2 blocks/SM", true,
                  [=] { warp_pairs<<<sms * 2, 256, 0, st>>>(src, dst, sid, did, PIECES); }});
  ways.push_back({"scattered, block per piece, 8 blocks/SM", true,
                  [=] { block_pieces<<<sms * 8, 256, 0, st>>>(src, dst, sid, did, PIECES); }});
  for (int per : {4, 8, 16}) {
    for (unsigned stages : {2u, 4u, 8u}) {
      const unsigned g = sms * per;
      const size_t smem = stages * PIECE;
      if (per * smem > 200 * 1024) continue;
      ways.push_back({"scattered, bulk (TMA) " + std::to_string(stages) + " stages, " +
                          std::to_string(per) + " blocks/SM",
                      true, [=] {
                        if (stages == 2) bulk_pipe<2><<<g, 32, smem, st>>>(src, dst, sid, did, PIECES);
                        if (stages == 4) bulk_pipe<4><<<g, 32, smem, st>>>(src, dst, sid, did, PIECES);
                        if (stages == 8) bulk_pipe<8><<<g, 32, smem, st>>>(src, dst, sid, did, PIECES);
                      }});
    }
  }
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("# %s, %d SMs; 1 GiB device to device, %u pieces of %u B; median of 15 (us)\n", prop.name,
         sms, PIECES, PIECE);
  double before = time(ce, 15);
  printf("%-52s %9s %7s\n", "way", "us", "/ce");
  printf("%-52s %9.1f %7.3f\n", "copy engine, one cudaMemcpyAsync", before, 1.0);
  for (auto& w : ways) {
    if (w.scattered) {
      CK(cudaMemsetAsync(dst, 0, TOTAL, st));
      CK(cudaMemsetAsync(bad, 0, 4, st));
      w.go();
      check<<<2048, 256, 0, st>>>(src, dst, sid, did, PIECES, bad);
      unsigned b = 0;
      CK(cudaMemcpyAsync(&b, bad, 4, cudaMemcpyDeviceToHost, st));
      CK(cudaStreamSynchronize(st));
      if (b) {
        printf("%-52s WRONG (%u words)\n", w.name.c_str(), b);
        continue;
      }
    }
    const double us = time(w.go, 15);
    const double after = time(ce, 15);
    printf("%-52s %9.1f %7.3f   (ce %.1f / %.1f)\n", w.name.c_str(), us, (before + after) / 2 / us,
           before, after);
    before = after;
  }
  CK(cudaGetLastError());
  return 0;
}
