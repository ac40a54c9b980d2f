/* Many threads share one context and two layouts: concurrent submits, waits, fills and
 * checksums on disjoint blocks, and a per-thread last error. */
#include <pthread.h>

#include "common.h"

#define THREADS 8
#define PER_THREAD 8
#define ROUNDS 40
#define BLOCKS (THREADS * PER_THREAD)

struct shared {
  kvx_context *ctx;
  kvx_layout *src;
  kvx_layout *dst;
  int failed[THREADS];
};

struct arg {
  struct shared *s;
  int index;
};

static void *worker(void *p) {
  struct arg *a = (struct arg *)p;
  struct shared *s = a->s;
  uint64_t sb[PER_THREAD], db[PER_THREAD], ss[PER_THREAD], ds[PER_THREAD];
  for (int i = 0; i < PER_THREAD; i++) {
    db[i] = (uint64_t)(a->index * PER_THREAD + i);
    sb[i] = (db[i] * 7 + 3) % BLOCKS; /* every thread reads scattered, shared sources */
  }
  for (int r = 0; r < ROUNDS; r++) {
    kvx_transfer *t = NULL;
    if (kvx_transfer_submit(s->ctx, s->src, sb, s->dst, db, PER_THREAD, NULL, &t) != KVX_STATUS_OK ||
        kvx_transfer_wait(t, 30 * 1000 * 1000) != KVX_STATUS_OK) {
      s->failed[a->index] = 1;
      kvx_transfer_free(t);
      return NULL;
    }
    kvx_transfer_free(t);
  }
  /* This thread's own error message, independent of the others. */
  uint64_t bad = BLOCKS + (uint64_t)a->index;
  uint64_t sum;
  if (kvx_layout_checksum(s->ctx, s->dst, &bad, 1, &sum) != KVX_STATUS_OUT_OF_RANGE) {
    s->failed[a->index] = 1;
  }
  char expect[64];
  snprintf(expect, sizeof expect, "= %d is out of range", BLOCKS + a->index);
  if (strstr(kvx_last_error(), expect) == NULL) s->failed[a->index] = 1;
  if (kvx_layout_checksum(s->ctx, s->src, sb, PER_THREAD, ss) != KVX_STATUS_OK ||
      kvx_layout_checksum(s->ctx, s->dst, db, PER_THREAD, ds) != KVX_STATUS_OK) {
    s->failed[a->index] = 1;
  }
  for (int i = 0; i < PER_THREAD; i++) {
    if (ss[i] != ds[i]) s->failed[a->index] = 1;
  }
  return NULL;
}

static void concurrent_transfers(void) {
  struct shared s;
  memset(&s, 0, sizeof s);
  s.ctx = test_context(4);
  CHECK(s.ctx != NULL);
  s.src = test_layout(s.ctx, BLOCKS, 4, KVX_LAYOUT_KIND_FULLY_CONTIGUOUS, KVX_STORAGE_KIND_PINNED);
  s.dst = test_layout(s.ctx, BLOCKS, 4, KVX_LAYOUT_KIND_LAYER_SEPARATE_OUTER_FIRST, KVX_STORAGE_KIND_SYSTEM);
  CHECK(s.src != NULL && s.dst != NULL);
  uint64_t all[BLOCKS];
  for (int i = 0; i < BLOCKS; i++) all[i] = (uint64_t)i;
  CHECK_OK(kvx_layout_fill(s.ctx, s.src, all, BLOCKS, 8));

  pthread_t th[THREADS];
  struct arg args[THREADS];
  for (int i = 0; i < THREADS; i++) {
    args[i].s = &s;
    args[i].index = i;
    CHECK(pthread_create(&th[i], NULL, worker, &args[i]) == 0);
  }
  for (int i = 0; i < THREADS; i++) CHECK(pthread_join(th[i], NULL) == 0);
  for (int i = 0; i < THREADS; i++) CHECK(s.failed[i] == 0);
  kvx_layout_free(s.src);
  kvx_layout_free(s.dst);
  kvx_context_free(s.ctx);
}

struct submit_arg {
  kvx_context *ctx;
  kvx_layout *src, *dst;
  kvx_transfer *t;
  uint64_t id;
  int status;
};

static void *submit_only(void *p) {
  struct submit_arg *a = (struct submit_arg *)p;
  a->status = kvx_transfer_submit(a->ctx, a->src, &a->id, a->dst, &a->id, 1, NULL, &a->t);
  return NULL;
}

/* A transfer handle may move between threads: submitted on one, waited on another. */
static void handle_moves_between_threads(void) {
  kvx_context *ctx = test_context(2);
  kvx_layout *src = test_layout(ctx, 4, 2, KVX_LAYOUT_KIND_FULLY_CONTIGUOUS, KVX_STORAGE_KIND_SYSTEM);
  kvx_layout *dst = test_layout(ctx, 4, 2, KVX_LAYOUT_KIND_FULLY_CONTIGUOUS, KVX_STORAGE_KIND_SYSTEM);
  CHECK(ctx != NULL && src != NULL && dst != NULL);
  CHECK_OK(kvx_layout_fill(ctx, src, NULL, 0, 1));
  struct submit_arg a;
  a.ctx = ctx;
  a.src = src;
  a.dst = dst;
  a.t = NULL;
  a.id = 2;
  a.status = -1000;
  pthread_t th;
  CHECK(pthread_create(&th, NULL, submit_only, &a) == 0);
  CHECK(pthread_join(th, NULL) == 0);
  CHECK(a.status == KVX_STATUS_OK);
  CHECK_OK(kvx_transfer_wait(a.t, -1));
  kvx_transfer_free(a.t);
  kvx_layout_free(src);
  kvx_layout_free(dst);
  kvx_context_free(ctx);
}

int main(void) {
  RUN(concurrent_transfers);
  RUN(handle_moves_between_threads);
  return FINISH();
}
