// What the session experiments share: checked CUDA calls, a 16-byte load with an optional L2
// prefetch-size hint (PTX ld.global.L2::128B / L2::256B: the L2 may then ask the link for
// larger pieces than the 32-byte sectors a load needs; session 14 found no difference), a fill
// pattern, the check kvxfer makes of a list of block pairs, and a median.
#pragma once
#include <cuda_runtime.h>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CK(x)                                                                         \
  do {                                                                                \
    cudaError_t e = (x);                                                              \
    if (e != cudaSuccess) {                                                           \
      fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
      exit(1);                                                                        \
    }                                                                                 \
  } while (0)

// HINT: 0 (a plain load), 128 or 256.
template <int HINT>
__device__ __forceinline__ uint4 load16(const uint4* p) {
  if (HINT == 0) return *p;
  uint4 v;
  if (HINT == 256)
    asm volatile("ld.global.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
  else
    asm volatile("ld.global.L2::128B.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
  return v;
}

// A recognisable pattern in `n` bytes of device memory, 8 bytes at a time.
__global__ void fill(char* p, size_t n) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n / 8;
       i += (size_t)gridDim.x * blockDim.x)
    ((unsigned long long*)p)[i] = i * 0x9E3779B97F4A7C15ull + 1;
}

// What kvxfer's validation must establish for block pairs (s[i], d[i]): every id below `n`,
// no destination twice (a bit per block, as its one-pass check).
static bool check_ids(const std::vector<unsigned long long>& s,
                      const std::vector<unsigned long long>& d, unsigned long long n,
                      std::vector<unsigned long long>& seen) {
  unsigned long long bad = 0;
  for (size_t i = 0; i < s.size(); ++i) bad |= (s[i] >= n) | (d[i] >= n);
  if (bad) return false;
  seen.assign((n + 63) / 64, 0);
  unsigned long long repeated = 0;
  for (unsigned long long x : d) {
    const unsigned long long bit = 1ull << (x % 64);
    repeated |= seen[x / 64] & bit;
    seen[x / 64] |= bit;
  }
  return repeated == 0;
}

static double med(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Device 0 made current, a non-blocking stream on it; returns its SM count.
static int start(cudaStream_t* st) {
  CK(cudaSetDevice(0));
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  CK(cudaStreamCreateWithFlags(st, cudaStreamNonBlocking));
  return sms;
}
