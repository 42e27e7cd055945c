"""The modeled GPU cost of a registered op: interpreter counts per chunk, scaled to a production shape.

A case (bench/registry.py) is run through our Triton path at B = H = 1 and the target K, V, in bf16 (the counter
counts traffic, not values, so the interpreter's wrong bf16 math does not matter), at two lengths of 2 and 3
chunks. Their difference is the cost of one chunk, the rest a fixed cost; heads and sequences are independent
programs, so a production shape costs B * H * (fixed + chunks * per chunk). Tests check that extrapolation
against a direct count.

IO efficiency = minimum bytes / counted bytes. The minimum reads every input once and writes every output once
(the backward: inputs and the output gradient in, input gradients out), plus the chunk states a two-pass chunked
algorithm must write and read back (`PASSED_STATES`); `strict_min_bytes` leaves those states out (what a
kernel that keeps every state on chip would need).
"""

from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Dict, Optional

import numpy as np
import torch

from iomodel.counter import counting
from registry import Shape

PASSES = ("fwd", "bwd")
# [NT, H, K, V] state tensors in the input dtype that the chunked algorithm writes once and reads once, per pass:
# the forward's chunk-start states (for TTT-Linear the weights at each mini-batch start, the chunk being the
# mini-batch); the backward's recomputed (or saved) states and the state gradients
PASSED_STATES = {op: {"fwd": 1, "bwd": 2} for op in ("linear_attention", "delta_rule", "ttt_linear")}


@dataclass(frozen=True)
class Counts:
    bytes: float  # every access: no cache between programs
    unique_bytes: float  # each address once per launch and direction: a perfect cache
    flops: float  # tl.dot only
    launches: Dict[str, int] = field(default_factory=dict)  # kernel name -> launches (not scaled)
    traffic: Dict[str, float] = field(default_factory=dict)  # "kernel: argument direction" -> bytes

    def plus(self, other: "Counts", times: float = 1) -> "Counts":
        """self + times * other (times = -1: the difference); launches are self's."""
        keys = dict.fromkeys([*self.traffic, *other.traffic])
        traffic = {k: self.traffic.get(k, 0) + times * other.traffic.get(k, 0) for k in keys}
        return Counts(self.bytes + times * other.bytes, self.unique_bytes + times * other.unique_bytes,
                      self.flops + times * other.flops, self.launches, traffic)

    def times(self, factor: float) -> "Counts":
        return Counts(0, 0, 0, self.launches).plus(self, factor)


def _bf16(inputs):
    return {n: x.to(torch.bfloat16) if x.is_floating_point() else x for n, x in inputs.items()}


def count_pass(case, shape: Shape, pass_name: str) -> Counts:
    """Counts one forward, or one backward (the forward run uncounted before it), of our Triton path."""
    fn = case.impls[0].load("triton", shape.chunk)
    inputs = _bf16(case.make_inputs(shape, torch.Generator().manual_seed(0)))
    leaves = {n: x.requires_grad_(pass_name == "bwd" and x.is_floating_point()) for n, x in inputs.items()}
    with np.errstate(all="ignore"):  # the interpreter's bf16 math overflows; only the traffic matters here
        if pass_name == "fwd":
            with counting() as launches, torch.no_grad():
                fn(**leaves)
        else:
            o = fn(**leaves)
            do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(o.dtype)
            with counting() as launches:
                o.backward(do)
    names, traffic = [launch.kernel for launch in launches], defaultdict(float)
    for launch in launches:
        for (direction, arg), b in launch.bytes.items():
            traffic[f"{launch.kernel}: {arg} {direction}"] += b
    return Counts(sum(x.total() for x in launches), sum(x.unique_bytes() for x in launches),
                  sum(x.flops for x in launches), {n: names.count(n) for n in dict.fromkeys(names)}, dict(traffic))


@dataclass(frozen=True)
class Model:
    case: str
    pass_name: str
    shape: Shape  # the production shape projected to
    counts: Counts  # projected
    per_chunk: Counts  # one chunk of one head: where the bytes go
    min_bytes: Optional[float]  # None: the op's passed states are not known (no entry in PASSED_STATES)
    strict_min_bytes: float

    @property
    def io_efficiency(self) -> Optional[float]:
        return None if self.min_bytes is None else self.min_bytes / self.counts.bytes


def minimum_bytes(case, shape: Shape, pass_name: str, small: Shape):
    """(minimum with passed states or None, strict minimum) for `shape`, from the input sizes at `small`."""
    inputs = _bf16(case.make_inputs(small, torch.Generator().manual_seed(0)))
    per_token_in = sum(x.nbytes for x in inputs.values() if x.is_floating_point()) / (small.B * small.T * small.H)
    per_token_out = shape.V * inputs["v"].element_size()  # o in v's dtype
    # the backward reads the inputs and do, writes a gradient of every floating input
    per_token = per_token_in + per_token_out if pass_name == "fwd" else 2 * per_token_in + per_token_out
    strict = per_token * shape.B * shape.T * shape.H
    states = PASSED_STATES.get(case.op, {}).get(pass_name)
    if states is None:
        return None, strict
    chunks = shape.B * -(-shape.T // shape.chunk)
    return strict + 2 * states * chunks * shape.H * shape.K * shape.V * inputs["k"].element_size(), strict


def model(case, pass_name: str, shape: Shape) -> Model:
    """Counts at 2 and 3 chunks (B = H = 1), extrapolated linearly in chunks to `shape`."""
    shape = replace(shape, chunk=case.chunk or shape.chunk)  # a case with its own chunk runs with it (run.py)
    small = replace(shape, B=1, H=1, T=2 * shape.chunk)
    two, three = count_pass(case, small, pass_name), count_pass(case, replace(small, T=3 * shape.chunk), pass_name)
    per_chunk = three.plus(two, -1)
    fixed = two.plus(per_chunk, -2)
    projected = fixed.plus(per_chunk, -(-shape.T // shape.chunk)).times(shape.B * shape.H)
    return Model(case.name, pass_name, shape, projected, per_chunk, *minimum_bytes(case, shape, pass_name, small))
