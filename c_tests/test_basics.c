/* Version, status and strategy names, config defaults, context creation and its errors.
 * This file is also compiled as C++17 (test_basics_cxx.cpp). */
#include "common.h"

static void version_matches_macros(void) {
  char expected[64];
  snprintf(expected, sizeof expected, "%d.%d.%d", KVX_VERSION_MAJOR, KVX_VERSION_MINOR,
           KVX_VERSION_PATCH);
  CHECK(strcmp(kvx_version(), expected) == 0);
}

static void status_names(void) {
  struct { int32_t s; const char *name; } table[] = {
      {KVX_STATUS_OK, "KVX_STATUS_OK"},
      {KVX_STATUS_PENDING, "KVX_STATUS_PENDING"},
      {KVX_STATUS_NULL_ARGUMENT, "KVX_STATUS_NULL_ARGUMENT"},
      {KVX_STATUS_INVALID_ARGUMENT, "KVX_STATUS_INVALID_ARGUMENT"},
      {KVX_STATUS_OUT_OF_RANGE, "KVX_STATUS_OUT_OF_RANGE"},
      {KVX_STATUS_UNSUPPORTED, "KVX_STATUS_UNSUPPORTED"},
      {KVX_STATUS_UNAVAILABLE, "KVX_STATUS_UNAVAILABLE"},
      {KVX_STATUS_OUT_OF_MEMORY, "KVX_STATUS_OUT_OF_MEMORY"},
      {KVX_STATUS_IO, "KVX_STATUS_IO"},
      {KVX_STATUS_CUDA, "KVX_STATUS_CUDA"},
      {KVX_STATUS_NIXL, "KVX_STATUS_NIXL"},
      {KVX_STATUS_TIMEOUT, "KVX_STATUS_TIMEOUT"},
      {KVX_STATUS_PEER, "KVX_STATUS_PEER"},
      {KVX_STATUS_PANIC, "KVX_STATUS_PANIC"},
      {12345, "KVX_STATUS_UNKNOWN"},
  };
  for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
    CHECK(strcmp(kvx_status_name(table[i].s), table[i].name) == 0);
  }
  CHECK(KVX_STATUS_OK == 0 && KVX_STATUS_PENDING == 1 && KVX_STATUS_NULL_ARGUMENT == -1);
  CHECK(KVX_STATUS_PEER == -11 && KVX_STATUS_PANIC == -99);
}

static void strategy_names(void) {
  CHECK(strcmp(kvx_strategy_name(KVX_STRATEGY_MEMCPY), "KVX_STRATEGY_MEMCPY") == 0);
  CHECK(strcmp(kvx_strategy_name(KVX_STRATEGY_NIXL_READ_FLIPPED),
               "KVX_STRATEGY_NIXL_READ_FLIPPED") == 0);
  CHECK(strcmp(kvx_strategy_name(KVX_STRATEGY_INVALID), "KVX_STRATEGY_INVALID") == 0);
  CHECK(strcmp(kvx_strategy_name(11), "KVX_STRATEGY_UNKNOWN") == 0);
  CHECK(strcmp(kvx_strategy_name(-1), "KVX_STRATEGY_UNKNOWN") == 0);
}

static void config_defaults(void) {
  kvx_context_config c;
  memset(&c, 0x7f, sizeof c);
  kvx_context_config_init(&c);
  CHECK(c.agent_name == NULL);
  CHECK(c.nixl_backends == (KVX_BACKEND_UCX | KVX_BACKEND_POSIX));
  CHECK(c.cuda_device == 0);
  CHECK(c.allow_gds == 0 && c.allow_gpu_rdma == 0);
  CHECK(c.disk_dir == NULL);
  CHECK(c.worker_threads == 0);
  CHECK(c.max_sms == 0);
  CHECK(c.disable_ipc == 0);
  kvx_context_config_init(NULL); /* no-op */

  kvx_layout_config l;
  memset(&l, 0x7f, sizeof l);
  kvx_layout_config_init(&l);
  CHECK(l.dtype_width_bytes == 2 && l.alignment == 1);
  CHECK(l.kind == KVX_LAYOUT_KIND_FULLY_CONTIGUOUS);
  CHECK(l.num_blocks == 0 && l.num_layers == 0);
  kvx_layout_config_init(NULL);

  kvx_transfer_options o;
  memset(&o, 0x7f, sizeof o);
  kvx_transfer_options_init(&o);
  CHECK(o.layer_begin == 0 && o.layer_end == 0);
  CHECK(o.cuda_stream == NULL && o.copy_mode == KVX_COPY_MODE_AUTO);
  CHECK(o.notify_msg == NULL && o.notify_len == 0);
  kvx_transfer_options_init(NULL);
}

static void context_lifecycle(void) {
  kvx_context_config c;
  kvx_context_config_init(&c);
  c.agent_name = "basics-agent";
  c.worker_threads = 2;
  c.nixl_backends = 0;
  kvx_context *ctx = NULL;
  CHECK_OK(kvx_context_new(&c, &ctx));
  CHECK(ctx != NULL);
  kvx_context_free(ctx);
  kvx_context_free(NULL); /* no-op */
}

static void context_errors_leave_output_untouched(void) {
  kvx_context_config c;
  kvx_context *ctx = SENTINEL(kvx_context *);

  CHECK_STATUS(kvx_context_new(NULL, &ctx), KVX_STATUS_NULL_ARGUMENT);
  CHECK(strstr(kvx_last_error(), "config") != NULL);
  kvx_context_config_init(&c);
  CHECK_STATUS(kvx_context_new(&c, NULL), KVX_STATUS_NULL_ARGUMENT);

  c.nixl_backends = 16;
  CHECK_STATUS(kvx_context_new(&c, &ctx), KVX_STATUS_INVALID_ARGUMENT);
  CHECK(strstr(kvx_last_error(), "backend") != NULL);

  kvx_context_config_init(&c);
  c.cuda_device = -2;
  CHECK_STATUS(kvx_context_new(&c, &ctx), KVX_STATUS_INVALID_ARGUMENT);
  CHECK(strstr(kvx_last_error(), "cuda_device") != NULL);

  kvx_context_config_init(&c);
  c.allow_gds = 2;
  CHECK_STATUS(kvx_context_new(&c, &ctx), KVX_STATUS_INVALID_ARGUMENT);
  CHECK(strstr(kvx_last_error(), "allow_gds") != NULL);

  kvx_context_config_init(&c);
  c.disable_ipc = 3;
  CHECK_STATUS(kvx_context_new(&c, &ctx), KVX_STATUS_INVALID_ARGUMENT);
  CHECK(strstr(kvx_last_error(), "disable_ipc") != NULL);

  kvx_context_config_init(&c);
  c.worker_threads = 100000;
  CHECK_STATUS(kvx_context_new(&c, &ctx), KVX_STATUS_INVALID_ARGUMENT);

  kvx_context_config_init(&c);
  c.agent_name = "";
  CHECK_STATUS(kvx_context_new(&c, &ctx), KVX_STATUS_INVALID_ARGUMENT);

  kvx_context_config_init(&c);
  c.agent_name = "bad\xff";
  CHECK_STATUS(kvx_context_new(&c, &ctx), KVX_STATUS_INVALID_ARGUMENT);
  CHECK(strstr(kvx_last_error(), "UTF-8") != NULL);

  CHECK(ctx == SENTINEL(kvx_context *));
}

/* An ordinal the driver does not list is refused where there is a driver; without one, the
 * context is made without CUDA, as with -1, and DEVICE storage is UNAVAILABLE. */
static void missing_cuda_device(void) {
  kvx_context_config c;
  kvx_context_config_init(&c);
  c.nixl_backends = 0;
  c.cuda_device = 99;
  kvx_context *ctx = SENTINEL(kvx_context *);
  int32_t s = kvx_context_new(&c, &ctx);
  if (s == KVX_STATUS_INVALID_ARGUMENT) {
    CHECK(strstr(kvx_last_error(), "99") != NULL);
    CHECK(ctx == SENTINEL(kvx_context *));
    return;
  }
  CHECK_OK(s);
  kvx_layout_config lc = test_layout_config(2, 1, KVX_LAYOUT_KIND_FULLY_CONTIGUOUS);
  kvx_storage dev = {KVX_STORAGE_KIND_DEVICE, 0, NULL};
  kvx_layout *l = SENTINEL(kvx_layout *);
  CHECK_STATUS(kvx_layout_new(ctx, &lc, &dev, &l), KVX_STATUS_UNAVAILABLE);
  CHECK(l == SENTINEL(kvx_layout *));
  kvx_context_free(ctx);
}

static int log_lines = 0;
static int log_saw_refusal = 0;
static void on_log(int32_t level, const char *target, const char *message, void *user) {
  (void)target;
  if (level >= KVX_LOG_LEVEL_ERROR && level <= KVX_LOG_LEVEL_DEBUG && user == (void *)&log_lines)
    log_lines++;
  if (strstr(message, "refused") != NULL && strstr(message, "worker_threads") != NULL)
    log_saw_refusal = 1;
}

/* Log lines go to the runtime's callback, up to its level; NULL sends them back to stderr. */
static void log_callback(void) {
  CHECK_STATUS(kvx_set_log_callback(on_log, 0, NULL), KVX_STATUS_INVALID_ARGUMENT);
  CHECK_STATUS(kvx_set_log_callback(on_log, 6, NULL), KVX_STATUS_INVALID_ARGUMENT);
  CHECK_OK(kvx_set_log_callback(on_log, KVX_LOG_LEVEL_DEBUG, &log_lines));
  kvx_context *ctx = test_context(1); /* "context made" at INFO */
  CHECK(ctx != NULL);
  kvx_context_free(ctx);
  kvx_context_config c;
  kvx_context_config_init(&c);
  c.worker_threads = 100000;
  CHECK_STATUS(kvx_context_new(&c, &ctx), KVX_STATUS_INVALID_ARGUMENT);
  CHECK(log_lines >= 2);
  CHECK(log_saw_refusal);
  /* Up to ERROR only: the same refusal (DEBUG) is not delivered. */
  CHECK_OK(kvx_set_log_callback(on_log, KVX_LOG_LEVEL_ERROR, &log_lines));
  int before = log_lines;
  CHECK_STATUS(kvx_context_new(&c, &ctx), KVX_STATUS_INVALID_ARGUMENT);
  CHECK(log_lines == before);
  CHECK_OK(kvx_set_log_callback(NULL, KVX_LOG_LEVEL_ERROR, NULL));
}

static void last_error_survives_success(void) {
  kvx_context *ctx = NULL;
  CHECK_STATUS(kvx_context_new(NULL, &ctx), KVX_STATUS_NULL_ARGUMENT);
  ctx = test_context(1);
  CHECK(ctx != NULL);
  CHECK(strstr(kvx_last_error(), "config is NULL") != NULL);
  kvx_context_free(ctx);
}

int main(void) {
  RUN(version_matches_macros);
  RUN(status_names);
  RUN(strategy_names);
  RUN(config_defaults);
  RUN(context_lifecycle);
  RUN(context_errors_leave_output_untouched);
  RUN(missing_cuda_device);
  RUN(log_callback);
  RUN(last_error_survives_success);
  return FINISH();
}
