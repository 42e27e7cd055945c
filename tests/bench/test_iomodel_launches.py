"""Launch counts of a layer: the Triton kernels of its op, forward and backward, and its torch glue."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))  # as the bench scripts see it
from iomodel.launches import build_layer, layer_launches  # noqa: E402


def test_linear_attention_layer_launches():
    layer = build_layer("LinearAttention", hidden_size=32, num_heads=2)
    counts = layer_launches(layer, torch.randn(1, 128, 32))  # two chunks: short inputs take the recurrent path
    assert counts["fwd"]["triton"] == {"linear_attn_chunk_state_fwd_kernel": 1, "linear_attn_chunk_fwd_kernel": 1}
    # the backward recomputes the chunk states, then runs the state-gradient scan and the two gradient kernels
    assert counts["bwd"]["triton"] == {"linear_attn_chunk_state_fwd_kernel": 1, "linear_attn_chunk_state_bwd_kernel": 1,
                                       "linear_attn_chunk_bwd_dv_kernel": 1, "linear_attn_chunk_bwd_dqk_kernel": 1}
    # q, k, v and o projections: four matmuls forward (no torch op is counted inside interpreted launches)
    assert counts["fwd"]["torch_ops"]["mm"] == 4
    assert not {"empty", "new_empty", "_unsafe_view", "view", "t"} & set(counts["fwd"]["torch_ops"])
