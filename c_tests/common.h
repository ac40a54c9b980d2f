/* A minimal test harness shared by the C tests: CHECK fails the current test function, RUN
 * runs one, FINISH prints "N passed, M failed" and returns the exit code. C11 and C++17. */
#ifndef KVX_TEST_COMMON_H
#define KVX_TEST_COMMON_H

#include <kvxfer.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

static int kvx_test_passed = 0;
static int kvx_test_failed = 0;
static int kvx_test_current_failed = 0;

#define CHECK(cond)                                                                     \
  do {                                                                                  \
    if (!(cond)) {                                                                      \
      fprintf(stderr, "%s:%d: CHECK(%s) failed (last error: \"%s\")\n", __FILE__,      \
              __LINE__, #cond, kvx_last_error());                                       \
      kvx_test_current_failed = 1;                                                      \
      return;                                                                           \
    }                                                                                   \
  } while (0)

/* Checks a call's status and, for errors, that kvx_last_error() explains it. */
#define CHECK_STATUS(call, expected)                                                    \
  do {                                                                                  \
    int32_t s_ = (call);                                                                \
    if (s_ != (expected)) {                                                             \
      fprintf(stderr, "%s:%d: %s returned %s, expected %s (last error: \"%s\")\n",     \
              __FILE__, __LINE__, #call, kvx_status_name(s_), kvx_status_name(expected), \
              kvx_last_error());                                                        \
      kvx_test_current_failed = 1;                                                      \
      return;                                                                           \
    }                                                                                   \
    if (s_ < 0 && kvx_last_error()[0] == '\0') {                                        \
      fprintf(stderr, "%s:%d: %s failed without a message\n", __FILE__, __LINE__, #call); \
      kvx_test_current_failed = 1;                                                      \
      return;                                                                           \
    }                                                                                   \
  } while (0)

#define CHECK_OK(call) CHECK_STATUS(call, KVX_STATUS_OK)

#define RUN(test)                                                                       \
  do {                                                                                  \
    kvx_test_current_failed = 0;                                                        \
    test();                                                                             \
    if (kvx_test_current_failed) {                                                      \
      kvx_test_failed++;                                                                \
      printf("FAIL %s\n", #test);                                                       \
    } else {                                                                            \
      kvx_test_passed++;                                                                \
      printf("ok   %s\n", #test);                                                       \
    }                                                                                   \
  } while (0)

#define FINISH()                                                                        \
  (printf("%d passed, %d failed\n", kvx_test_passed, kvx_test_failed),                  \
   kvx_test_failed == 0 ? 0 : 1)

/* A sentinel that an output parameter must still hold after a failed call. */
#define SENTINEL(type) ((type)(uintptr_t)0x5e5e5e5e)

static inline kvx_context *test_context(uint32_t threads) {
  kvx_context_config cfg;
  kvx_context_config_init(&cfg);
  cfg.worker_threads = threads;
  cfg.nixl_backends = 0; /* host and plan tests need no NIXL; test_nixl.c covers it */
  kvx_context *ctx = NULL;
  if (kvx_context_new(&cfg, &ctx) != KVX_STATUS_OK) {
    fprintf(stderr, "kvx_context_new failed: %s\n", kvx_last_error());
    return NULL;
  }
  return ctx;
}

/* 16 tokens x 64 x bf16 = 2 KiB regions, K and V. */
static inline kvx_layout_config test_layout_config(uint64_t blocks, uint64_t layers, int32_t kind) {
  kvx_layout_config c;
  kvx_layout_config_init(&c);
  c.num_blocks = blocks;
  c.num_layers = layers;
  c.outer_dim = 2;
  c.page_size = 16;
  c.inner_dim = 64;
  c.kind = kind;
  return c;
}

static inline kvx_layout *test_layout(kvx_context *ctx, uint64_t blocks, uint64_t layers,
                                      int32_t kind, int32_t storage_kind) {
  kvx_layout_config c = test_layout_config(blocks, layers, kind);
  kvx_storage st;
  st.kind = storage_kind;
  st.device_id = 0;
  st.path = NULL;
  kvx_layout *l = NULL;
  if (kvx_layout_new(ctx, &c, &st, &l) != KVX_STATUS_OK) {
    fprintf(stderr, "kvx_layout_new failed: %s\n", kvx_last_error());
    return NULL;
  }
  return l;
}

#endif
