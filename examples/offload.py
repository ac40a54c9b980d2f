"""Offload with the Python bindings: blocks of a pool you own (NumPy arrays here; PyTorch
tensors work the same) move to a pinned pool kvxfer allocates and back, checked by checksums.
Run after `pip install ./python`."""

import numpy as np

import kvxfer

shape = dict(num_blocks=16, num_layers=8, page_size=16, inner_dim=8 * 128)
per_layer = 16 * 2 * 16 * 8 * 128 * 2
ctx = kvxfer.Context(nixl_backends=0)
engine = ctx.wrap_layout([np.zeros(per_layer, np.uint8) for _ in range(8)], **shape,
                         kind="layer_separate_block_first")
offload = ctx.new_layout(**shape, storage="pinned")
hot, slots = [3, 9, 1, 14], [0, 1, 2, 3]
ctx.fill(engine, hot, seed=7)
t = ctx.submit(engine, hot, offload, slots).wait()
ok = ctx.checksum(engine, hot) == ctx.checksum(offload, slots)
print(f"offload of {len(hot)} blocks ({t.stats['bytes']} bytes) by {t.stats['mechanism']}:",
      "verified" if ok else "MISMATCH")
raise SystemExit(0 if ok else 1)
