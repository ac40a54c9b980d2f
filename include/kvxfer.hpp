/* kvxfer.hpp: a C++17 header-only wrapper over kvxfer.h.
 *
 * Move-only RAII handles (context, layout, transfer, peer, bytes) release what they own with
 * the matching kvx_*_free; every failing call throws kvxfer::error, which carries the status
 * and kvx_last_error(). Block ids are passed as views (pointer + size) of the caller's arrays:
 * nothing is copied behind the caller's back. Thread safety is the C API's: contexts and
 * layouts may be used from many threads at once, a transfer from one at a time. */
#ifndef KVXFER_HPP
#define KVXFER_HPP

#include <kvxfer.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace kvxfer {

/* A kvxfer call failed: status() is its KVX_STATUS_*, what() its kvx_last_error(). */
class error : public std::runtime_error {
 public:
  error(int32_t status, const char *detail)
      : std::runtime_error(std::string(kvx_status_name(status)) + ": " + detail), status_(status) {}
  int32_t status() const noexcept { return status_; }
  const char *name() const noexcept { return kvx_status_name(status_); }

 private:
  int32_t status_;
};

/* Throws for an error status; returns OK and PENDING. */
inline int32_t check(int32_t status) {
  if (status < 0) throw error(status, kvx_last_error());
  return status;
}

/* A view of block ids: the caller's array, never copied. */
class ids {
 public:
  ids(const uint64_t *data, size_t size) noexcept : data_(data), size_(size) {}
  ids(const std::vector<uint64_t> &v) noexcept : data_(v.data()), size_(v.size()) {}
  template <size_t N>
  ids(const uint64_t (&a)[N]) noexcept : data_(a), size_(N) {}
  const uint64_t *data() const noexcept { return data_; }
  size_t size() const noexcept { return size_; }

 private:
  const uint64_t *data_;
  size_t size_;
};

namespace detail {
/* A move-only owner of a T* released by Free. */
template <class T, void (*Free)(T *)>
class handle {
 public:
  handle() noexcept = default;
  explicit handle(T *p) noexcept : p_(p) {}
  handle(handle &&o) noexcept : p_(std::exchange(o.p_, nullptr)) {}
  handle &operator=(handle &&o) noexcept {
    if (this != &o) {
      reset();
      p_ = std::exchange(o.p_, nullptr);
    }
    return *this;
  }
  handle(const handle &) = delete;
  handle &operator=(const handle &) = delete;
  ~handle() { reset(); }
  T *get() const noexcept { return p_; }
  explicit operator bool() const noexcept { return p_ != nullptr; }
  /* Gives up ownership: the caller frees the pointer. */
  T *release() noexcept { return std::exchange(p_, nullptr); }
  void reset() noexcept {
    if (p_ != nullptr) Free(std::exchange(p_, nullptr));
  }

 private:
  T *p_ = nullptr;
};
}  // namespace detail

/* Defaults of the config structs, from the _init functions. */
inline kvx_context_config context_config() {
  kvx_context_config c;
  kvx_context_config_init(&c);
  return c;
}
inline kvx_layout_config layout_config() {
  kvx_layout_config c;
  kvx_layout_config_init(&c);
  return c;
}
inline kvx_transfer_options transfer_options() {
  kvx_transfer_options o;
  kvx_transfer_options_init(&o);
  return o;
}

/* A layout: a pool of KV blocks in one storage tier, or a peer's. */
class layout : public detail::handle<kvx_layout, kvx_layout_free> {
 public:
  using handle::handle;
  /* The memory of (block, layer, outer): address (file offset for DISK) and size. */
  kvx_memory region(uint64_t block, uint64_t layer, uint64_t outer) const {
    kvx_memory m;
    check(kvx_layout_region(get(), block, layer, outer, &m));
    return m;
  }
};

/* A submitted transfer. Destroying it waits for it to finish. */
class transfer : public detail::handle<kvx_transfer, kvx_transfer_free> {
 public:
  using handle::handle;
  /* true once finished; throws its error. */
  bool poll() { return check(kvx_transfer_poll(get())) == KVX_STATUS_OK; }
  /* Waits (timeout_us < 0: forever); throws its error, or TIMEOUT (the transfer goes on). */
  void wait(int64_t timeout_us = -1) { check(kvx_transfer_wait(get(), timeout_us)); }
  /* Makes a CUstream wait for the transfer; the host does not block. */
  void stream_wait(void *cuda_stream) { check(kvx_transfer_stream_wait(get(), cuda_stream)); }
  /* Waits for one layer (0.2; layers complete in order, never later than the transfer). */
  void layer_wait(uint64_t layer, int64_t timeout_us = -1) {
    check(kvx_transfer_layer_wait(get(), layer, timeout_us));
  }
  /* Makes a CUstream wait for one layer; the host does not block. */
  void layer_stream_wait(uint64_t layer, void *cuda_stream) {
    check(kvx_transfer_layer_stream_wait(get(), layer, cuda_stream));
  }
  kvx_transfer_stats stats() const {
    kvx_transfer_stats s;
    check(kvx_transfer_get_stats(get(), &s));
    return s;
  }
  /* KVX_IPC_FALLBACK_*: why NIXL rather than CUDA IPC moved a transfer between device memory
     here and a same-host peer's (0.2); KVX_IPC_FALLBACK_NONE otherwise. */
  int32_t ipc_fallback() const {
    int32_t why = KVX_IPC_FALLBACK_NONE;
    check(kvx_transfer_ipc_fallback(get(), &why));
    return why;
  }
};

/* Bytes kvxfer made (an export), freed with kvx_bytes_free. */
class bytes {
 public:
  bytes() noexcept = default;
  explicit bytes(kvx_bytes b) noexcept : b_(b) {}
  bytes(bytes &&o) noexcept : b_(std::exchange(o.b_, kvx_bytes{nullptr, 0})) {}
  bytes &operator=(bytes &&o) noexcept {
    if (this != &o) {
      kvx_bytes_free(&b_);
      b_ = std::exchange(o.b_, kvx_bytes{nullptr, 0});
    }
    return *this;
  }
  bytes(const bytes &) = delete;
  bytes &operator=(const bytes &) = delete;
  ~bytes() { kvx_bytes_free(&b_); }
  const uint8_t *data() const noexcept { return b_.data; }
  size_t size() const noexcept { return b_.len; }

 private:
  kvx_bytes b_{nullptr, 0};
};

/* An imported peer and the layouts it shared. */
class peer : public detail::handle<kvx_peer, kvx_peer_free> {
 public:
  using handle::handle;
  size_t size() const noexcept { return kvx_peer_layout_count(get()); }
  /* A new handle to the peer's layout `index`. */
  kvxfer::layout layout(size_t index) const {
    kvx_layout *l = nullptr;
    check(kvx_peer_layout(get(), index, &l));
    return kvxfer::layout(l);
  }
};

/* A notification a peer sent with a write. */
struct notification {
  std::string agent;
  std::vector<uint8_t> message;
};

/* What moves blocks: worker threads, the CUDA device, the NIXL agent. */
class context : public detail::handle<kvx_context, kvx_context_free> {
 public:
  using handle::handle;
  explicit context(const kvx_context_config &config) {
    kvx_context *c = nullptr;
    check(kvx_context_new(&config, &c));
    *this = context(c);
  }

  kvxfer::layout new_layout(const kvx_layout_config &config, const kvx_storage &storage) {
    kvx_layout *l = nullptr;
    check(kvx_layout_new(get(), &config, &storage, &l));
    return kvxfer::layout(l);
  }

  /* A layout over the caller's memory, which kvxfer never frees. */
  kvxfer::layout wrap(const kvx_layout_config &config, const kvx_storage &storage,
                      const kvx_memory *regions, size_t n_regions) {
    kvx_layout *l = nullptr;
    check(kvx_layout_wrap(get(), &config, &storage, regions, n_regions, &l));
    return kvxfer::layout(l);
  }

  kvx_plan plan(const kvxfer::layout &src, const kvxfer::layout &dst) const {
    kvx_plan p;
    check(kvx_plan_transfer(get(), src.get(), dst.get(), &p));
    return p;
  }

  /* Moves src_blocks[i] of src to dst_blocks[i] of dst; returns before the bytes moved. */
  kvxfer::transfer submit(const kvxfer::layout &src, ids src_blocks, const kvxfer::layout &dst,
                          ids dst_blocks, const kvx_transfer_options *options = nullptr) {
    if (src_blocks.size() != dst_blocks.size()) {
      throw error(KVX_STATUS_INVALID_ARGUMENT, "source and destination id counts differ");
    }
    kvx_transfer *t = nullptr;
    check(kvx_transfer_submit(get(), src.get(), src_blocks.data(), dst.get(), dst_blocks.data(),
                              src_blocks.size(), options, &t));
    return kvxfer::transfer(t);
  }

  kvxfer::bytes export_layouts(const std::vector<const kvxfer::layout *> &layouts) {
    std::vector<const kvx_layout *> raw;
    raw.reserve(layouts.size());
    for (const kvxfer::layout *l : layouts) raw.push_back(l->get());
    kvx_bytes b{nullptr, 0};
    check(kvx_context_export(get(), raw.data(), raw.size(), &b));
    return kvxfer::bytes(b);
  }

  kvxfer::peer import(const uint8_t *data, size_t len) {
    kvx_peer *p = nullptr;
    check(kvx_context_import(get(), data, len, &p));
    return kvxfer::peer(p);
  }
  kvxfer::peer import(const kvxfer::bytes &b) { return import(b.data(), b.size()); }

  /* The oldest notification, if one arrived. Messages longer than max_len throw
   * INVALID_ARGUMENT and stay queued. */
  std::optional<notification> next_notification(size_t max_len = 4096) {
    std::vector<char> agent(256);
    notification n;
    n.message.resize(max_len);
    size_t len = 0;
    int32_t s = check(kvx_context_next_notification(get(), agent.data(), agent.size(),
                                                     n.message.data(), n.message.size(), &len));
    if (s == KVX_STATUS_PENDING) return std::nullopt;
    n.agent = agent.data();
    n.message.resize(len);
    return n;
  }

  void fill(const kvxfer::layout &l, ids blocks, uint64_t seed) {
    check(kvx_layout_fill(get(), l.get(), blocks.data(), blocks.size(), seed));
  }
  std::vector<uint64_t> checksum(const kvxfer::layout &l, ids blocks) {
    std::vector<uint64_t> out(blocks.size());
    check(kvx_layout_checksum(get(), l.get(), blocks.data(), blocks.size(), out.data()));
    return out;
  }
};

}  // namespace kvxfer

#endif
