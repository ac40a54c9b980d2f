/* A context with NIXL backends, through C. Where NIXL cannot be loaded the context is refused
 * with KVX_STATUS_UNAVAILABLE and instructions; that is a skip unless KVX_REQUIRE_NIXL is set. */
#define _POSIX_C_SOURCE 200809L
#include <stdlib.h>
#include <unistd.h>

#include "common.h"

static int skipped = 0;

static void default_context_loads_nixl(void) {
  kvx_context_config c;
  kvx_context_config_init(&c);
  kvx_context *ctx = SENTINEL(kvx_context *);
  int32_t s = kvx_context_new(&c, &ctx);
  if (s == KVX_STATUS_UNAVAILABLE && getenv("KVX_REQUIRE_NIXL") == NULL) {
    CHECK(strstr(kvx_last_error(), "pip install") != NULL);
    CHECK(ctx == SENTINEL(kvx_context *));
    skipped = 1;
    return;
  }
  CHECK_OK(s);
  kvx_context_free(ctx);
}

/* A context with NIXL's POSIX backend only; agent_name NULL generates one. */
static kvx_context *posix_context(const char *agent_name) {
  kvx_context_config c;
  kvx_context_config_init(&c);
  c.nixl_backends = KVX_BACKEND_POSIX;
  c.agent_name = agent_name;
  kvx_context *ctx = NULL;
  if (kvx_context_new(&c, &ctx) != KVX_STATUS_OK) {
    fprintf(stderr, "kvx_context_new (POSIX) failed: %s\n", kvx_last_error());
    return NULL;
  }
  return ctx;
}

static void only_posix(void) {
  if (skipped) return;
  kvx_context *ctx = posix_context("c-test-agent");
  CHECK(ctx != NULL);
  kvx_context_free(ctx);
}

/* Context B imports what context A exported: A's layouts, as remote layouts of B. */
static void export_and_import(void) {
  if (skipped) return;
  kvx_context_config c;
  kvx_context_config_init(&c);
  kvx_context *a = NULL, *b = NULL;
  CHECK_OK(kvx_context_new(&c, &a));
  CHECK_OK(kvx_context_new(&c, &b));
  kvx_layout *l = test_layout(a, 8, 2, KVX_LAYOUT_KIND_LAYER_SEPARATE_OUTER_FIRST, KVX_STORAGE_KIND_PINNED);
  CHECK(l != NULL);
  const kvx_layout *list[1] = {l};
  kvx_bytes bytes = {NULL, 0};
  CHECK_OK(kvx_context_export(a, list, 1, &bytes));
  CHECK(bytes.data != NULL && bytes.len > 24);

  kvx_peer *peer = SENTINEL(kvx_peer *);
  CHECK_STATUS(kvx_context_import(b, bytes.data, bytes.len - 1, &peer), KVX_STATUS_PEER);
  CHECK(peer == SENTINEL(kvx_peer *));
  CHECK_OK(kvx_context_import(b, bytes.data, bytes.len, &peer));
  CHECK(kvx_peer_layout_count(peer) == 1);
  kvx_layout *remote = NULL;
  CHECK_STATUS(kvx_peer_layout(peer, 1, &remote), KVX_STATUS_OUT_OF_RANGE);
  CHECK_OK(kvx_peer_layout(peer, 0, &remote));
  kvx_memory mine, theirs;
  CHECK_OK(kvx_layout_region(l, 5, 1, 1, &mine));
  CHECK_OK(kvx_layout_region(remote, 5, 1, 1, &theirs));
  CHECK(mine.addr == theirs.addr && mine.size == theirs.size);
  kvx_plan plan;
  kvx_layout *local = test_layout(b, 8, 2, KVX_LAYOUT_KIND_FULLY_CONTIGUOUS, KVX_STORAGE_KIND_SYSTEM);
  CHECK(local != NULL);
  CHECK_OK(kvx_plan_transfer(b, local, remote, &plan));
  CHECK(plan.kind == KVX_PLAN_KIND_DIRECT && plan.first == KVX_STRATEGY_NIXL_WRITE);
  uint64_t sum;
  uint64_t block = 0;
  CHECK_STATUS(kvx_layout_checksum(b, remote, &block, 1, &sum), KVX_STATUS_UNAVAILABLE);
  /* Objects in any order: the peer first, its layout handle after. */
  kvx_peer_free(peer);
  kvx_layout_free(remote);
  kvx_layout_free(local);
  kvx_bytes_free(&bytes);
  CHECK(bytes.data == NULL && bytes.len == 0);
  kvx_layout_free(l);
  kvx_context_free(b);
  kvx_context_free(a);
}

/* Two live disk layouts on one file would alias: the second is refused, naming the path; once
 * the first is freed the file can be used again. */
static void one_live_layout_per_file(void) {
  if (skipped) return;
  kvx_context *ctx = posix_context(NULL);
  CHECK(ctx != NULL);
  char path[256];
  snprintf(path, sizeof path, "/tmp/kvx-c-alias-%d.kv", (int)getpid());
  kvx_layout_config lc = test_layout_config(8, 2, KVX_LAYOUT_KIND_FULLY_CONTIGUOUS);
  kvx_storage disk = {KVX_STORAGE_KIND_DISK, 0, path};
  kvx_layout *a = NULL, *b = SENTINEL(kvx_layout *);
  CHECK_OK(kvx_layout_new(ctx, &lc, &disk, &a));
  CHECK_STATUS(kvx_layout_new(ctx, &lc, &disk, &b), KVX_STATUS_INVALID_ARGUMENT);
  CHECK(strstr(kvx_last_error(), path) != NULL);
  CHECK(b == SENTINEL(kvx_layout *));
  kvx_layout_free(a);
  CHECK_OK(kvx_layout_new(ctx, &lc, &disk, &b));
  kvx_layout_free(b);
  kvx_context_free(ctx);
  remove(path);
}

/* One block of a fully contiguous pinned layout to a layer-separate disk layout of one block,
 * and back: the piece spans the disk layout's back-to-back layer allocations. */
static void one_block_to_disk_and_back(void) {
  if (skipped) return;
  kvx_context *ctx = posix_context(NULL);
  CHECK(ctx != NULL);
  kvx_layout *src = test_layout(ctx, 1, 4, KVX_LAYOUT_KIND_FULLY_CONTIGUOUS, KVX_STORAGE_KIND_PINNED);
  kvx_layout *disk = test_layout(ctx, 1, 4, KVX_LAYOUT_KIND_LAYER_SEPARATE_BLOCK_FIRST, KVX_STORAGE_KIND_DISK);
  kvx_layout *back = test_layout(ctx, 1, 4, KVX_LAYOUT_KIND_FULLY_CONTIGUOUS, KVX_STORAGE_KIND_SYSTEM);
  CHECK(src != NULL && disk != NULL && back != NULL);
  uint64_t id = 0, a = 0, b = 1;
  CHECK_OK(kvx_layout_fill(ctx, src, &id, 1, 3));
  kvx_transfer *t = NULL;
  CHECK_OK(kvx_transfer_submit(ctx, src, &id, disk, &id, 1, NULL, &t));
  CHECK_OK(kvx_transfer_wait(t, -1));
  kvx_transfer_free(t);
  CHECK_OK(kvx_transfer_submit(ctx, disk, &id, back, &id, 1, NULL, &t));
  CHECK_OK(kvx_transfer_wait(t, -1));
  kvx_transfer_free(t);
  CHECK_OK(kvx_layout_checksum(ctx, src, &id, 1, &a));
  CHECK_OK(kvx_layout_checksum(ctx, back, &id, 1, &b));
  CHECK(a == b);
  kvx_layout_free(src);
  kvx_layout_free(disk);
  kvx_layout_free(back);
  kvx_context_free(ctx);
}

/* peer_key: contexts with the same key exchange exports; another key, or none, is refused
 * with KVX_STATUS_PEER; a short key or a NULL key with a length is refused at creation. */
static void peer_key_authenticates_exports(void) {
  if (skipped) return;
  static const uint8_t secret[] = "c test deployment secret";
  static const uint8_t other[] = "another deployment's secret";
  kvx_context_config c;
  kvx_context_config_init(&c);
  CHECK(c.peer_key == NULL && c.peer_key_len == 0);
  kvx_context *bad = SENTINEL(kvx_context *);
  c.peer_key = secret;
  c.peer_key_len = 8;
  CHECK_STATUS(kvx_context_new(&c, &bad), KVX_STATUS_INVALID_ARGUMENT);
  CHECK(strstr(kvx_last_error(), "peer_key") != NULL);
  c.peer_key = NULL;
  c.peer_key_len = 16;
  CHECK_STATUS(kvx_context_new(&c, &bad), KVX_STATUS_NULL_ARGUMENT);
  CHECK(bad == SENTINEL(kvx_context *));

  kvx_context *a = NULL, *b = NULL, *x = NULL, *plain = NULL;
  c.peer_key = secret;
  c.peer_key_len = sizeof secret - 1;
  CHECK_OK(kvx_context_new(&c, &a));
  CHECK_OK(kvx_context_new(&c, &b));
  c.peer_key = other;
  c.peer_key_len = sizeof other - 1;
  CHECK_OK(kvx_context_new(&c, &x));
  kvx_context_config_init(&c);
  CHECK_OK(kvx_context_new(&c, &plain));
  kvx_layout *l = test_layout(a, 4, 1, KVX_LAYOUT_KIND_FULLY_CONTIGUOUS, KVX_STORAGE_KIND_SYSTEM);
  CHECK(l != NULL);
  const kvx_layout *list[1] = {l};
  kvx_bytes bytes = {NULL, 0};
  CHECK_OK(kvx_context_export(a, list, 1, &bytes));
  kvx_peer *peer = SENTINEL(kvx_peer *);
  CHECK_STATUS(kvx_context_import(x, bytes.data, bytes.len, &peer), KVX_STATUS_PEER);
  CHECK_STATUS(kvx_context_import(plain, bytes.data, bytes.len, &peer), KVX_STATUS_PEER);
  CHECK(peer == SENTINEL(kvx_peer *));
  CHECK_OK(kvx_context_import(b, bytes.data, bytes.len, &peer));
  CHECK(kvx_peer_layout_count(peer) == 1);
  kvx_peer_free(peer);
  kvx_bytes_free(&bytes);
  kvx_layout_free(l);
  kvx_context_free(a);
  kvx_context_free(b);
  kvx_context_free(x);
  kvx_context_free(plain);
}

/* Two contexts with NIXL: `a` exports its host layout `l`; `b` holds a host layout `mine` of the
 * same shape. free_exported() releases whatever is still set. */
struct exported {
  kvx_context *a, *b;
  kvx_layout *l, *mine;
  kvx_bytes bytes;
};

static int make_exported(uint64_t blocks, uint64_t layers, struct exported *e) {
  memset(e, 0, sizeof *e);
  kvx_context_config c;
  kvx_context_config_init(&c);
  if (kvx_context_new(&c, &e->a) != KVX_STATUS_OK || kvx_context_new(&c, &e->b) != KVX_STATUS_OK)
    return 0;
  e->l = test_layout(e->a, blocks, layers, KVX_LAYOUT_KIND_FULLY_CONTIGUOUS, KVX_STORAGE_KIND_SYSTEM);
  e->mine = test_layout(e->b, blocks, layers, KVX_LAYOUT_KIND_FULLY_CONTIGUOUS, KVX_STORAGE_KIND_SYSTEM);
  const kvx_layout *list[1] = {e->l};
  return e->l != NULL && e->mine != NULL &&
         kvx_context_export(e->a, list, 1, &e->bytes) == KVX_STATUS_OK;
}

static void free_exported(struct exported *e) {
  kvx_bytes_free(&e->bytes);
  kvx_layout_free(e->l);
  kvx_layout_free(e->mine);
  kvx_context_free(e->b);
  kvx_context_free(e->a);
}

/* A frees a layout that B imported and makes another of the same config: B's transfers to the
 * freed layout fail with KVX_STATUS_PEER, and A's new layout keeps its bytes. */
static void freed_export_is_revoked(void) {
  if (skipped) return;
  struct exported e;
  CHECK(make_exported(16, 2, &e));
  kvx_context *a = e.a, *b = e.b;
  kvx_layout *mine = e.mine;
  kvx_peer *peer = NULL;
  CHECK_OK(kvx_context_import(b, e.bytes.data, e.bytes.len, &peer));
  kvx_layout *remote = NULL;
  CHECK_OK(kvx_peer_layout(peer, 0, &remote));
  uint64_t ids[16];
  for (int i = 0; i < 16; i++) ids[i] = (uint64_t)i;
  CHECK_OK(kvx_layout_fill(b, mine, ids, 16, 4));
  kvx_transfer *t = NULL;
  CHECK_OK(kvx_transfer_submit(b, mine, ids, remote, ids, 16, NULL, &t));
  CHECK_OK(kvx_transfer_wait(t, -1));
  kvx_transfer_free(t);

  kvx_layout_free(e.l);
  e.l = NULL;
  kvx_layout *l2 = test_layout(a, 16, 2, KVX_LAYOUT_KIND_FULLY_CONTIGUOUS, KVX_STORAGE_KIND_SYSTEM);
  CHECK(l2 != NULL);
  CHECK_OK(kvx_layout_fill(a, l2, ids, 16, 5));
  uint64_t before[16], after[16];
  CHECK_OK(kvx_layout_checksum(a, l2, ids, 16, before));
  t = NULL;
  int32_t s = kvx_transfer_submit(b, mine, ids, remote, ids, 16, NULL, &t);
  if (s == KVX_STATUS_OK) {
    s = kvx_transfer_wait(t, -1);
    kvx_transfer_free(t);
  }
  CHECK(s == KVX_STATUS_PEER);
  CHECK_OK(kvx_layout_checksum(a, l2, ids, 16, after));
  CHECK(memcmp(before, after, sizeof before) == 0);
  /* The counters saw it: one export revoked at one importer; one import; B's first write. */
  kvx_context_stats sa, sb;
  CHECK_STATUS(kvx_context_get_stats(a, NULL), KVX_STATUS_NULL_ARGUMENT);
  CHECK_OK(kvx_context_get_stats(a, &sa));
  CHECK_OK(kvx_context_get_stats(b, &sb));
  CHECK(sa.layouts_exported == 1 && sa.revocations == 1 && sa.importers_lost == 0);
  CHECK(sb.peers_imported == 1);
  CHECK(sb.by_mechanism[KVX_MECHANISM_NIXL].transfers >= 1);
  CHECK(sb.by_strategy[KVX_STRATEGY_NIXL_WRITE].bytes >= 16 * 2 * 2 * 16 * 64 * 2);

  kvx_layout_free(remote);
  kvx_peer_free(peer);
  kvx_layout_free(l2);
  free_exported(&e);
}

/* The same export imported twice: freeing the first peer leaves the second working. */
static void importing_twice_keeps_each_peer(void) {
  if (skipped) return;
  struct exported e;
  CHECK(make_exported(4, 1, &e));
  kvx_context *a = e.a, *b = e.b;
  kvx_layout *l = e.l, *mine = e.mine;
  const kvx_bytes bytes = e.bytes;
  kvx_peer *p1 = NULL, *p2 = NULL;
  CHECK_OK(kvx_context_import(b, bytes.data, bytes.len, &p1));
  CHECK_OK(kvx_context_import(b, bytes.data, bytes.len, &p2));
  kvx_peer_free(p1);
  kvx_layout *remote = NULL;
  CHECK_OK(kvx_peer_layout(p2, 0, &remote));
  uint64_t ids[4] = {0, 1, 2, 3}, x[4], y[4];
  CHECK_OK(kvx_layout_fill(b, mine, ids, 4, 6));
  kvx_transfer *t = NULL;
  CHECK_OK(kvx_transfer_submit(b, mine, ids, remote, ids, 4, NULL, &t));
  CHECK_OK(kvx_transfer_wait(t, -1));
  kvx_transfer_free(t);
  CHECK_OK(kvx_layout_checksum(b, mine, ids, 4, x));
  CHECK_OK(kvx_layout_checksum(a, l, ids, 4, y));
  CHECK(memcmp(x, y, sizeof x) == 0);
  kvx_layout_free(remote);
  kvx_peer_free(p2);
  free_exported(&e);
}

/* A host layout of 4 blocks, 2 layers, K and V, 4 tokens of heads of 16 bf16: n heads from
 * begin in order. */
static kvx_layout *heads_layout(kvx_context *ctx, uint32_t n, uint32_t begin, int32_t order) {
  kvx_layout_config c;
  kvx_layout_config_init(&c);
  c.num_blocks = 4;
  c.num_layers = 2;
  c.outer_dim = 2;
  c.page_size = 4;
  c.inner_dim = (uint64_t)n * 16;
  c.kind = KVX_LAYOUT_KIND_FULLY_CONTIGUOUS;
  c.num_heads = n;
  c.head_begin = begin;
  c.head_order = order;
  kvx_storage st = {KVX_STORAGE_KIND_SYSTEM, 0, NULL};
  kvx_layout *l = NULL;
  return kvx_layout_new(ctx, &c, &st, &l) == KVX_STATUS_OK ? l : NULL;
}

/* Head h of token t of (b, layer, o) in a host layout of n heads from begin in order. */
static const uint8_t *head_of(kvx_layout *l, uint32_t n, uint32_t begin, int32_t order, uint64_t b,
                              uint64_t layer, uint64_t o, uint64_t t, uint32_t h) {
  kvx_memory r;
  if (kvx_layout_region(l, b, layer, o, &r) != KVX_STATUS_OK) return NULL;
  uint64_t i = h - begin, off = order == KVX_HEAD_ORDER_NHD ? (t * n + i) * 32 : (i * 4 + t) * 32;
  return (const uint8_t *)(uintptr_t)(r.addr + off);
}

/* A TP 4 rank (heads 2..4, NHD) of context B written into context A's exported TP 2 rank (heads
 * 0..4, HND): the export carries the heads, the transfer converts, A's heads 0..2 stay. */
static void head_transform_into_a_peer(void) {
  if (skipped) return;
  kvx_context_config c;
  kvx_context_config_init(&c);
  kvx_context *a = NULL, *b = NULL;
  CHECK_OK(kvx_context_new(&c, &a));
  CHECK_OK(kvx_context_new(&c, &b));
  kvx_layout *pool = heads_layout(a, 4, 0, KVX_HEAD_ORDER_HND);
  kvx_layout *rank = heads_layout(b, 2, 2, KVX_HEAD_ORDER_NHD);
  CHECK(pool != NULL && rank != NULL);
  uint64_t all[4] = {0, 1, 2, 3}, sb[2] = {0, 3}, db[2] = {2, 1};
  CHECK_OK(kvx_layout_fill(a, pool, all, 4, 1));
  CHECK_OK(kvx_layout_fill(b, rank, all, 4, 2));
  uint8_t keep[2][32];
  memcpy(keep[0], head_of(pool, 4, 0, KVX_HEAD_ORDER_HND, 2, 1, 1, 3, 0), 32);
  memcpy(keep[1], head_of(pool, 4, 0, KVX_HEAD_ORDER_HND, 2, 1, 1, 3, 1), 32);
  const kvx_layout *list[1] = {pool};
  kvx_bytes bytes = {NULL, 0};
  CHECK_OK(kvx_context_export(a, list, 1, &bytes));
  kvx_peer *peer = NULL;
  CHECK_OK(kvx_context_import(b, bytes.data, bytes.len, &peer));
  kvx_layout *remote = NULL;
  CHECK_OK(kvx_peer_layout(peer, 0, &remote));
  kvx_transfer *t = NULL;
  CHECK_OK(kvx_transfer_submit(b, rank, sb, remote, db, 2, NULL, &t));
  CHECK_OK(kvx_transfer_wait(t, 30000000));
  kvx_transfer_stats st;
  CHECK_OK(kvx_transfer_get_stats(t, &st));
  CHECK(st.plan.first == KVX_STRATEGY_NIXL_WRITE && st.bytes == 2 * 2 * 2 * 4 * 2 * 32);
  kvx_transfer_free(t);
  for (int k = 0; k < 2; k++)
    for (uint64_t l = 0; l < 2; l++)
      for (uint64_t o = 0; o < 2; o++)
        for (uint64_t tk = 0; tk < 4; tk++)
          for (uint32_t h = 2; h < 4; h++)
            CHECK(memcmp(head_of(pool, 4, 0, KVX_HEAD_ORDER_HND, db[k], l, o, tk, h),
                         head_of(rank, 2, 2, KVX_HEAD_ORDER_NHD, sb[k], l, o, tk, h), 32) == 0);
  CHECK(memcmp(keep[0], head_of(pool, 4, 0, KVX_HEAD_ORDER_HND, 2, 1, 1, 3, 0), 32) == 0);
  CHECK(memcmp(keep[1], head_of(pool, 4, 0, KVX_HEAD_ORDER_HND, 2, 1, 1, 3, 1), 32) == 0);
  kvx_layout_free(remote);
  kvx_peer_free(peer);
  kvx_bytes_free(&bytes);
  kvx_layout_free(rank);
  kvx_layout_free(pool);
  kvx_context_free(b);
  kvx_context_free(a);
}

int main(void) {
  RUN(default_context_loads_nixl);
  RUN(only_posix);
  RUN(export_and_import);
  RUN(one_live_layout_per_file);
  RUN(one_block_to_disk_and_back);
  RUN(peer_key_authenticates_exports);
  RUN(freed_export_is_revoked);
  RUN(importing_twice_keeps_each_peer);
  RUN(head_transform_into_a_peer);
  if (skipped) {
    printf("NIXL cannot be loaded: %s\n0 passed, 0 failed, 8 skipped\n", kvx_last_error());
    return 0;
  }
  return FINISH();
}
