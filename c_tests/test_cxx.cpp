// The C++ wrapper (kvxfer.hpp) against the installed package: RAII handles, exceptions with
// the status, id views, moves; host tiers only (no NIXL needed).
#include <kvxfer.hpp>

#include <cstdio>
#include <cstring>
#include <type_traits>
#include <vector>

static int failed = 0;
#define EXPECT(cond)                                                      \
  do {                                                                    \
    if (!(cond)) {                                                        \
      std::fprintf(stderr, "%s:%d: EXPECT(%s) failed\n", __FILE__, __LINE__, #cond); \
      failed++;                                                           \
    }                                                                     \
  } while (0)

static_assert(!std::is_copy_constructible_v<kvxfer::context>, "handles are move-only");
static_assert(!std::is_copy_assignable_v<kvxfer::transfer>, "handles are move-only");
static_assert(std::is_nothrow_move_constructible_v<kvxfer::layout>, "moves never throw");
static_assert(std::is_nothrow_move_constructible_v<kvxfer::bytes>, "moves never throw");

static kvxfer::context host_context() {
  kvx_context_config c = kvxfer::context_config();
  c.nixl_backends = 0;
  c.worker_threads = 2;
  return kvxfer::context(c);
}

static kvx_layout_config shape(int32_t kind) {
  kvx_layout_config c = kvxfer::layout_config();
  c.num_blocks = 8;
  c.num_layers = 4;
  c.outer_dim = 2;
  c.page_size = 16;
  c.inner_dim = 64;
  c.kind = kind;
  return c;
}

static void moves_blocks_and_checks_them() {
  kvxfer::context ctx = host_context();
  kvx_storage sys{KVX_STORAGE_KIND_SYSTEM, 0, nullptr};
  kvx_storage pinned{KVX_STORAGE_KIND_PINNED, 0, nullptr};
  kvxfer::layout src = ctx.new_layout(shape(KVX_LAYOUT_KIND_FULLY_CONTIGUOUS), sys);
  kvxfer::layout dst = ctx.new_layout(shape(KVX_LAYOUT_KIND_LAYER_SEPARATE_OUTER_FIRST), pinned);
  const uint64_t from[] = {0, 1, 2};
  std::vector<uint64_t> to = {7, 5, 3};
  ctx.fill(src, from, 42);
  kvxfer::transfer t = ctx.submit(src, from, dst, to);
  t.wait();
  EXPECT(t.poll());
  EXPECT(t.stats().bytes == 3ull * 4 * 2 * 16 * 64 * 2);
  EXPECT(t.ipc_fallback() == KVX_IPC_FALLBACK_NONE);
  EXPECT(ctx.checksum(src, from) == ctx.checksum(dst, to));
  kvx_plan p = ctx.plan(src, dst);
  EXPECT(p.kind == KVX_PLAN_KIND_DIRECT && p.first == KVX_STRATEGY_MEMCPY);
  kvx_memory r = dst.region(3, 1, 1);
  EXPECT(r.size == 16 * 64 * 2);

  // Moved-from handles are empty and destroy nothing.
  kvxfer::layout moved = std::move(dst);
  EXPECT(!dst && moved);
  kvxfer::transfer t2 = std::move(t);
  EXPECT(!t && t2);

  // One layer at a time: layers outside the transfer's range are OUT_OF_RANGE.
  kvx_transfer_options o = kvxfer::transfer_options();
  o.layer_begin = 2;
  o.layer_end = 4;
  kvxfer::transfer lt = ctx.submit(src, from, moved, to, &o);
  try {
    lt.layer_wait(1);
    EXPECT(false);
  } catch (const kvxfer::error &e) {
    EXPECT(e.status() == KVX_STATUS_OUT_OF_RANGE);
  }
  lt.layer_wait(2);
  lt.layer_wait(3, 10 * 1000 * 1000);
  EXPECT(lt.stats().fragments == 3 * 2 * 2);
}

static void errors_carry_the_status_and_message() {
  kvxfer::context ctx = host_context();
  kvx_storage sys{KVX_STORAGE_KIND_SYSTEM, 0, nullptr};
  kvxfer::layout l = ctx.new_layout(shape(KVX_LAYOUT_KIND_FULLY_CONTIGUOUS), sys);
  const uint64_t bad[] = {99};
  const uint64_t ok[] = {0};
  try {
    ctx.submit(l, bad, l, ok);
    EXPECT(false);
  } catch (const kvxfer::error &e) {
    EXPECT(e.status() == KVX_STATUS_OUT_OF_RANGE);
    EXPECT(std::strcmp(e.name(), "KVX_STATUS_OUT_OF_RANGE") == 0);
    EXPECT(std::strstr(e.what(), "out of range") != nullptr);
  }
  try {
    ctx.submit(l, ok, l, kvxfer::ids(ok, 0));
    EXPECT(false);
  } catch (const kvxfer::error &e) {
    EXPECT(e.status() == KVX_STATUS_INVALID_ARGUMENT);
  }
  kvx_layout_config bad_shape = shape(KVX_LAYOUT_KIND_FULLY_CONTIGUOUS);
  bad_shape.num_blocks = 0;
  try {
    ctx.new_layout(bad_shape, sys);
    EXPECT(false);
  } catch (const kvxfer::error &e) {
    EXPECT(e.status() == KVX_STATUS_INVALID_ARGUMENT);
  }
  // Without NIXL: export, import and notifications are UNAVAILABLE.
  try {
    ctx.export_layouts({&l});
    EXPECT(false);
  } catch (const kvxfer::error &e) {
    EXPECT(e.status() == KVX_STATUS_UNAVAILABLE);
  }
}

int main() {
  try {
    moves_blocks_and_checks_them();
    errors_carry_the_status_and_message();
  } catch (const std::exception &e) {
    std::fprintf(stderr, "unexpected exception: %s\n", e.what());
    return 1;
  }
  std::printf("%s\n", failed == 0 ? "C++ wrapper: all checks passed" : "C++ wrapper: FAILED");
  return failed == 0 ? 0 : 1;
}
