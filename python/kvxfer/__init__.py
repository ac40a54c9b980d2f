"""kvxfer: moves LLM KV-cache blocks between GPU memory, pinned host memory, host memory, disk
and other processes. Bindings over the C ABI (include/kvxfer.h) with ctypes.

    ctx = kvxfer.Context(nixl_backends=0)
    src = ctx.new_layout(num_blocks=8, num_layers=4, page_size=16, inner_dim=1024,
                         storage="pinned")
    dst = ctx.new_layout(num_blocks=8, num_layers=4, page_size=16, inner_dim=1024,
                         kind="layer_separate_block_first", storage="system")
    ctx.fill(src, [0, 1, 2], seed=42)
    ctx.submit(src, [0, 1, 2], dst, [7, 5, 3]).wait()
    assert ctx.checksum(src, [0, 1, 2]) == ctx.checksum(dst, [7, 5, 3])

Every failing call raises `Error` (`status` is the C status name, e.g. "KVX_STATUS_PEER").
Objects free what they own when they are garbage collected, or at once with `close()`.
Contexts and layouts may be used from several threads; a transfer from one at a time.
"""

import ctypes
import os
from ctypes import (
    POINTER,
    Structure,
    byref,
    c_char,
    c_char_p,
    c_int32,
    c_int64,
    c_size_t,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    c_void_p,
)
from pathlib import Path

__all__ = ["Context", "Layout", "Transfer", "Peer", "Error", "version"]


def _load():
    candidates = []
    if os.environ.get("KVX_LIB_PATH"):
        candidates.append(os.environ["KVX_LIB_PATH"])
    candidates.append(str(Path(__file__).resolve().parent / "libkvxfer.so"))
    candidates.append("libkvxfer.so")
    errors = []
    for c in candidates:
        try:
            return ctypes.CDLL(c)
        except OSError as e:
            errors.append(f"{c}: {e}")
    raise ImportError("kvxfer's shared library was not found: " + "; ".join(errors))


_lib = _load()

# Status codes (kvxfer.h).
OK, PENDING, TIMEOUT = 0, 1, -10

STORAGE = {"system": 0, "pinned": 1, "device": 2, "disk": 3}
LAYOUT = {"fully_contiguous": 0, "layer_separate_block_first": 1, "layer_separate_outer_first": 2}
HEAD_ORDER = {"nhd": 0, "hnd": 1}
COPY_MODE = {"auto": 0, "copy_engine": 1, "kernel": 2}
BACKEND = {"ucx": 1, "posix": 2, "gds": 4, "gds_mt": 8}
MECHANISM = {0: "memcpy", 1: "copy_engine", 2: "kernel", 3: "nixl", 4: "ipc"}
IPC_FALLBACK = {0: None, 1: "disabled", 2: "other_host", 3: "not_exported", 4: "refused", 5: "same_process"}


class _ContextConfig(Structure):
    _fields_ = [
        ("agent_name", c_char_p),
        ("nixl_backends", c_uint32),
        ("cuda_device", c_int32),
        ("allow_gds", c_uint8),
        ("allow_gpu_rdma", c_uint8),
        ("disk_dir", c_char_p),
        ("worker_threads", c_uint32),
        ("peer_key", POINTER(c_uint8)),
        ("peer_key_len", c_size_t),
        ("max_sms", c_uint32),
        ("disable_ipc", c_uint8),
    ]


class _LayoutConfig(Structure):
    _fields_ = [
        ("num_blocks", c_uint64),
        ("num_layers", c_uint64),
        ("outer_dim", c_uint64),
        ("page_size", c_uint64),
        ("inner_dim", c_uint64),
        ("dtype_width_bytes", c_uint32),
        ("alignment", c_uint32),
        ("kind", c_int32),
        ("num_heads", c_uint32),
        ("head_begin", c_uint32),
        ("head_order", c_int32),
    ]


class _Storage(Structure):
    _fields_ = [("kind", c_int32), ("device_id", c_int32), ("path", c_char_p)]


class _Memory(Structure):
    _fields_ = [("addr", c_uint64), ("size", c_uint64)]


class _Bytes(Structure):
    _fields_ = [("data", POINTER(c_uint8)), ("len", c_size_t)]


class _Plan(Structure):
    _fields_ = [("kind", c_int32), ("first", c_int32), ("bounce_storage", c_int32), ("second", c_int32)]


class _TransferOptions(Structure):
    _fields_ = [
        ("layer_begin", c_uint64),
        ("layer_end", c_uint64),
        ("cuda_stream", c_void_p),
        ("copy_mode", c_int32),
        ("notify_msg", POINTER(c_uint8)),
        ("notify_len", c_size_t),
    ]


class _TransferStats(Structure):
    _fields_ = [
        ("bytes", c_uint64),
        ("fragments", c_uint64),
        ("copies", c_uint64),
        ("plan", _Plan),
        ("elapsed_ns", c_uint64),
        ("mechanism", c_int32),
        ("kernel_fallback", c_uint8),
        ("bounced", c_uint8),
        ("sms", c_uint16),
    ]


def _sig(name, restype, *argtypes):
    f = getattr(_lib, name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


_u64p = POINTER(c_uint64)
_status_name = _sig("kvx_status_name", c_char_p, c_int32)
_last_error = _sig("kvx_last_error", c_char_p)
_version = _sig("kvx_version", c_char_p)
_strategy_name = _sig("kvx_strategy_name", c_char_p, c_int32)
_context_config_init = _sig("kvx_context_config_init", None, POINTER(_ContextConfig))
_context_new = _sig("kvx_context_new", c_int32, POINTER(_ContextConfig), POINTER(c_void_p))
_context_free = _sig("kvx_context_free", None, c_void_p)
_layout_config_init = _sig("kvx_layout_config_init", None, POINTER(_LayoutConfig))
_layout_new = _sig("kvx_layout_new", c_int32, c_void_p, POINTER(_LayoutConfig), POINTER(_Storage), POINTER(c_void_p))
_layout_wrap = _sig(
    "kvx_layout_wrap", c_int32, c_void_p, POINTER(_LayoutConfig), POINTER(_Storage), POINTER(_Memory), c_size_t,
    POINTER(c_void_p),
)
_layout_region = _sig("kvx_layout_region", c_int32, c_void_p, c_uint64, c_uint64, c_uint64, POINTER(_Memory))
_layout_free = _sig("kvx_layout_free", None, c_void_p)
_plan_transfer = _sig("kvx_plan_transfer", c_int32, c_void_p, c_void_p, c_void_p, POINTER(_Plan))
_transfer_options_init = _sig("kvx_transfer_options_init", None, POINTER(_TransferOptions))
_transfer_submit = _sig(
    "kvx_transfer_submit", c_int32, c_void_p, c_void_p, _u64p, c_void_p, _u64p, c_size_t,
    POINTER(_TransferOptions), POINTER(c_void_p),
)
_transfer_poll = _sig("kvx_transfer_poll", c_int32, c_void_p)
_transfer_wait = _sig("kvx_transfer_wait", c_int32, c_void_p, c_int64)
_transfer_stream_wait = _sig("kvx_transfer_stream_wait", c_int32, c_void_p, c_void_p)
_transfer_layer_wait = _sig("kvx_transfer_layer_wait", c_int32, c_void_p, c_uint64, c_int64)
_transfer_layer_stream_wait = _sig(
    "kvx_transfer_layer_stream_wait", c_int32, c_void_p, c_uint64, c_void_p
)
_transfer_get_stats = _sig("kvx_transfer_get_stats", c_int32, c_void_p, POINTER(_TransferStats))
_transfer_ipc_fallback = _sig("kvx_transfer_ipc_fallback", c_int32, c_void_p, POINTER(c_int32))
_transfer_free = _sig("kvx_transfer_free", None, c_void_p)
_context_export = _sig("kvx_context_export", c_int32, c_void_p, POINTER(c_void_p), c_size_t, POINTER(_Bytes))
_bytes_free = _sig("kvx_bytes_free", None, POINTER(_Bytes))
_context_import = _sig("kvx_context_import", c_int32, c_void_p, POINTER(c_uint8), c_size_t, POINTER(c_void_p))
_peer_layout_count = _sig("kvx_peer_layout_count", c_size_t, c_void_p)
_peer_layout = _sig("kvx_peer_layout", c_int32, c_void_p, c_size_t, POINTER(c_void_p))
_peer_free = _sig("kvx_peer_free", None, c_void_p)
_next_notification = _sig(
    "kvx_context_next_notification", c_int32, c_void_p, POINTER(c_char), c_size_t, POINTER(c_uint8), c_size_t,
    POINTER(c_size_t),
)
_layout_fill = _sig("kvx_layout_fill", c_int32, c_void_p, c_void_p, _u64p, c_size_t, c_uint64)
_layout_checksum = _sig("kvx_layout_checksum", c_int32, c_void_p, c_void_p, _u64p, c_size_t, _u64p)


class Error(Exception):
    """A kvxfer call failed. `status` is its name ("KVX_STATUS_INVALID_ARGUMENT", ...), `code`
    its number, `message` kvx_last_error()."""

    def __init__(self, code, message):
        self.code = code
        self.status = _status_name(code).decode()
        self.message = message
        super().__init__(f"{self.status}: {message}")


def _check(status):
    if status < 0:
        raise Error(status, _last_error().decode(errors="replace"))
    return status


def version():
    """The library's version, e.g. "0.2.0"."""
    return _version().decode()


def _ids(blocks):
    """Block ids as a pointer for C, without a copy where they already lie in memory as
    64-bit integers (a ctypes c_uint64 array, a contiguous one-dimensional NumPy uint64/int64
    array, a contiguous CPU int64 tensor): converting 65536 Python ints costs milliseconds. The
    caller keeps `blocks` alive during the call."""
    if isinstance(blocks, ctypes.Array) and blocks._type_ is c_uint64:
        return blocks, len(blocks)
    ai = getattr(blocks, "__array_interface__", None)
    if (ai is not None and ai.get("typestr") in ("<u8", "<i8") and len(ai.get("shape", ())) == 1
            and ai.get("strides") in (None, (8,))):
        return ctypes.cast(ai["data"][0], _u64p), ai["shape"][0]
    if (hasattr(blocks, "data_ptr") and str(getattr(blocks, "dtype", "")) == "torch.int64"
            and getattr(blocks, "is_cuda", True) is False and blocks.dim() == 1
            and blocks.is_contiguous()):
        return ctypes.cast(blocks.data_ptr(), _u64p), blocks.numel()
    ids = list(blocks)
    return (c_uint64 * len(ids))(*ids), len(ids)


def _memory_of(obj):
    """(address, size) of a tensor, an array, or a pair."""
    if isinstance(obj, tuple) and len(obj) == 2:
        return int(obj[0]), int(obj[1])
    if hasattr(obj, "data_ptr"):  # PyTorch and friends
        size = obj.numel() * obj.element_size() if hasattr(obj, "numel") else obj.nbytes
        return int(obj.data_ptr()), int(size)
    if hasattr(obj, "__array_interface__"):  # NumPy and friends
        ai = obj.__array_interface__
        return int(ai["data"][0]), int(obj.nbytes)
    raise TypeError(f"cannot take the memory of {type(obj).__name__}: give (address, size)")


def _enum(table, value, what):
    if isinstance(value, int):
        return value
    try:
        return table[value]
    except KeyError:
        raise ValueError(f"unknown {what} {value!r}; one of {', '.join(table)}") from None


class _Handle:
    _free = None

    def __init__(self, ptr, keep=()):
        self._ptr = ptr
        self._keep = keep  # what must outlive the handle (memory wrapped, the context)

    def close(self):
        """Releases the handle now (as the C *_free)."""
        if self._ptr:
            type(self)._free(self._ptr)
            self._ptr = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Layout(_Handle):
    """A pool of KV blocks in one tier, or a peer's."""

    _free = staticmethod(_layout_free)

    def region(self, block, layer=0, outer=0):
        """(address, size) of one (block, layer, outer) piece; for disk the address is an offset."""
        m = _Memory()
        _check(_layout_region(self._ptr, block, layer, outer, byref(m)))
        return m.addr, m.size


class Transfer(_Handle):
    """A submitted transfer; wait() for it. Dropping it waits for it to finish."""

    _free = staticmethod(_transfer_free)

    def poll(self):
        """True once finished (raises its error)."""
        return _check(_transfer_poll(self._ptr)) == OK

    def wait(self, timeout=None):
        """Waits, for at most `timeout` seconds (None: forever); raises its error, or Error with
        status KVX_STATUS_TIMEOUT (the transfer goes on)."""
        us = -1 if timeout is None else int(timeout * 1e6)
        _check(_transfer_wait(self._ptr, us))
        return self

    def stream_wait(self, cuda_stream):
        """Makes a CUDA stream (a CUstream handle as an int, e.g. torch's stream.cuda_stream)
        wait for the transfer; the host does not block."""
        _check(_transfer_stream_wait(self._ptr, c_void_p(int(cuda_stream))))

    def layer_wait(self, layer, timeout=None):
        """Waits for one layer of the transfer (layers complete in order, never later than the
        transfer), for at most `timeout` seconds; raises KVX_STATUS_OUT_OF_RANGE for a layer
        the transfer does not move."""
        us = -1 if timeout is None else int(timeout * 1e6)
        _check(_transfer_layer_wait(self._ptr, layer, us))
        return self

    def layer_stream_wait(self, layer, cuda_stream):
        """Makes a CUDA stream wait for one layer of the transfer; the host does not block."""
        _check(_transfer_layer_stream_wait(self._ptr, layer, c_void_p(int(cuda_stream))))

    @property
    def stats(self):
        s = _TransferStats()
        _check(_transfer_get_stats(self._ptr, byref(s)))
        return {
            "bytes": s.bytes,
            "fragments": s.fragments,
            "copies": s.copies,
            "strategy": _strategy_name(s.plan.first).decode(),
            "two_hop": s.plan.kind == 1,
            "mechanism": MECHANISM.get(s.mechanism, str(s.mechanism)),
            "kernel_fallback": bool(s.kernel_fallback),
            "bounced": bool(s.bounced),
            "sms": s.sms,
            "ipc_fallback": self._ipc_fallback(),
            "elapsed_ns": s.elapsed_ns,
        }

    def _ipc_fallback(self):
        r = c_int32()
        _check(_transfer_ipc_fallback(self._ptr, byref(r)))
        return IPC_FALLBACK.get(r.value, str(r.value))


class Peer(_Handle):
    """A peer imported from its export, with the layouts it shared."""

    _free = staticmethod(_peer_free)

    @property
    def layouts(self):
        out = []
        for i in range(_peer_layout_count(self._ptr)):
            p = c_void_p()
            _check(_peer_layout(self._ptr, i, byref(p)))
            out.append(Layout(p.value, keep=(self,)))
        return out


class Context(_Handle):
    """What moves blocks: worker threads, the CUDA device, the NIXL agent.

    Keyword arguments are the fields of kvx_context_config: nixl_backends (int bits or a list
    of "ucx", "posix", "gds", "gds_mt"; default ucx and posix), cuda_device (default 0, -1 for
    none), allow_gds, allow_gpu_rdma, disk_dir, worker_threads, agent_name, peer_key (bytes), max_sms, disable_ipc."""

    _free = staticmethod(_context_free)

    def __init__(self, **config):
        c = _ContextConfig()
        _context_config_init(byref(c))
        keep = []
        for k, v in config.items():
            if k == "nixl_backends" and not isinstance(v, int):
                v = sum(_enum(BACKEND, b, "backend") for b in v)
            if k in ("agent_name", "disk_dir") and v is not None:
                v = str(v).encode()
                keep.append(v)
            if k == "peer_key":
                if v is not None:
                    buf = (c_uint8 * len(v)).from_buffer_copy(bytes(v))
                    keep.append(buf)
                    c.peer_key = ctypes.cast(buf, POINTER(c_uint8))
                    c.peer_key_len = len(v)
                continue
            if not hasattr(c, k) or k.startswith("peer_key"):
                raise TypeError(f"unknown context option {k!r}")
            setattr(c, k, v)
        p = c_void_p()
        _check(_context_new(byref(c), byref(p)))
        super().__init__(p.value)

    @staticmethod
    def _layout_config(num_blocks, num_layers, page_size, inner_dim, outer_dim, dtype_width, alignment, kind,
                       heads):
        c = _LayoutConfig()
        _layout_config_init(byref(c))
        c.num_blocks, c.num_layers, c.outer_dim = num_blocks, num_layers, outer_dim
        c.page_size, c.inner_dim = page_size, inner_dim
        c.dtype_width_bytes, c.alignment = dtype_width, alignment
        c.kind = _enum(LAYOUT, kind, "layout kind")
        num_heads, head_begin, head_order = heads
        c.num_heads, c.head_begin = num_heads, head_begin
        c.head_order = _enum(HEAD_ORDER, head_order, "head order")
        return c

    def new_layout(self, *, num_blocks, num_layers, page_size, inner_dim, outer_dim=2, dtype_width=2,
                   alignment=1, kind="fully_contiguous", storage="system", device_id=0, path=None,
                   num_heads=0, head_begin=0, head_order="nhd"):
        """A layout over memory kvxfer allocates (and frees with it). num_heads > 0 describes
        the heads its regions hold (head_begin.., in head_order "nhd" or "hnd") for head
        transforms between differently sharded engines."""
        c = self._layout_config(num_blocks, num_layers, page_size, inner_dim, outer_dim, dtype_width, alignment, kind,
                                (num_heads, head_begin, head_order))
        p_path = None if path is None else str(path).encode()
        s = _Storage(_enum(STORAGE, storage, "storage kind"), device_id, p_path)
        p = c_void_p()
        _check(_layout_new(self._ptr, byref(c), byref(s), byref(p)))
        return Layout(p.value, keep=(self,))

    def wrap_layout(self, regions, *, num_blocks, num_layers, page_size, inner_dim, outer_dim=2, dtype_width=2,
                    alignment=1, kind="fully_contiguous", storage="system", device_id=0,
                    num_heads=0, head_begin=0, head_order="nhd"):
        """A layout over memory you own: one region for fully contiguous layouts, one per layer
        otherwise; each a tensor, an array or (address, size). The objects are kept alive as
        long as the layout."""
        c = self._layout_config(num_blocks, num_layers, page_size, inner_dim, outer_dim, dtype_width, alignment, kind,
                                (num_heads, head_begin, head_order))
        mem = [_memory_of(r) for r in regions]
        arr = (_Memory * len(mem))(*[_Memory(a, n) for a, n in mem])
        s = _Storage(_enum(STORAGE, storage, "storage kind"), device_id, None)
        p = c_void_p()
        _check(_layout_wrap(self._ptr, byref(c), byref(s), arr, len(mem), byref(p)))
        return Layout(p.value, keep=(self, tuple(regions)))

    def plan(self, src, dst):
        """The planner's decision: (strategy name, bounce storage or None, second strategy or None)."""
        pl = _Plan()
        _check(_plan_transfer(self._ptr, src._ptr, dst._ptr, byref(pl)))
        first = _strategy_name(pl.first).decode()
        if pl.kind == 0:
            return first, None, None
        bounce = {v: k for k, v in STORAGE.items()}.get(pl.bounce_storage)
        return first, bounce, _strategy_name(pl.second).decode()

    def submit(self, src, src_blocks, dst, dst_blocks, *, layer_begin=0, layer_end=0, copy_mode="auto",
               cuda_stream=None, notify=None):
        """Moves src_blocks[i] of src to dst_blocks[i] of dst; returns a Transfer at once."""
        sb, n = _ids(src_blocks)
        db, m = _ids(dst_blocks)
        if n != m:
            raise ValueError(f"{n} source blocks but {m} destination blocks")
        o = _TransferOptions()
        _transfer_options_init(byref(o))
        o.layer_begin, o.layer_end = layer_begin, layer_end
        o.copy_mode = _enum(COPY_MODE, copy_mode, "copy mode")
        if cuda_stream is not None:
            o.cuda_stream = c_void_p(int(cuda_stream))
        keep = (self, src, dst)
        if notify is not None:
            buf = (c_uint8 * len(notify)).from_buffer_copy(bytes(notify))
            o.notify_msg, o.notify_len = ctypes.cast(buf, POINTER(c_uint8)), len(notify)
            keep += (buf,)
        p = c_void_p()
        _check(_transfer_submit(self._ptr, src._ptr, sb, dst._ptr, db, n, byref(o), byref(p)))
        return Transfer(p.value, keep=keep)

    def export(self, layouts):
        """The bytes a peer imports: this context's NIXL metadata and the layouts."""
        arr = (c_void_p * len(layouts))(*[l._ptr for l in layouts])
        b = _Bytes()
        _check(_context_export(self._ptr, arr, len(layouts), byref(b)))
        try:
            return ctypes.string_at(b.data, b.len)
        finally:
            _bytes_free(byref(b))

    def import_peer(self, data):
        """A Peer from the bytes another context exported (untrusted: anything malformed is an
        Error with status KVX_STATUS_PEER)."""
        data = bytes(data)
        buf = (c_uint8 * len(data)).from_buffer_copy(data)
        p = c_void_p()
        _check(_context_import(self._ptr, buf, len(data), byref(p)))
        return Peer(p.value, keep=(self,))

    def next_notification(self, max_len=1 << 16):
        """(sender agent, message bytes) of the oldest notification, or None."""
        agent = (c_char * 1024)()
        msg = (c_uint8 * max_len)()
        n = c_size_t()
        if _check(_next_notification(self._ptr, agent, len(agent), msg, max_len, byref(n))) == PENDING:
            return None
        return agent.value.decode(), bytes(msg[: n.value])

    def fill(self, layout, blocks, seed):
        """Writes the verification pattern of `seed` into `blocks`."""
        ids, n = _ids(blocks)
        _check(_layout_fill(self._ptr, layout._ptr, ids, n, seed))

    def checksum(self, layout, blocks):
        """One checksum per block, equal for equal content in any layout kind or tier."""
        ids, n = _ids(blocks)
        out = (c_uint64 * n)()
        _check(_layout_checksum(self._ptr, layout._ptr, ids, n, out))
        return list(out)
