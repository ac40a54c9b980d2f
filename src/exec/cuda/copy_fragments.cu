// kvxfer's gather/scatter kernel: copies a list of (src, dst, len) fragments given as a table of
// u64 triples. One warp copies one fragment at a time with 16-byte accesses, four in flight per
// lane so that reads of mapped host memory across PCIe keep enough bytes outstanding; warps
// stride over the list. Compiled with NVRTC at run time (or nvcc at build), the same source.
typedef unsigned long long u64;

extern "C" __global__ void __launch_bounds__(256)
kvx_copy_fragments(const u64* __restrict__ table, u64 count) {
  const unsigned lane = threadIdx.x & 31u;
  const u64 warp = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const u64 warps = ((u64)gridDim.x * blockDim.x) >> 5;
  for (u64 i = warp; i < count; i += warps) {
    const char* src = (const char*)table[3 * i];
    char* dst = (char*)table[3 * i + 1];
    const u64 len = table[3 * i + 2];
    if ((((u64)src | (u64)dst) & 15u) == 0) {
      const uint4* s = (const uint4*)src;
      uint4* d = (uint4*)dst;
      const u64 n = len >> 4;
      u64 j = lane;
      for (; j + 96 < n; j += 128) {
        const uint4 a = s[j];
        const uint4 b = s[j + 32];
        const uint4 c = s[j + 64];
        const uint4 e = s[j + 96];
        d[j] = a;
        d[j + 32] = b;
        d[j + 64] = c;
        d[j + 96] = e;
      }
      for (; j < n; j += 32) d[j] = s[j];
      for (u64 k = (n << 4) + lane; k < len; k += 32) dst[k] = src[k];
    } else {
      for (u64 k = lane; k < len; k += 32) dst[k] = src[k];
    }
  }
}
