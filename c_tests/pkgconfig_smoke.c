/* Linked through pkg-config by scripts/dev: the .pc file gives working flags. */
#include <kvxfer.h>
#include <stdio.h>
#include <string.h>

int main(void) {
  kvx_context_config c;
  kvx_context_config_init(&c);
  c.nixl_backends = 0;
  kvx_context *ctx = NULL;
  if (kvx_context_new(&c, &ctx) != KVX_STATUS_OK) {
    fprintf(stderr, "kvx_context_new: %s\n", kvx_last_error());
    return 1;
  }
  kvx_context_free(ctx);
  printf("pkg-config smoke: kvxfer %s\n", kvx_version());
  return strcmp(kvx_version(), "") == 0;
}
