/* A context with NIXL backends, through C. Where NIXL cannot be loaded the context is refused
 * with KVX_STATUS_UNAVAILABLE and instructions; that is a skip unless KVX_REQUIRE_NIXL is set. */
#include <stdlib.h>

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

static void only_posix(void) {
  if (skipped) return;
  kvx_context_config c;
  kvx_context_config_init(&c);
  c.nixl_backends = KVX_BACKEND_POSIX;
  c.agent_name = "c-test-agent";
  kvx_context *ctx = NULL;
  CHECK_OK(kvx_context_new(&c, &ctx));
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

int main(void) {
  RUN(default_context_loads_nixl);
  RUN(only_posix);
  RUN(export_and_import);
  if (skipped) {
    printf("NIXL cannot be loaded: %s\n0 passed, 0 failed, 3 skipped\n", kvx_last_error());
    return 0;
  }
  return FINISH();
}
