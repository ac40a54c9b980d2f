/* Head transforms through C (0.2), on host memory: decode ranks of TP 1, 2, 4 and 8 assembled
 * from the transfers of prefill ranks of every other degree, NHD <-> HND, all three layout
 * kinds, permuted ids, a layer range, FP8 and MLA widths, and refusals that write nothing.
 * Every head of every token is compared with an independent formula of where it lives. */
#include "common.h"

#define HEADS 8u
#define PAGE 4u
#define HEAD_DIM 16u
#define NB 6u
#define LAYERS 3u

static kvx_layout *heads_layout(kvx_context *ctx, int32_t kind, uint32_t n, uint32_t begin,
                                int32_t order, uint32_t width) {
  kvx_layout_config c;
  kvx_layout_config_init(&c);
  c.num_blocks = NB;
  c.num_layers = LAYERS;
  c.outer_dim = 2;
  c.page_size = PAGE;
  c.inner_dim = (uint64_t)n * HEAD_DIM;
  c.dtype_width_bytes = width;
  c.kind = kind;
  c.num_heads = n;
  c.head_begin = begin;
  c.head_order = order;
  kvx_storage st = {KVX_STORAGE_KIND_SYSTEM, 0, NULL};
  kvx_layout *l = NULL;
  if (kvx_layout_new(ctx, &c, &st, &l) != KVX_STATUS_OK) {
    fprintf(stderr, "kvx_layout_new: %s\n", kvx_last_error());
    return NULL;
  }
  return l;
}

/* Where head h of token t of (b, layer, o) lives in a layout of n heads from begin in order. */
static const uint8_t *head_at(kvx_layout *l, uint32_t n, uint32_t begin, int32_t order,
                              uint32_t width, uint64_t b, uint64_t layer, uint64_t o, uint64_t t,
                              uint32_t h) {
  kvx_memory r;
  if (kvx_layout_region(l, b, layer, o, &r) != KVX_STATUS_OK) return NULL;
  uint64_t hb = (uint64_t)HEAD_DIM * width, i = h - begin;
  uint64_t off = order == KVX_HEAD_ORDER_NHD ? (t * n + i) * hb : (i * PAGE + t) * hb;
  return (const uint8_t *)(uintptr_t)(r.addr + off);
}

static void decode_ranks_from_prefill_ranks_of_every_degree(void) {
  kvx_context *ctx = test_context(3);
  CHECK(ctx != NULL);
  uint64_t all[NB] = {0, 1, 2, 3, 4, 5};
  const uint32_t degrees[4] = {1, 2, 4, 8};
  /* The original: all 8 heads, NHD. */
  kvx_layout *full = heads_layout(ctx, KVX_LAYOUT_KIND_FULLY_CONTIGUOUS, HEADS, 0,
                                  KVX_HEAD_ORDER_NHD, 2);
  CHECK(full != NULL);
  CHECK_OK(kvx_layout_fill(ctx, full, all, NB, 77));
  for (int p = 0; p < 4; p++) {
    for (int d = 0; d < 4; d++) {
      uint32_t ptp = degrees[p], dtp = degrees[d], pn = HEADS / ptp, dn = HEADS / dtp;
      int32_t pkind = (p + d) % 3, dkind = (p + 2 * d + 1) % 3;
      int32_t porder = (int32_t)(p % 2), dorder = (int32_t)((d + 1) % 2);
      /* Prefill ranks: the original's heads split, blocks permuted (0..5 -> 5..0). */
      kvx_layout *prefill[8] = {0};
      uint64_t rev[NB] = {5, 4, 3, 2, 1, 0};
      for (uint32_t r = 0; r < ptp; r++) {
        prefill[r] = heads_layout(ctx, pkind, pn, r * pn, porder, 2);
        CHECK(prefill[r] != NULL);
        kvx_transfer *t = NULL;
        CHECK_OK(kvx_transfer_submit(ctx, full, all, prefill[r], rev, NB, NULL, &t));
        CHECK_OK(kvx_transfer_wait(t, -1));
        kvx_transfer_free(t);
      }
      /* Each decode rank is assembled from every prefill rank it shares heads with; the
       * others are refused (no common head) and write nothing. */
      for (uint32_t r = 0; r < dtp; r++) {
        kvx_layout *dec = heads_layout(ctx, dkind, dn, r * dn, dorder, 2);
        CHECK(dec != NULL);
        CHECK_OK(kvx_layout_fill(ctx, dec, all, NB, 5));
        for (uint32_t q = 0; q < ptp; q++) {
          int overlap = q * pn < (r + 1) * dn && r * dn < (q + 1) * pn;
          kvx_transfer *t = NULL;
          int32_t s = kvx_transfer_submit(ctx, prefill[q], rev, dec, all, NB, NULL, &t);
          if (overlap) {
            CHECK_OK(s);
            CHECK_OK(kvx_transfer_wait(t, -1));
            kvx_transfer_stats st;
            CHECK_OK(kvx_transfer_get_stats(t, &st));
            uint32_t common = (pn < dn ? pn : dn);
            CHECK(st.bytes == (uint64_t)NB * LAYERS * 2 * PAGE * common * HEAD_DIM * 2);
            kvx_transfer_free(t);
          } else {
            CHECK(s == KVX_STATUS_INVALID_ARGUMENT && t == NULL);
          }
        }
        /* The decode rank holds exactly the original's heads r*dn.. for every token. */
        for (uint64_t b = 0; b < NB; b++)
          for (uint64_t l = 0; l < LAYERS; l++)
            for (uint64_t o = 0; o < 2; o++)
              for (uint64_t t = 0; t < PAGE; t++)
                for (uint32_t h = r * dn; h < (r + 1) * dn; h++) {
                  const uint8_t *got = head_at(dec, dn, r * dn, dorder, 2, b, l, o, t, h);
                  const uint8_t *want =
                      head_at(full, HEADS, 0, KVX_HEAD_ORDER_NHD, 2, b, l, o, t, h);
                  CHECK(got != NULL && want != NULL);
                  CHECK(memcmp(got, want, HEAD_DIM * 2) == 0);
                }
        kvx_layout_free(dec);
      }
      for (uint32_t r = 0; r < ptp; r++) kvx_layout_free(prefill[r]);
    }
  }
  kvx_layout_free(full);
  kvx_context_free(ctx);
}

static void equal_heads_other_order_layer_range_fp8_and_mla(void) {
  kvx_context *ctx = test_context(2);
  CHECK(ctx != NULL);
  uint64_t all[NB] = {0, 1, 2, 3, 4, 5};
  /* FP8, all heads, NHD -> HND, layers 1..3 only, permuted ids. */
  kvx_layout *a = heads_layout(ctx, KVX_LAYOUT_KIND_LAYER_SEPARATE_OUTER_FIRST, HEADS, 0,
                               KVX_HEAD_ORDER_NHD, 1);
  kvx_layout *b = heads_layout(ctx, KVX_LAYOUT_KIND_LAYER_SEPARATE_BLOCK_FIRST, HEADS, 0,
                               KVX_HEAD_ORDER_HND, 1);
  CHECK(a != NULL && b != NULL);
  CHECK_OK(kvx_layout_fill(ctx, a, all, NB, 1));
  CHECK_OK(kvx_layout_fill(ctx, b, all, NB, 2));
  uint64_t sb[2] = {4, 1}, db[2] = {0, 5};
  uint8_t layer0[PAGE * HEADS * HEAD_DIM];
  for (uint64_t t = 0; t < PAGE; t++)
    for (uint32_t h = 0; h < HEADS; h++)
      memcpy(layer0 + (t * HEADS + h) * HEAD_DIM,
             head_at(b, HEADS, 0, KVX_HEAD_ORDER_HND, 1, 0, 0, 0, t, h), HEAD_DIM);
  kvx_transfer_options opts;
  kvx_transfer_options_init(&opts);
  opts.layer_begin = 1;
  opts.layer_end = 3;
  kvx_transfer *t = NULL;
  CHECK_OK(kvx_transfer_submit(ctx, a, sb, b, db, 2, &opts, &t));
  CHECK_OK(kvx_transfer_wait(t, -1));
  kvx_transfer_free(t);
  for (int k = 0; k < 2; k++)
    for (uint64_t l = 1; l < LAYERS; l++)
      for (uint64_t o = 0; o < 2; o++)
        for (uint64_t tk = 0; tk < PAGE; tk++)
          for (uint32_t h = 0; h < HEADS; h++)
            CHECK(memcmp(head_at(b, HEADS, 0, KVX_HEAD_ORDER_HND, 1, db[k], l, o, tk, h),
                         head_at(a, HEADS, 0, KVX_HEAD_ORDER_NHD, 1, sb[k], l, o, tk, h),
                         HEAD_DIM) == 0);
  /* Layer 0 of the destination (outside the range) is untouched. */
  for (uint64_t tk = 0; tk < PAGE; tk++)
    for (uint32_t h = 0; h < HEADS; h++)
      CHECK(memcmp(layer0 + (tk * HEADS + h) * HEAD_DIM,
                   head_at(b, HEADS, 0, KVX_HEAD_ORDER_HND, 1, 0, 0, 0, tk, h), HEAD_DIM) == 0);
  kvx_layout_free(a);
  kvx_layout_free(b);
  /* MLA: one latent head every rank holds whole. */
  kvx_layout *m1 = heads_layout(ctx, KVX_LAYOUT_KIND_FULLY_CONTIGUOUS, 1, 0, KVX_HEAD_ORDER_NHD, 2);
  kvx_layout *m2 = heads_layout(ctx, KVX_LAYOUT_KIND_LAYER_SEPARATE_BLOCK_FIRST, 1, 0,
                                KVX_HEAD_ORDER_HND, 2);
  CHECK(m1 != NULL && m2 != NULL);
  CHECK_OK(kvx_layout_fill(ctx, m1, all, NB, 3));
  CHECK_OK(kvx_transfer_submit(ctx, m1, sb, m2, db, 2, NULL, &t));
  CHECK_OK(kvx_transfer_wait(t, -1));
  kvx_transfer_free(t);
  uint64_t s_sums[2], d_sums[2];
  CHECK_OK(kvx_layout_checksum(ctx, m1, sb, 2, s_sums));
  CHECK_OK(kvx_layout_checksum(ctx, m2, db, 2, d_sums));
  /* One head: the orders coincide, so the regions are byte for byte equal. */
  CHECK(s_sums[0] == d_sums[0] && s_sums[1] == d_sums[1]);
  kvx_layout_free(m1);
  kvx_layout_free(m2);
  kvx_context_free(ctx);
}

static void refusals_write_nothing(void) {
  kvx_context *ctx = test_context(2);
  CHECK(ctx != NULL);
  uint64_t all[NB] = {0, 1, 2, 3, 4, 5};
  kvx_layout *src = heads_layout(ctx, KVX_LAYOUT_KIND_FULLY_CONTIGUOUS, 4, 0, KVX_HEAD_ORDER_NHD, 2);
  /* No common head; another element width. */
  kvx_layout *other = heads_layout(ctx, KVX_LAYOUT_KIND_FULLY_CONTIGUOUS, 4, 4, KVX_HEAD_ORDER_NHD, 2);
  kvx_layout *fp8 = heads_layout(ctx, KVX_LAYOUT_KIND_FULLY_CONTIGUOUS, 4, 0, KVX_HEAD_ORDER_NHD, 1);
  CHECK(src != NULL && other != NULL && fp8 != NULL);
  CHECK_OK(kvx_layout_fill(ctx, src, all, NB, 1));
  kvx_layout *dsts[2] = {other, fp8};
  for (int i = 0; i < 2; i++) {
    CHECK_OK(kvx_layout_fill(ctx, dsts[i], all, NB, 9));
    uint64_t before[NB], after[NB];
    CHECK_OK(kvx_layout_checksum(ctx, dsts[i], all, NB, before));
    kvx_transfer *t = SENTINEL(kvx_transfer *);
    CHECK_STATUS(kvx_transfer_submit(ctx, src, all, dsts[i], all, NB, NULL, &t),
                 KVX_STATUS_INVALID_ARGUMENT);
    CHECK(t == SENTINEL(kvx_transfer *));
    CHECK_OK(kvx_layout_checksum(ctx, dsts[i], all, NB, after));
    CHECK(memcmp(before, after, sizeof before) == 0);
  }
  /* Heads that do not divide inner_dim, and an unknown order, are refused at creation. */
  kvx_layout_config c;
  kvx_layout_config_init(&c);
  c.num_blocks = 1;
  c.num_layers = 1;
  c.outer_dim = 1;
  c.page_size = 4;
  c.inner_dim = 64;
  c.num_heads = 3;
  kvx_storage st = {KVX_STORAGE_KIND_SYSTEM, 0, NULL};
  kvx_layout *l = SENTINEL(kvx_layout *);
  CHECK_STATUS(kvx_layout_new(ctx, &c, &st, &l), KVX_STATUS_INVALID_ARGUMENT);
  c.num_heads = 4;
  c.head_order = 7;
  CHECK_STATUS(kvx_layout_new(ctx, &c, &st, &l), KVX_STATUS_INVALID_ARGUMENT);
  CHECK(l == SENTINEL(kvx_layout *));
  kvx_layout_free(src);
  kvx_layout_free(other);
  kvx_layout_free(fp8);
  kvx_context_free(ctx);
}

int main(void) {
  RUN(decode_ranks_from_prefill_ranks_of_every_degree);
  RUN(equal_heads_other_order_layer_range_fp8_and_mla);
  RUN(refusals_write_nothing);
  return FINISH();
}
