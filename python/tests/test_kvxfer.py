"""The Python bindings over the installed package: host tiers here, NIXL (disk, peers) where it
loads, GPU tests where there is a GPU and PyTorch (skipped, and reported so, elsewhere)."""

import ctypes
import os

import pytest

import kvxfer

SHAPE = dict(num_blocks=8, num_layers=4, page_size=16, inner_dim=256)


def host_context(**kw):
    return kvxfer.Context(nixl_backends=0, worker_threads=2, **kw)


def nixl_context(**kw):
    try:
        return kvxfer.Context(worker_threads=2, **kw)
    except kvxfer.Error as e:
        if e.status == "KVX_STATUS_UNAVAILABLE" and not os.environ.get("KVX_REQUIRE_NIXL"):
            pytest.skip(f"NIXL is not available: {e.message}")
        raise


def test_version_and_host_round_trip():
    assert kvxfer.version().count(".") == 2
    ctx = host_context()
    src = ctx.new_layout(**SHAPE, storage="pinned")
    dst = ctx.new_layout(**SHAPE, kind="layer_separate_outer_first", storage="system")
    ctx.fill(src, [0, 1, 2], seed=42)
    t = ctx.submit(src, [0, 1, 2], dst, [7, 5, 3]).wait()
    assert t.poll()
    assert t.stats["mechanism"] == "memcpy" and t.stats["strategy"] == "KVX_STRATEGY_MEMCPY"
    assert t.stats["ipc_fallback"] is None
    assert t.stats["bytes"] == 3 * 4 * 2 * 16 * 256 * 2 and not t.stats["bounced"]
    assert t.stats["sms"] == 0  # host memcpy: no copy kernel
    assert ctx.checksum(src, [0, 1, 2]) == ctx.checksum(dst, [7, 5, 3])
    assert ctx.plan(src, dst) == ("KVX_STRATEGY_MEMCPY", None, None)


def test_errors_carry_the_status():
    ctx = host_context()
    l = ctx.new_layout(**SHAPE)
    with pytest.raises(kvxfer.Error) as e:
        ctx.submit(l, [99], l, [0])
    assert e.value.status == "KVX_STATUS_OUT_OF_RANGE" and "out of range" in e.value.message
    with pytest.raises(kvxfer.Error) as e:
        ctx.new_layout(**dict(SHAPE, num_blocks=0))
    assert e.value.status == "KVX_STATUS_INVALID_ARGUMENT"
    with pytest.raises(kvxfer.Error) as e:
        ctx.export([l])
    assert e.value.status == "KVX_STATUS_UNAVAILABLE"
    with pytest.raises(ValueError):
        ctx.new_layout(**SHAPE, storage="tape")
    with pytest.raises(kvxfer.Error) as e:
        kvxfer.Context(nixl_backends=0, peer_key=b"short")
    assert e.value.status == "KVX_STATUS_INVALID_ARGUMENT"


def test_each_layer_can_be_waited_for():
    ctx = kvxfer.Context(nixl_backends=0, worker_threads=2, cuda_device=-1)
    src = ctx.new_layout(**SHAPE, storage="system")
    dst = ctx.new_layout(**SHAPE, kind="layer_separate_block_first", storage="pinned")
    ctx.fill(src, [4, 6], seed=3)
    t = ctx.submit(src, [4, 6], dst, [1, 0], layer_begin=1, layer_end=3)
    for layer in (0, 3):
        with pytest.raises(kvxfer.Error) as e:
            t.layer_wait(layer)
        assert e.value.status == "KVX_STATUS_OUT_OF_RANGE" and f"layer {layer}" in e.value.message
    for layer in (1, 2):
        t.layer_wait(layer, timeout=10)
    with pytest.raises(kvxfer.Error) as e:
        t.layer_stream_wait(1, 1)
    assert e.value.status == "KVX_STATUS_UNAVAILABLE"
    t.wait()
    assert t.stats["fragments"] == 2 * 2 * 2


def test_wrapped_numpy_arrays_and_address_pairs():
    np = pytest.importorskip("numpy")
    ctx = host_context()
    per_layer = 8 * 2 * 16 * 256 * 2
    pool = [np.zeros(per_layer, dtype=np.uint8) for _ in range(4)]
    wrapped = ctx.wrap_layout(pool, **SHAPE, kind="layer_separate_block_first")
    ctx.fill(wrapped, [1, 6], seed=3)
    assert pool[2].any(), "the fill landed in the caller's arrays"
    addr, size = wrapped.region(6, layer=2, outer=1)
    base = pool[2].__array_interface__["data"][0]
    assert base <= addr < base + per_layer and size == 16 * 256 * 2
    flat = np.zeros(8 * 4 * 2 * 16 * 256 * 2, dtype=np.uint8)
    pair = ctx.wrap_layout([(flat.__array_interface__["data"][0], flat.nbytes)], **SHAPE)
    ctx.submit(wrapped, [1, 6], pair, [0, 7]).wait()
    assert ctx.checksum(wrapped, [1, 6]) == ctx.checksum(pair, [0, 7])
    assert flat.any()
    # Ids straight from memory (no per-id conversion): NumPy int64/uint64, a ctypes array; a
    # strided view is copied, never read with the wrong stride.
    ctx.fill(wrapped, [2, 3, 4], seed=8)
    ctx.submit(wrapped, np.array([2, 3], dtype=np.int64), pair, np.array([5, 4], dtype=np.uint64)).wait()
    assert ctx.checksum(pair, [5, 4]) == ctx.checksum(wrapped, [2, 3])
    ids = (ctypes.c_uint64 * 2)(4, 2)
    ctx.submit(wrapped, ids, pair, np.array([9, 3, 9, 1], dtype=np.int64)[1::2]).wait()
    assert ctx.checksum(pair, [3, 1]) == ctx.checksum(wrapped, [4, 2])


def test_disk_and_a_peer_with_a_notification(tmp_path):
    a = nixl_context(peer_key=b"python test deployment secret")
    b = nixl_context(peer_key=b"python test deployment secret")
    host = a.new_layout(**SHAPE, storage="pinned")
    disk = a.new_layout(**SHAPE, storage="disk", path=tmp_path / "pool.kv")
    a.fill(host, range(8), seed=9)
    a.submit(host, range(8), disk, range(8)).wait(timeout=30)
    assert a.checksum(disk, range(8)) == a.checksum(host, range(8))
    peer = b.import_peer(a.export([host]))
    (remote,) = peer.layouts
    mine = b.new_layout(**SHAPE)
    b.submit(remote, [0, 1], mine, [2, 3]).wait(timeout=30)
    assert b.checksum(mine, [2, 3]) == a.checksum(host, [0, 1])
    b.fill(mine, [4], seed=5)
    b.submit(mine, [4], remote, [4], notify=b"wrote 4").wait(timeout=30)
    for _ in range(5000):
        n = a.next_notification()
        if n is not None:
            break
    assert n is not None and n[1] == b"wrote 4"
    with pytest.raises(kvxfer.Error) as e:
        b.import_peer(b"not an export")
    assert e.value.status == "KVX_STATUS_PEER"


def test_gpu_tensors():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    ctx = kvxfer.Context(nixl_backends=0)
    shape = dict(SHAPE, kind="layer_separate_block_first")
    per_layer = 8 * 2 * 16 * 256
    layers = [torch.zeros(per_layer, dtype=torch.bfloat16, device="cuda") for _ in range(4)]
    dev = ctx.wrap_layout(layers, **shape, storage="device")
    host = ctx.new_layout(**SHAPE, storage="pinned")
    ctx.fill(host, range(8), seed=1)
    stream = torch.cuda.Stream()
    t = ctx.submit(host, range(8), dev, range(8))
    t.stream_wait(stream.cuda_stream)
    t.wait()
    assert ctx.checksum(dev, range(8)) == ctx.checksum(host, range(8))


def test_head_transform_splits_a_rank():
    ctx = host_context()
    shape = dict(num_blocks=3, num_layers=2, page_size=4, outer_dim=2)
    full = ctx.new_layout(**shape, inner_dim=8 * 16, num_heads=8, head_order="nhd")
    half = ctx.new_layout(**shape, inner_dim=4 * 16, num_heads=4, head_begin=4, head_order="hnd")
    ctx.fill(full, range(3), seed=4)
    t = ctx.submit(full, [0, 2], half, [1, 0])
    t.wait()
    assert t.stats["bytes"] == 2 * 2 * 2 * 4 * 4 * 16 * 2
    hb = 16 * 2
    for s, d in ((0, 1), (2, 0)):
        for layer in range(2):
            for o in range(2):
                src, _ = full.region(s, layer, o)
                dst, _ = half.region(d, layer, o)
                for tok in range(4):
                    for h in range(4, 8):
                        a = ctypes.string_at(src + (tok * 8 + h) * hb, hb)
                        b = ctypes.string_at(dst + ((h - 4) * 4 + tok) * hb, hb)
                        assert a == b
    with pytest.raises(kvxfer.Error) as e:
        ctx.submit(full, [0], ctx.new_layout(**shape, inner_dim=4 * 16, num_heads=4, head_begin=8), [0])
    assert e.value.status == "KVX_STATUS_INVALID_ARGUMENT"
