// What the session experiments share: checked CUDA calls and a 16-byte load with an optional
// L2 prefetch-size hint (PTX ld.global.L2::128B / L2::256B: the L2 may then ask the link for
// larger pieces than the 32-byte sectors a load needs; session 14 found no difference).
#pragma once
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdlib>

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
