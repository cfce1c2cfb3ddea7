"""Op-by-op recording on the CPU of what a CUDA graph would capture, shared by the step and
loss tests: ops that read a value back to the host or give a data-dependent shape break a
capture (or make every replay wait for the host); so does boolean-mask indexing (its kernel
runs nonzero)."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HOST_SYNC_OPS = ("nonzero", "_local_scalar_dense", "is_nonzero", "masked_select", "unique", "bincount",
                 "repeat_interleave", "aten.equal", "allclose", "histc", "item")


class OpRecorder(TorchDispatchMode):
    """`with OpRecorder() as rec: ...`; then `rec.ops` (every op) and `rec.bad()` (the syncing ones)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = torch.utils._pytree.tree_leaves((args, kwargs))
        bool_index = "index" in str(func) and any(isinstance(a, torch.Tensor) and a.dtype == torch.bool
                                                  for a in flat[1:])
        self.seen.append((str(func), bool_index))
        return func(*args, **(kwargs or {}))

    @property
    def ops(self) -> list[str]:
        return [op for op, _ in self.seen]

    def bad(self) -> list[str]:
        return [op for op, bool_index in self.seen if bool_index or any(k in op for k in HOST_SYNC_OPS)]
