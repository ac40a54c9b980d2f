// kvxfer's experiments' context: CUDA device 0, no NIXL; exits with kvxfer's message on failure.
#pragma once
#include <cstdio>
#include <cstdlib>
#include "../../include/kvxfer.h"

static kvx_context* kvx_gpu_context() {
  kvx_context_config cc;
  kvx_context_config_init(&cc);
  cc.nixl_backends = 0;
  cc.cuda_device = 0;
  kvx_context* ctx = nullptr;
  if (kvx_context_new(&cc, &ctx) != KVX_STATUS_OK) {
    printf("kvx_context_new: %s\n", kvx_last_error());
    exit(1);
  }
  return ctx;
}
