"""Counting what makes a GPU wait, on any device: aten ops (each op that is not a view is one
kernel launch on a GPU) and host syncs (ops whose result the host must read back).

    counter = OpCounter()
    with counter:
        with counter.section("augmentation"):
            ...
    counter.launches("augmentation"), counter.total(), counter.syncs()

Run on the `meta` device, a function takes CUDA's Python branches (no CPU-only shortcuts) and
dispatches the ops CUDA would, without computing anything.
"""

import collections
import contextlib
from typing import Counter, Dict, Iterator, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops whose result the host reads (a value, or a shape that depends on the data): on a GPU each
# one waits until the device has finished everything queued before it.
SYNC_OPS = frozenset(
    {
        aten._local_scalar_dense.default,  # .item(), float(t), bool(t), int(t), `if t:`
        aten.is_nonzero.default,
        aten.equal.default,
        aten.nonzero.default,  # data-dependent shapes: boolean indexing, one-argument where
        aten.masked_select.default,
        aten.repeat_interleave.Tensor,  # a sync unless output_size is given
        aten._unique2.default,
        aten.unique_consecutive.default,
        aten.unique_dim.default,
    }
)

Key = Tuple[str, str]  # (section, aten op name)


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside the `with` block, by section and op name."""

    def __init__(self):
        super().__init__()
        self.current = "other"
        self.ops: Counter[Key] = collections.Counter()
        self.views: Counter[Key] = collections.Counter()
        self.sync_ops: Counter[Key] = collections.Counter()

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Ops dispatched inside are counted under `name`."""
        outer, self.current = self.current, name
        try:
            yield
        finally:
            self.current = outer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        key = (self.current, str(func.overloadpacket.__name__))
        self.ops[key] += 1
        if func.is_view:
            self.views[key] += 1
        if func in SYNC_OPS and not (
            func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is not None
        ):
            self.sync_ops[key] += 1
        return func(*args, **kwargs)

    @staticmethod
    def _sum(counts: Counter[Key], section: Optional[str]) -> int:
        return sum(n for (s, _), n in counts.items() if section is None or s == section)

    def total(self, section: Optional[str] = None) -> int:
        return self._sum(self.ops, section)

    def launches(self, section: Optional[str] = None) -> int:
        """Ops that are not views: one kernel launch each on a GPU."""
        return self.total(section) - self._sum(self.views, section)

    def syncs(self, section: Optional[str] = None) -> int:
        return self._sum(self.sync_ops, section)

    def sections(self) -> List[str]:
        return sorted({s for s, _ in self.ops})

    def sync_names(self) -> Dict[str, int]:
        named: Counter[str] = collections.Counter()
        for (_, name), n in self.sync_ops.items():
            named[name] += n
        return dict(named)

    def summary(self, section: Optional[str] = None) -> str:
        return (
            f"{self.launches(section)} launches ({self.total(section)} ops), "
            f"{self.syncs(section)} host syncs"
        )
