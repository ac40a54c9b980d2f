/* The planner through C: the seed's table, capabilities, remote rules and refusals. */
#include "common.h"

static kvx_context *ctx_with(uint8_t gds, uint8_t rdma) {
  kvx_context_config c;
  kvx_context_config_init(&c);
  c.allow_gds = gds;
  c.allow_gpu_rdma = rdma;
  c.worker_threads = 1;
  c.nixl_backends = 0;
  kvx_context *ctx = NULL;
  return kvx_context_new(&c, &ctx) == KVX_STATUS_OK ? ctx : NULL;
}

enum { SYS = KVX_STORAGE_KIND_SYSTEM, PIN = KVX_STORAGE_KIND_PINNED,
       DEV = KVX_STORAGE_KIND_DEVICE, DSK = KVX_STORAGE_KIND_DISK };

static int is_direct(kvx_plan p, int32_t s) {
  return p.kind == KVX_PLAN_KIND_DIRECT && p.first == s && p.bounce_storage == -1 &&
         p.second == KVX_STRATEGY_INVALID;
}

static int is_two_hop(kvx_plan p, int32_t first, int32_t second) {
  return p.kind == KVX_PLAN_KIND_TWO_HOP && p.first == first && p.bounce_storage == PIN &&
         p.second == second;
}

static void local_table_default_caps(void) {
  kvx_context *ctx = ctx_with(0, 0);
  CHECK(ctx != NULL);
  struct { int32_t s, d, strategy; } direct[] = {
      {SYS, SYS, KVX_STRATEGY_MEMCPY},           {SYS, PIN, KVX_STRATEGY_MEMCPY},
      {PIN, SYS, KVX_STRATEGY_MEMCPY},           {PIN, PIN, KVX_STRATEGY_MEMCPY},
      {SYS, DEV, KVX_STRATEGY_CUDA_BLOCKING_H2D}, {PIN, DEV, KVX_STRATEGY_CUDA_ASYNC_H2D},
      {DEV, SYS, KVX_STRATEGY_CUDA_BLOCKING_D2H}, {DEV, PIN, KVX_STRATEGY_CUDA_ASYNC_D2H},
      {DEV, DEV, KVX_STRATEGY_CUDA_ASYNC_D2D},   {SYS, DSK, KVX_STRATEGY_NIXL_WRITE},
      {PIN, DSK, KVX_STRATEGY_NIXL_WRITE},       {DSK, SYS, KVX_STRATEGY_NIXL_READ_FLIPPED},
      {DSK, PIN, KVX_STRATEGY_NIXL_READ_FLIPPED},
  };
  for (size_t i = 0; i < sizeof direct / sizeof direct[0]; i++) {
    kvx_plan p;
    CHECK_OK(kvx_plan_kinds(ctx, direct[i].s, 0, direct[i].d, 0, &p));
    CHECK(is_direct(p, direct[i].strategy));
  }
  kvx_plan p;
  CHECK_OK(kvx_plan_kinds(ctx, DSK, 0, DSK, 0, &p));
  CHECK(is_two_hop(p, KVX_STRATEGY_NIXL_READ_FLIPPED, KVX_STRATEGY_NIXL_WRITE));
  CHECK_OK(kvx_plan_kinds(ctx, DEV, 0, DSK, 0, &p));
  CHECK(is_two_hop(p, KVX_STRATEGY_CUDA_ASYNC_D2H, KVX_STRATEGY_NIXL_WRITE));
  CHECK_OK(kvx_plan_kinds(ctx, DSK, 0, DEV, 0, &p));
  CHECK(is_two_hop(p, KVX_STRATEGY_NIXL_READ_FLIPPED, KVX_STRATEGY_CUDA_ASYNC_H2D));
  kvx_context_free(ctx);
}

static void gds_makes_device_disk_direct(void) {
  kvx_context *ctx = ctx_with(1, 0);
  CHECK(ctx != NULL);
  kvx_plan p;
  CHECK_OK(kvx_plan_kinds(ctx, DEV, 0, DSK, 0, &p));
  CHECK(is_direct(p, KVX_STRATEGY_NIXL_WRITE));
  CHECK_OK(kvx_plan_kinds(ctx, DSK, 0, DEV, 0, &p));
  CHECK(is_direct(p, KVX_STRATEGY_NIXL_READ));
  CHECK_OK(kvx_plan_kinds(ctx, DSK, 0, DSK, 0, &p)); /* still two hops */
  CHECK(p.kind == KVX_PLAN_KIND_TWO_HOP);
  kvx_context_free(ctx);
}

static void remote_rules(void) {
  kvx_context *plain = ctx_with(0, 0);
  kvx_context *rdma = ctx_with(0, 1);
  CHECK(plain != NULL && rdma != NULL);
  kvx_plan p;
  CHECK_OK(kvx_plan_kinds(plain, SYS, 0, PIN, 1, &p));
  CHECK(is_direct(p, KVX_STRATEGY_NIXL_WRITE));
  CHECK_OK(kvx_plan_kinds(plain, SYS, 1, PIN, 0, &p));
  CHECK(is_direct(p, KVX_STRATEGY_NIXL_READ_FLIPPED));

  p.kind = 77;
  CHECK_STATUS(kvx_plan_kinds(plain, DEV, 0, SYS, 1, &p), KVX_STATUS_UNSUPPORTED);
  CHECK(strstr(kvx_last_error(), "local Device -> remote System") != NULL);
  CHECK(strstr(kvx_last_error(), "allow_gpu_rdma") != NULL);
  CHECK(p.kind == 77); /* untouched */
  CHECK_OK(kvx_plan_kinds(rdma, DEV, 0, SYS, 1, &p));
  CHECK(is_direct(p, KVX_STRATEGY_NIXL_WRITE));
  CHECK_OK(kvx_plan_kinds(rdma, DEV, 1, DEV, 0, &p));
  CHECK(is_direct(p, KVX_STRATEGY_NIXL_READ_FLIPPED));

  /* Disk on either side of a remote transfer is refused, whatever the capabilities. */
  p.kind = 77;
  CHECK_STATUS(kvx_plan_kinds(rdma, DSK, 0, SYS, 1, &p), KVX_STATUS_UNSUPPORTED);
  CHECK(strstr(kvx_last_error(), "local Disk -> remote System") != NULL);
  CHECK_STATUS(kvx_plan_kinds(rdma, SYS, 0, DSK, 1, &p), KVX_STATUS_UNSUPPORTED);
  CHECK_STATUS(kvx_plan_kinds(rdma, DSK, 1, PIN, 0, &p), KVX_STATUS_UNSUPPORTED);
  /* Both remote is refused. */
  CHECK_STATUS(kvx_plan_kinds(rdma, SYS, 1, SYS, 1, &p), KVX_STATUS_UNSUPPORTED);
  CHECK(strstr(kvx_last_error(), "remote System -> remote System") != NULL);
  CHECK(p.kind == 77);
  kvx_context_free(plain);
  kvx_context_free(rdma);
}

static void bad_arguments(void) {
  kvx_context *ctx = ctx_with(0, 0);
  CHECK(ctx != NULL);
  kvx_plan p;
  p.kind = 77;
  CHECK_STATUS(kvx_plan_kinds(NULL, SYS, 0, SYS, 0, &p), KVX_STATUS_NULL_ARGUMENT);
  CHECK_STATUS(kvx_plan_kinds(ctx, SYS, 0, SYS, 0, NULL), KVX_STATUS_NULL_ARGUMENT);
  CHECK_STATUS(kvx_plan_kinds(ctx, 4, 0, SYS, 0, &p), KVX_STATUS_INVALID_ARGUMENT);
  CHECK(strstr(kvx_last_error(), "storage kind 4") != NULL);
  CHECK_STATUS(kvx_plan_kinds(ctx, SYS, 0, -1, 0, &p), KVX_STATUS_INVALID_ARGUMENT);
  CHECK_STATUS(kvx_plan_kinds(ctx, SYS, 2, SYS, 0, &p), KVX_STATUS_INVALID_ARGUMENT);
  CHECK_STATUS(kvx_plan_kinds(ctx, SYS, 0, SYS, 255, &p), KVX_STATUS_INVALID_ARGUMENT);
  CHECK(p.kind == 77);
  kvx_context_free(ctx);
}

static void plan_of_two_layouts(void) {
  kvx_context *ctx = ctx_with(0, 0);
  CHECK(ctx != NULL);
  kvx_layout *a = test_layout(ctx, 4, 2, KVX_LAYOUT_KIND_FULLY_CONTIGUOUS, SYS);
  kvx_layout *b = test_layout(ctx, 4, 2, KVX_LAYOUT_KIND_LAYER_SEPARATE_BLOCK_FIRST, PIN);
  CHECK(a != NULL && b != NULL);
  kvx_plan p;
  CHECK_OK(kvx_plan_transfer(ctx, a, b, &p));
  CHECK(is_direct(p, KVX_STRATEGY_MEMCPY));
  CHECK_STATUS(kvx_plan_transfer(NULL, a, b, &p), KVX_STATUS_NULL_ARGUMENT);
  CHECK_STATUS(kvx_plan_transfer(ctx, NULL, b, &p), KVX_STATUS_NULL_ARGUMENT);
  CHECK_STATUS(kvx_plan_transfer(ctx, a, NULL, &p), KVX_STATUS_NULL_ARGUMENT);
  CHECK_STATUS(kvx_plan_transfer(ctx, a, b, NULL), KVX_STATUS_NULL_ARGUMENT);

  /* A layout of another context is refused. */
  kvx_context *other = ctx_with(0, 0);
  CHECK(other != NULL);
  CHECK_STATUS(kvx_plan_transfer(other, a, b, &p), KVX_STATUS_INVALID_ARGUMENT);
  kvx_context_free(other);
  kvx_layout_free(a);
  kvx_layout_free(b);
  kvx_context_free(ctx);
}

int main(void) {
  RUN(local_table_default_caps);
  RUN(gds_makes_device_disk_direct);
  RUN(remote_rules);
  RUN(bad_arguments);
  RUN(plan_of_two_layouts);
  return FINISH();
}
