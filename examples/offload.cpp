// The offload example with the C++ wrapper: RAII handles, exceptions, id views. C++17.
#include <kvxfer.hpp>

#include <cstdio>
#include <vector>

int main() {
  try {
    kvx_context_config cc = kvxfer::context_config();
    cc.nixl_backends = 0;  // host tiers only
    kvxfer::context ctx(cc);

    kvx_layout_config lc = kvxfer::layout_config();
    lc.num_blocks = 16;
    lc.num_layers = 8;
    lc.outer_dim = 2;
    lc.page_size = 16;
    lc.inner_dim = 8 * 128;
    lc.kind = KVX_LAYOUT_KIND_LAYER_SEPARATE_BLOCK_FIRST;
    kvxfer::layout engine = ctx.new_layout(lc, {KVX_STORAGE_KIND_SYSTEM, 0, nullptr});
    lc.kind = KVX_LAYOUT_KIND_FULLY_CONTIGUOUS;
    kvxfer::layout offload = ctx.new_layout(lc, {KVX_STORAGE_KIND_PINNED, 0, nullptr});

    const std::vector<uint64_t> hot = {3, 9, 1, 14};
    const std::vector<uint64_t> slots = {0, 1, 2, 3};
    ctx.fill(engine, hot, 7);
    kvxfer::transfer t = ctx.submit(engine, hot, offload, slots);
    t.wait();
    const bool same = ctx.checksum(engine, hot) == ctx.checksum(offload, slots);
    std::printf("offload of %zu blocks (%llu bytes): %s\n", hot.size(),
                static_cast<unsigned long long>(t.stats().bytes), same ? "verified" : "MISMATCH");
    return same ? 0 : 1;
  } catch (const kvxfer::error &e) {
    std::fprintf(stderr, "kvxfer: %s\n", e.what());
    return 1;
  }
}
