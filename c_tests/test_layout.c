/* Layouts: address formulas, allocation kinds, caller-owned memory, fill and checksum. */
#include <stdlib.h>

#include "common.h"

static kvx_storage storage(int32_t kind) {
  kvx_storage s;
  s.kind = kind;
  s.device_id = 0;
  s.path = NULL;
  return s;
}

static void address_formulas(void) {
  kvx_context *ctx = test_context(1);
  CHECK(ctx != NULL);
  kvx_storage sys = storage(KVX_STORAGE_KIND_SYSTEM);
  /* region = 4 tokens x 6 x 2 bytes = 48; FC block = 3 layers x 2 outer x 48 = 288 -> 512. */
  kvx_layout_config c;
  kvx_layout_config_init(&c);
  c.num_blocks = 10;
  c.num_layers = 3;
  c.outer_dim = 2;
  c.page_size = 4;
  c.inner_dim = 6;
  c.alignment = 256;

  kvx_layout *fc = NULL;
  CHECK_OK(kvx_layout_new(ctx, &c, &sys, &fc));
  kvx_memory base, r;
  CHECK_OK(kvx_layout_region(fc, 0, 0, 0, &base));
  CHECK(base.size == 48 && base.addr % 4096 == 0);
  CHECK_OK(kvx_layout_region(fc, 3, 2, 1, &r));
  CHECK(r.addr == base.addr + 3 * 512 + 2 * 96 + 48);

  c.kind = KVX_LAYOUT_KIND_LAYER_SEPARATE_BLOCK_FIRST; /* block stride 96 -> 256 */
  kvx_layout *bf = NULL;
  CHECK_OK(kvx_layout_new(ctx, &c, &sys, &bf));
  kvx_memory l2;
  CHECK_OK(kvx_layout_region(bf, 0, 2, 0, &l2));
  CHECK_OK(kvx_layout_region(bf, 7, 2, 1, &r));
  CHECK(r.addr == l2.addr + 7 * 256 + 48);

  c.kind = KVX_LAYOUT_KIND_LAYER_SEPARATE_OUTER_FIRST;
  kvx_layout *of = NULL;
  CHECK_OK(kvx_layout_new(ctx, &c, &sys, &of));
  CHECK_OK(kvx_layout_region(of, 0, 1, 0, &l2));
  CHECK_OK(kvx_layout_region(of, 4, 1, 1, &r));
  CHECK(r.addr == l2.addr + 10 * 48 + 4 * 48);

  /* Index checks: output untouched. */
  kvx_memory untouched = {1, 2};
  CHECK_STATUS(kvx_layout_region(fc, 10, 0, 0, &untouched), KVX_STATUS_OUT_OF_RANGE);
  CHECK(strstr(kvx_last_error(), "block 10") != NULL);
  CHECK_STATUS(kvx_layout_region(fc, 0, 3, 0, &untouched), KVX_STATUS_OUT_OF_RANGE);
  CHECK_STATUS(kvx_layout_region(fc, 0, 0, 2, &untouched), KVX_STATUS_OUT_OF_RANGE);
  CHECK_STATUS(kvx_layout_region(NULL, 0, 0, 0, &untouched), KVX_STATUS_NULL_ARGUMENT);
  CHECK_STATUS(kvx_layout_region(fc, 0, 0, 0, NULL), KVX_STATUS_NULL_ARGUMENT);
  CHECK(untouched.addr == 1 && untouched.size == 2);

  kvx_layout_free(fc);
  kvx_layout_free(bf);
  kvx_layout_free(of);
  kvx_layout_free(NULL);
  kvx_context_free(ctx);
}

static void dtype_widths(void) {
  kvx_context *ctx = test_context(1);
  CHECK(ctx != NULL);
  kvx_storage pin = storage(KVX_STORAGE_KIND_PINNED);
  uint32_t widths[] = {1, 2, 4, 8};
  for (size_t i = 0; i < 4; i++) {
    kvx_layout_config c = test_layout_config(2, 1, KVX_LAYOUT_KIND_FULLY_CONTIGUOUS);
    c.dtype_width_bytes = widths[i];
    kvx_layout *l = NULL;
    CHECK_OK(kvx_layout_new(ctx, &c, &pin, &l));
    kvx_memory r;
    CHECK_OK(kvx_layout_region(l, 1, 0, 1, &r));
    CHECK(r.size == 16 * 64 * widths[i]);
    kvx_layout_free(l);
  }
  kvx_context_free(ctx);
}

static void invalid_configs(void) {
  kvx_context *ctx = test_context(1);
  CHECK(ctx != NULL);
  kvx_storage sys = storage(KVX_STORAGE_KIND_SYSTEM);
  kvx_layout *l = SENTINEL(kvx_layout *);
  kvx_layout_config good = test_layout_config(4, 2, KVX_LAYOUT_KIND_FULLY_CONTIGUOUS);
  kvx_layout_config c;

  c = good; c.num_blocks = 0;
  CHECK_STATUS(kvx_layout_new(ctx, &c, &sys, &l), KVX_STATUS_INVALID_ARGUMENT);
  CHECK(strstr(kvx_last_error(), "num_blocks") != NULL);
  c = good; c.outer_dim = 3;
  CHECK_STATUS(kvx_layout_new(ctx, &c, &sys, &l), KVX_STATUS_INVALID_ARGUMENT);
  c = good; c.dtype_width_bytes = 3;
  CHECK_STATUS(kvx_layout_new(ctx, &c, &sys, &l), KVX_STATUS_INVALID_ARGUMENT);
  c = good; c.alignment = 3;
  CHECK_STATUS(kvx_layout_new(ctx, &c, &sys, &l), KVX_STATUS_INVALID_ARGUMENT);
  c = good; c.alignment = 0;
  CHECK_STATUS(kvx_layout_new(ctx, &c, &sys, &l), KVX_STATUS_INVALID_ARGUMENT);
  c = good; c.kind = 3;
  CHECK_STATUS(kvx_layout_new(ctx, &c, &sys, &l), KVX_STATUS_INVALID_ARGUMENT);
  CHECK(strstr(kvx_last_error(), "layout kind 3") != NULL);
  c = good; c.num_blocks = UINT64_MAX / 2;
  CHECK_STATUS(kvx_layout_new(ctx, &c, &sys, &l), KVX_STATUS_INVALID_ARGUMENT);
  CHECK(strstr(kvx_last_error(), "overflow") != NULL);

  c = good; c.num_layers = 65537; c.page_size = 1; c.inner_dim = 1;
  CHECK_STATUS(kvx_layout_new(ctx, &c, &sys, &l), KVX_STATUS_INVALID_ARGUMENT);
  CHECK(strstr(kvx_last_error(), "num_layers") != NULL);
  /* 1 PiB: refused with a status, not left to the OOM killer. */
  c = good; c.num_blocks = 1ull << 50; c.page_size = 1; c.inner_dim = 1; c.num_layers = 1;
  c.outer_dim = 1; c.dtype_width_bytes = 1;
  CHECK_STATUS(kvx_layout_new(ctx, &c, &sys, &l), KVX_STATUS_OUT_OF_MEMORY);
  CHECK(strstr(kvx_last_error(), "available") != NULL);

  kvx_storage bad = storage(9);
  CHECK_STATUS(kvx_layout_new(ctx, &good, &bad, &l), KVX_STATUS_INVALID_ARGUMENT);
  bad = storage(KVX_STORAGE_KIND_SYSTEM);
  bad.path = "/tmp/x";
  CHECK_STATUS(kvx_layout_new(ctx, &good, &bad, &l), KVX_STATUS_INVALID_ARGUMENT);
  bad = storage(KVX_STORAGE_KIND_SYSTEM);
  bad.device_id = -1;
  CHECK_STATUS(kvx_layout_new(ctx, &good, &bad, &l), KVX_STATUS_INVALID_ARGUMENT);

  CHECK_STATUS(kvx_layout_new(NULL, &good, &sys, &l), KVX_STATUS_NULL_ARGUMENT);
  CHECK_STATUS(kvx_layout_new(ctx, NULL, &sys, &l), KVX_STATUS_NULL_ARGUMENT);
  CHECK_STATUS(kvx_layout_new(ctx, &good, NULL, &l), KVX_STATUS_NULL_ARGUMENT);
  CHECK_STATUS(kvx_layout_new(ctx, &good, &sys, NULL), KVX_STATUS_NULL_ARGUMENT);
  CHECK(l == SENTINEL(kvx_layout *));
  kvx_context_free(ctx);
}

static void device_needs_a_gpu_and_disk_is_not_built_yet(void) {
  kvx_context *ctx = test_context(1);
  CHECK(ctx != NULL);
  kvx_layout *l = SENTINEL(kvx_layout *);
  kvx_layout_config c = test_layout_config(4, 2, KVX_LAYOUT_KIND_FULLY_CONTIGUOUS);
  kvx_storage dev = storage(KVX_STORAGE_KIND_DEVICE);
  int32_t s = kvx_layout_new(ctx, &c, &dev, &l);
  if (s == KVX_STATUS_OK) { /* a machine with a GPU */
    kvx_layout_free(l);
    l = SENTINEL(kvx_layout *);
  } else {
    CHECK_STATUS(s, KVX_STATUS_UNAVAILABLE);
    CHECK(strstr(kvx_last_error(), "CUDA") != NULL);
    kvx_memory m = {4096, 1 << 20};
    CHECK_STATUS(kvx_layout_wrap(ctx, &c, &dev, &m, 1, &l), KVX_STATUS_UNAVAILABLE);
  }
  kvx_storage disk = storage(KVX_STORAGE_KIND_DISK);
  CHECK_STATUS(kvx_layout_new(ctx, &c, &disk, &l), KVX_STATUS_UNAVAILABLE);
  CHECK(strstr(kvx_last_error(), "NIXL") != NULL);
  CHECK(l == SENTINEL(kvx_layout *));
  kvx_context_free(ctx);
}

static void wrapped_memory_is_used_and_never_freed(void) {
  kvx_context *ctx = test_context(2);
  CHECK(ctx != NULL);
  kvx_storage sys = storage(KVX_STORAGE_KIND_SYSTEM);
  kvx_layout_config c = test_layout_config(8, 3, KVX_LAYOUT_KIND_LAYER_SEPARATE_OUTER_FIRST);
  c.alignment = 64;
  size_t per_layer = 8 * 2 * 16 * 64 * 2;
  unsigned char *mem[3];
  kvx_memory regions[3];
  for (int i = 0; i < 3; i++) {
    mem[i] = (unsigned char *)aligned_alloc(64, per_layer);
    CHECK(mem[i] != NULL);
    memset(mem[i], 0, per_layer);
    regions[i].addr = (uint64_t)(uintptr_t)mem[i];
    regions[i].size = per_layer;
  }
  kvx_layout *l = SENTINEL(kvx_layout *);
  /* Wrong region count, too small, misaligned, address 0, NULL regions. */
  CHECK_STATUS(kvx_layout_wrap(ctx, &c, &sys, regions, 2, &l), KVX_STATUS_INVALID_ARGUMENT);
  CHECK(strstr(kvx_last_error(), "3 memory region") != NULL);
  regions[1].size = per_layer - 1;
  CHECK_STATUS(kvx_layout_wrap(ctx, &c, &sys, regions, 3, &l), KVX_STATUS_INVALID_ARGUMENT);
  regions[1].size = per_layer;
  regions[2].addr += 8;
  CHECK_STATUS(kvx_layout_wrap(ctx, &c, &sys, regions, 3, &l), KVX_STATUS_INVALID_ARGUMENT);
  CHECK(strstr(kvx_last_error(), "aligned") != NULL);
  regions[2].addr = 0;
  CHECK_STATUS(kvx_layout_wrap(ctx, &c, &sys, regions, 3, &l), KVX_STATUS_INVALID_ARGUMENT);
  regions[2].addr = (uint64_t)(uintptr_t)mem[2];
  /* Layer 1 starting 256 B after layer 0: the layers would share bytes. */
  regions[1].addr = regions[0].addr + 256;
  CHECK_STATUS(kvx_layout_wrap(ctx, &c, &sys, regions, 3, &l), KVX_STATUS_INVALID_ARGUMENT);
  CHECK(strstr(kvx_last_error(), "overlap") != NULL);
  regions[1].addr = (uint64_t)(uintptr_t)mem[1];
  CHECK_STATUS(kvx_layout_wrap(ctx, &c, &sys, NULL, 3, &l), KVX_STATUS_NULL_ARGUMENT);
  CHECK(l == SENTINEL(kvx_layout *));

  CHECK_OK(kvx_layout_wrap(ctx, &c, &sys, regions, 3, &l));
  kvx_memory r;
  CHECK_OK(kvx_layout_region(l, 5, 1, 1, &r));
  CHECK(r.addr == regions[1].addr + 8 * 2048 + 5 * 2048);
  uint64_t blocks[2] = {5, 6};
  CHECK_OK(kvx_layout_fill(ctx, l, blocks, 2, 77));
  /* The fill landed in the caller's memory. */
  int nonzero = 0;
  for (size_t i = 0; i < 2048; i++) nonzero |= mem[1][8 * 2048 + 5 * 2048 + i];
  CHECK(nonzero);
  kvx_layout_free(l);
  /* Still ours: freeing it here would be a double free under ASan if kvxfer had freed it. */
  for (int i = 0; i < 3; i++) free(mem[i]);
  kvx_context_free(ctx);
}

static void fill_and_checksum(void) {
  kvx_context *ctx = test_context(2);
  CHECK(ctx != NULL);
  kvx_layout *k[3];
  uint64_t sums[3][4];
  uint64_t blocks[4] = {0, 1, 2, 3};
  for (int i = 0; i < 3; i++) {
    k[i] = test_layout(ctx, 4, 3, i, i == 1 ? KVX_STORAGE_KIND_PINNED : KVX_STORAGE_KIND_SYSTEM);
    CHECK(k[i] != NULL);
    CHECK_OK(kvx_layout_fill(ctx, k[i], blocks, 4, 1234));
    CHECK_OK(kvx_layout_checksum(ctx, k[i], blocks, 4, sums[i]));
  }
  /* Equal content, equal checksum in every layout kind and tier; different blocks differ. */
  for (int b = 0; b < 4; b++) CHECK(sums[0][b] == sums[1][b] && sums[0][b] == sums[2][b]);
  for (int a = 0; a < 4; a++)
    for (int b = a + 1; b < 4; b++) CHECK(sums[0][a] != sums[0][b]);
  /* Another seed changes content. */
  uint64_t other;
  CHECK_OK(kvx_layout_fill(ctx, k[0], blocks, 1, 1235));
  CHECK_OK(kvx_layout_checksum(ctx, k[0], blocks, 1, &other));
  CHECK(other != sums[0][0]);

  /* Errors: nothing written. */
  uint64_t bad[2] = {1, 4};
  uint64_t out[2] = {7, 7};
  CHECK_STATUS(kvx_layout_fill(ctx, k[1], bad, 2, 9), KVX_STATUS_OUT_OF_RANGE);
  CHECK_STATUS(kvx_layout_checksum(ctx, k[1], bad, 2, out), KVX_STATUS_OUT_OF_RANGE);
  CHECK(out[0] == 7 && out[1] == 7);
  uint64_t again;
  CHECK_OK(kvx_layout_checksum(ctx, k[1], blocks + 1, 1, &again));
  CHECK(again == sums[1][1]); /* block 1 was not filled by the refused call */
  CHECK_STATUS(kvx_layout_checksum(ctx, k[1], blocks, 2, NULL), KVX_STATUS_NULL_ARGUMENT);
  CHECK_STATUS(kvx_layout_fill(ctx, k[1], NULL, 2, 9), KVX_STATUS_NULL_ARGUMENT);
  CHECK_STATUS(kvx_layout_fill(NULL, k[1], blocks, 2, 9), KVX_STATUS_NULL_ARGUMENT);
  CHECK_STATUS(kvx_layout_fill(ctx, NULL, blocks, 2, 9), KVX_STATUS_NULL_ARGUMENT);
  CHECK_OK(kvx_layout_fill(ctx, k[1], NULL, 0, 9)); /* empty list */
  for (int i = 0; i < 3; i++) kvx_layout_free(k[i]);
  kvx_context_free(ctx);
}

int main(void) {
  RUN(address_formulas);
  RUN(dtype_widths);
  RUN(invalid_configs);
  RUN(device_needs_a_gpu_and_disk_is_not_built_yet);
  RUN(wrapped_memory_is_used_and_never_freed);
  RUN(fill_and_checksum);
  return FINISH();
}
