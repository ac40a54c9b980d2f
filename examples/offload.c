/* Offload: a runtime's KV pool (here plain host memory it owns, wrapped) moves scattered
 * blocks into a kvxfer-allocated pinned pool and back, checked by checksums. C11. */
#include <kvxfer.h>
#include <stdio.h>
#include <stdlib.h>

#define BLOCKS 16
#define LAYERS 8

static int fail(const char *what, int32_t s) {
  fprintf(stderr, "%s: %s: %s\n", what, kvx_status_name(s), kvx_last_error());
  return 1;
}

int main(void) {
  kvx_context_config cc;
  kvx_context_config_init(&cc);
  cc.nixl_backends = 0; /* host tiers only */
  kvx_context *ctx = NULL;
  int32_t s = kvx_context_new(&cc, &ctx);
  if (s != KVX_STATUS_OK) return fail("kvx_context_new", s);

  /* The engine's pool: layer-separate, one allocation per layer that the engine owns. */
  kvx_layout_config lc;
  kvx_layout_config_init(&lc);
  lc.num_blocks = BLOCKS;
  lc.num_layers = LAYERS;
  lc.outer_dim = 2;
  lc.page_size = 16;
  lc.inner_dim = 8 * 128;
  lc.kind = KVX_LAYOUT_KIND_LAYER_SEPARATE_BLOCK_FIRST;
  size_t per_layer = (size_t)BLOCKS * 2 * 16 * 8 * 128 * 2;
  kvx_memory regions[LAYERS];
  void *mem[LAYERS];
  for (int l = 0; l < LAYERS; l++) {
    mem[l] = calloc(1, per_layer);
    if (mem[l] == NULL) return 1;
    regions[l].addr = (uint64_t)(uintptr_t)mem[l];
    regions[l].size = per_layer;
  }
  kvx_storage system = {KVX_STORAGE_KIND_SYSTEM, 0, NULL};
  kvx_storage pinned = {KVX_STORAGE_KIND_PINNED, 0, NULL};
  kvx_layout *engine = NULL, *offload = NULL, *back = NULL;
  if ((s = kvx_layout_wrap(ctx, &lc, &system, regions, LAYERS, &engine)) != KVX_STATUS_OK)
    return fail("kvx_layout_wrap", s);
  lc.kind = KVX_LAYOUT_KIND_FULLY_CONTIGUOUS;
  if ((s = kvx_layout_new(ctx, &lc, &pinned, &offload)) != KVX_STATUS_OK)
    return fail("kvx_layout_new", s);
  if ((s = kvx_layout_new(ctx, &lc, &system, &back)) != KVX_STATUS_OK)
    return fail("kvx_layout_new", s);

  uint64_t hot[4] = {3, 9, 1, 14}, slots[4] = {0, 1, 2, 3};
  uint64_t a[4], b[4];
  kvx_transfer *t = NULL;
  if ((s = kvx_layout_fill(ctx, engine, hot, 4, 7)) != KVX_STATUS_OK) return fail("fill", s);
  if ((s = kvx_transfer_submit(ctx, engine, hot, offload, slots, 4, NULL, &t)) != KVX_STATUS_OK)
    return fail("offload", s);
  if ((s = kvx_transfer_wait(t, -1)) != KVX_STATUS_OK) return fail("wait", s);
  kvx_transfer_free(t);
  if ((s = kvx_transfer_submit(ctx, offload, slots, back, hot, 4, NULL, &t)) != KVX_STATUS_OK)
    return fail("reload", s);
  if ((s = kvx_transfer_wait(t, -1)) != KVX_STATUS_OK) return fail("wait", s);
  kvx_transfer_free(t);
  if ((s = kvx_layout_checksum(ctx, engine, hot, 4, a)) != KVX_STATUS_OK) return fail("sum", s);
  if ((s = kvx_layout_checksum(ctx, back, hot, 4, b)) != KVX_STATUS_OK) return fail("sum", s);
  int same = 1;
  for (int i = 0; i < 4; i++) same &= a[i] == b[i];
  printf("offload and reload of 4 blocks: %s\n", same ? "verified" : "MISMATCH");

  kvx_layout_free(engine);
  kvx_layout_free(offload);
  kvx_layout_free(back);
  kvx_context_free(ctx);
  for (int l = 0; l < LAYERS; l++) free(mem[l]);
  return same ? 0 : 1;
}
