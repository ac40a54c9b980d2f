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

int main(void) {
  RUN(default_context_loads_nixl);
  RUN(only_posix);
  if (skipped) {
    printf("NIXL cannot be loaded: %s\n0 passed, 0 failed, 2 skipped\n", kvx_last_error());
    return 0;
  }
  return FINISH();
}
