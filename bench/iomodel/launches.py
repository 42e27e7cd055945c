"""Kernel launches per layer forward and backward: Triton launches counted exactly, torch ops approximately.

A layer built with backend="triton" runs one forward and one backward under the interpreter. Triton launches
come from the IO counter (one `Launch` per interpreted launch). The torch work around them (projections, convs,
norms, casts, copies) is counted by a `TorchDispatchMode` as dispatched aten operators, leaving out views and
allocations, which launch nothing on a GPU; one operator is taken as one GPU kernel, which ignores the fusion
a compiler may do and the few operators that launch several kernels: an approximation, labelled so.
"""

from collections import Counter
from typing import Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from iomodel.counter import counting

_aten = torch.ops.aten
# allocations, aliases and host queries: dispatched operators that launch no GPU kernel
NO_KERNEL = {_aten.empty, _aten.empty_like, _aten.empty_strided, _aten.new_empty, _aten.new_empty_strided,
             _aten.detach, _aten.lift_fresh, _aten._unsafe_view, _aten.set_, _aten.promote_types,
             _aten.is_nonzero, _aten._local_scalar_dense}
# the layers (in ipl_layers.layers) whose op calls take backend="triton"
LAYERS = ("LinearAttention", "GatedLinearAttention", "DeltaNet", "GatedDeltaNet", "TTTLinear", "TTTMLP",
          "TitansMemory", "LaCT")


class _TorchOps(TorchDispatchMode):
    """Counts aten operators dispatched outside interpreted Triton launches (the interpreter copies arguments
    with torch, which a GPU launch does not do)."""

    def __init__(self):
        super().__init__()
        self.ops, self.paused = Counter(), False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and not func.is_view and func.overloadpacket not in NO_KERNEL:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _counted(run_pass):
    """{"triton": {kernel: launches}, "torch_ops": {operator: calls}} of one call of `run_pass`."""
    from triton.runtime import interpreter as interp

    with counting() as launches:
        mode, run = _TorchOps(), interp.InterpretedFunction.run

        def paused_run(self, *args, **kwargs):
            mode.paused = True
            try:
                return run(self, *args, **kwargs)
            finally:
                mode.paused = False

        interp.InterpretedFunction.run = paused_run
        try:
            with mode:
                run_pass()
        finally:
            interp.InterpretedFunction.run = run
    return {"triton": dict(Counter(x.kernel for x in launches)), "torch_ops": dict(mode.ops)}


def build_layer(name: str, hidden_size: int, num_heads: int) -> torch.nn.Module:
    import ipl_layers.layers

    if name not in LAYERS:
        raise ValueError(f"unknown layer {name!r}; one of {LAYERS}")
    return getattr(ipl_layers.layers, name)(hidden_size=hidden_size, num_heads=num_heads, backend="triton")


def layer_launches(layer: torch.nn.Module, x: torch.Tensor) -> Dict[str, Dict[str, Dict[str, int]]]:
    """{"fwd": ..., "bwd": ...} launches of one forward, then one backward of a fixed cotangent."""
    x = x.detach().requires_grad_(True)
    out, box = {}, []
    out["fwd"] = _counted(lambda: box.append(layer(x)[0]))
    do = torch.randn(box[0].shape, generator=torch.Generator().manual_seed(1))
    out["bwd"] = _counted(lambda: box[0].backward(do))
    return out
