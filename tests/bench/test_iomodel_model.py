"""The per-chunk extrapolation of the IO model equals a direct count, and the minimum bounds the counts."""

import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))  # as the bench scripts see it
from iomodel.model import count_pass, model  # noqa: E402
from registry import Shape, select  # noqa: E402


@pytest.mark.parametrize("name", ["linear_attention:plain", "linear_attention:key_decay", "delta_rule:gated",
                                  "ttt_linear:mb16"])
@pytest.mark.parametrize("pass_name", ["fwd", "bwd"])
def test_extrapolated_counts_equal_a_direct_count(name, pass_name):
    (case,) = select([name])
    shape = Shape(B=2, T=64, H=2, K=16, V=16, chunk=16)  # 4 chunks per sequence, extrapolated from 2 and 3
    m = model(case, pass_name, shape)
    direct = count_pass(case, replace(shape, B=1, H=1), pass_name)
    assert m.counts.bytes == 4 * direct.bytes and m.counts.flops == 4 * direct.flops  # 4 = B * H
    assert m.counts.unique_bytes == 4 * direct.unique_bytes
    assert m.strict_min_bytes <= (m.min_bytes or m.strict_min_bytes) <= m.counts.unique_bytes <= m.counts.bytes
