"""Counts the global-memory traffic and dot FLOPs of Triton kernels run under the interpreter.

Design: the interpreter executes every `tl.load`/`tl.store`/`tl.dot` as a call on one module-level
`InterpreterBuilder` instance (`create_masked_load`, `create_masked_store`, `create_dot`; the unmasked forms
and atomic loads/stores delegate to the masked ones). `counting()` shadows those methods on that instance for
the duration of a `with` block, and wraps `InterpretedFunction.run` (one call per kernel launch) to open a
`Launch` record that knows the address range of every tensor argument. Each access is then attributed,
lane by lane, to the argument it falls in. Nothing in the kernels changes, and the values they compute are
irrelevant: a bf16 run has the traffic of a GPU bf16 run even though the interpreter's bf16 math is wrong.

What one access counts: the active lanes (mask true) times the pointer's element size, so masked-off lanes
move no bytes. `bytes` counts every access, i.e. a chip with no cache between programs (an upper bound);
`unique_bytes` counts each address once per launch and direction, i.e. a perfect L2 (a lower bound). A real
GPU lies between. Not modeled: sector/transaction granularity (32-byte sectors), coalescing, register or
shared-memory spills. FLOPs are those of `tl.dot` only (2·M·N·K, batched dims included); elementwise math,
exps and reductions are not counted. Tensor descriptors (TMA) raise rather than go uncounted.
"""

import contextlib
import inspect
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import numpy as np

LOAD, STORE = "load", "store"


@dataclass
class Launch:
    """One kernel launch: bytes per (direction, argument), dot FLOPs, and the grid it ran."""

    kernel: str
    grid: Tuple[int, ...]
    ranges: List[Tuple[int, int, str]]  # (first byte, end byte, argument name), sorted by first byte
    bytes: Dict[Tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    flops: int = 0
    _addresses: Dict[Tuple[str, str], List[np.ndarray]] = field(default_factory=lambda: defaultdict(list))

    def record(self, direction: str, addresses: np.ndarray, itemsize: int):
        starts = np.array([r[0] for r in self.ranges], dtype=np.uint64)
        slot = np.searchsorted(starts, addresses, side="right") - 1
        for i in np.unique(slot):
            hit = addresses[slot == i]
            name = "<unattributed>"  # outside every tensor argument (a bug in the kernel or in the launch)
            if i >= 0 and (hit < self.ranges[i][1]).all():
                name = self.ranges[i][2]
            self.bytes[direction, name] += hit.size * itemsize
            self._addresses[direction, name].append(hit)

    def total(self, direction: str = None) -> int:
        return sum(b for (d, _), b in self.bytes.items() if direction in (None, d))

    def unique_bytes(self, direction: str = None) -> int:
        """Bytes if every address were fetched (or written back) once per launch: a perfect cache."""
        out = 0
        for (d, name), chunks in self._addresses.items():
            if direction in (None, d):
                per_address = self.bytes[d, name] // sum(c.size for c in chunks)
                out += np.unique(np.concatenate(chunks)).size * per_address
        return out

    def by_argument(self) -> Dict[str, Dict[str, int]]:
        out = defaultdict(dict)
        for (d, name), b in self.bytes.items():
            out[name][d] = b
        return dict(out)


def _extent(t) -> Tuple[int, int]:
    """Byte range a tensor argument may touch (its view, not its whole storage: views of one buffer differ)."""
    span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride())) if t.numel() else 0
    return t.data_ptr(), t.data_ptr() + span * t.element_size()


def _itemsize(handle) -> int:
    return max(1, handle.get_element_ty().primitive_bitwidth // 8)


@contextlib.contextmanager
def counting():
    """`with counting() as launches:` every interpreted launch inside appends a `Launch` to `launches`."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the IO counter needs TRITON_INTERPRET=1 set before the kernels are imported")
    from triton.runtime import interpreter as interp

    builder, run = interp.interpreter_builder, interp.InterpretedFunction.run
    launches: List[Launch] = []
    cls = type(builder)

    def current() -> Launch:
        if not launches:
            raise RuntimeError("a load/store outside a counted launch")
        return launches[-1]

    def masked_load(ptrs, mask, other, cache_policy, is_volatile):
        active = np.broadcast_to(mask.data, ptrs.data.shape)
        current().record(LOAD, ptrs.data[active].astype(np.uint64), _itemsize(ptrs))
        return cls.create_masked_load(builder, ptrs, mask, other, cache_policy, is_volatile)

    def masked_store(ptrs, value, mask, cache_policy):
        active = np.broadcast_to(mask.data, ptrs.data.shape)
        current().record(STORE, ptrs.data[active].astype(np.uint64), _itemsize(ptrs))
        return cls.create_masked_store(builder, ptrs, value, mask, cache_policy)

    def atomic_rmw(op, ptr, val, mask, sem, scope):  # a read and a write of each active lane
        for direction in (LOAD, STORE):
            current().record(direction, ptr.data[np.broadcast_to(mask.data, ptr.data.shape)].astype(np.uint64),
                             _itemsize(ptr))
        return cls.create_atomic_rmw(builder, op, ptr, val, mask, sem, scope)

    def dot(a, b, d, input_precision, max_num_imprecise_acc):
        *batch, m, k = a.data.shape
        current().flops += 2 * int(np.prod(batch, dtype=np.int64)) * m * k * b.data.shape[-1]
        return cls.create_dot(builder, a, b, d, input_precision, max_num_imprecise_acc)

    def uncounted(*args, **kwargs):
        raise NotImplementedError("the IO counter does not count tensor-descriptor or CAS accesses")

    def counted_run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters  # launch options (num_warps...) are not arguments
        bound = inspect.signature(self.fn).bind_partial(
            *args, **{k: v for k, v in kwargs.items() if k in params}).arguments
        ranges = sorted((*_extent(v), k) for k, v in bound.items() if hasattr(v, "data_ptr") and v.numel())
        g = grid(bound) if callable(grid) else grid
        if not warmup:
            launches.append(Launch(self.fn.__name__, tuple(g) + (1,) * (3 - len(g)), ranges))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    patches = {"create_masked_load": masked_load, "create_masked_store": masked_store, "create_dot": dot,
               "create_atomic_rmw": atomic_rmw, "create_atomic_cas": uncounted,
               "create_descriptor_load": uncounted, "create_descriptor_store": uncounted,
               "create_descriptor_gather": uncounted, "create_descriptor_scatter": uncounted}
    for name, fn in patches.items():
        setattr(builder, name, fn)  # instance attributes shadow the class's methods
    interp.InterpretedFunction.run = counted_run
    try:
        yield launches
    finally:
        interp.InterpretedFunction.run = run
        for name in patches:
            delattr(builder, name)
