"""The MemoryAttention layer: the formula against a hand composition (dense banded softmax attention and the
op's reference on inputs shifted by a Python loop), its two limits (window past the sequence: causal attention;
window 0 with the gate open: the bare memory op), every path (padding mask, cu_seqlens, prefill + decode
through a saved cache) against the float64 reference backend one sample at a time, gradients, the cache size
while decoding far past the window, and input errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_rms
from layer_checks import (
    assert_gradients_match,
    assert_padding_mask_equals_varlen_equals_per_sample,
    assert_prefill_decode_survives_reload,
    with_backend,
)

from ipl_layers.layers import MemoryAttention
from ipl_layers.layers.delta_rule import mamba2_log_decay
from ipl_layers.ops import delta_rule_reference, linear_attention_reference

# float32 torch path vs the float64 reference: measured <= 6e-7 on outputs and states and <= 2e-6 on gradients;
# ~20x headroom. float64 agrees to rounding (measured <= 1e-15).
FP32_BOUND = 5e-5
FP64_BOUND = 1e-10

HIDDEN, HEADS, WINDOW = 16, 2, 3
LENGTHS = [11, 5, 1, 0]  # past the window, two tokens past it, a single token, all padding
MEMORIES = ("gated_deltanet", "delta_rule", "linear_attention")


def make_layer(memory="gated_deltanet", window=WINDOW, **kw) -> MemoryAttention:
    layer = MemoryAttention(HIDDEN, num_heads=HEADS, window_size=window, memory=memory, layer_idx=0, **kw)
    with torch.no_grad():
        layer.gate.normal_()  # gates away from their shared initial value, so a mixed-up head shows
    return layer


def hand_composition(layer, x):
    """The module docstring's formula written out in float64 for x [1, T, hidden]."""
    layer = layer.double()
    T, H, D, W = x.shape[1], HEADS, HIDDEN // HEADS, layer.window_size
    q, k, v = (p(x).view(1, T, H, D) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    band = (j <= i) & (j > i - W)  # keys t-W+1 .. t
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
    a = torch.einsum("bhts,bshd->bthd", scores.masked_fill(~band, -math.inf).softmax(-1).nan_to_num(), v)
    shift = lambda y: torch.stack([y[:, t - W] if t >= W else torch.zeros_like(y[:, 0]) for t in range(T)], 1)  # noqa: E731
    if layer.memory == "linear_attention":
        m, _ = linear_attention_reference(F.normalize(q, dim=-1), shift(F.normalize(k, dim=-1)), shift(v))
    else:
        beta = shift(torch.sigmoid(layer.b_proj(x)))
        g = shift(mamba2_log_decay(layer.a_proj(x), layer.A_log, layer.dt_bias)) \
            if layer.memory == "gated_deltanet" else None
        m, _ = delta_rule_reference(q, shift(k), shift(v), beta, g, use_qk_l2norm=True)
    return layer.o_proj((a + torch.sigmoid(layer.gate)[:, None] * m).flatten(-2))


@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("window", [1, WINDOW, 20])
def test_formula_matches_hand_composition(memory, window):
    layer = with_backend(make_layer(memory, window), "torch", torch.float64)
    x = torch.randn(1, 13, HIDDEN, dtype=torch.float64)
    assert_rel_rms("out", layer(x)[0], hand_composition(layer, x), FP64_BOUND)


def test_window_past_the_sequence_is_causal_attention():
    layer = with_backend(make_layer(window=40), "torch", torch.float64)
    x = torch.randn(2, 13, HIDDEN, dtype=torch.float64)
    q, k, v = (p(x).unflatten(-1, (HEADS, -1)).transpose(1, 2) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(-2)
    assert_rel_rms("out", layer(x)[0], layer.o_proj(a), FP64_BOUND)


@pytest.mark.parametrize("memory", MEMORIES)
def test_window_zero_with_the_gate_open_is_the_bare_memory_op(memory):
    layer = with_backend(make_layer(memory, window=0), "torch", torch.float64)
    with torch.no_grad():
        layer.gate.fill_(50.0)  # sigmoid(50) rounds to 1 in float64
    x = torch.randn(2, 13, HIDDEN, dtype=torch.float64)
    q, k, v = (p(x).unflatten(-1, (HEADS, -1)) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    if memory == "linear_attention":
        m, _ = linear_attention_reference(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v)
    else:
        g = mamba2_log_decay(layer.a_proj(x), layer.A_log, layer.dt_bias) if memory == "gated_deltanet" else None
        m, _ = delta_rule_reference(q, k, v, torch.sigmoid(layer.b_proj(x)), g, use_qk_l2norm=True)
    assert_rel_rms("out", layer(x)[0], layer.o_proj(m.flatten(-2)), FP64_BOUND)


@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("dtype,bound", [(torch.float32, FP32_BOUND), (torch.float64, FP64_BOUND)])
def test_padding_mask_equals_varlen_equals_per_sample(memory, dtype, bound):
    layer = with_backend(make_layer(memory), "torch", dtype)
    assert_padding_mask_equals_varlen_equals_per_sample(layer, LENGTHS, HIDDEN, dtype, bound, torch.Tensor)


@pytest.mark.parametrize("memory", MEMORIES)
def test_prefill_decode_equals_forward_through_a_saved_cache(memory, tmp_path):
    layer = with_backend(make_layer(memory), "torch", torch.float64)
    assert_prefill_decode_survives_reload(layer, HIDDEN, tmp_path / "cache.safetensors", FP64_BOUND)


@pytest.mark.parametrize("memory", MEMORIES)
def test_gradients_match_float64(memory):
    layer = with_backend(make_layer(memory), "torch", torch.float32)
    ref = with_backend(layer, "reference", torch.float64)
    assert_gradients_match(layer, ref, LENGTHS[:3], max(LENGTHS), HIDDEN, FP32_BOUND)


def test_cache_size_is_constant_while_decoding_ten_windows():
    layer = make_layer(window=4)
    x = torch.randn(2, 1, HIDDEN)
    _, _, cache = layer(torch.randn(2, 6, HIDDEN), use_cache=True)
    sizes = set()
    for _ in range(40):
        _, _, cache = layer(x, past_key_values=cache, use_cache=True)
        state = cache[0]
        tensors = [state["recurrent_state"], state["memory_queue"], *state["attn_state"]]
        sizes.add(sum(t.numel() for t in tensors))
    assert len(sizes) == 1, f"the cache grew while decoding: {sorted(sizes)} elements"


@pytest.mark.parametrize("kw, match", [
    ({"window_size": -1}, "window_size: expected an int >= 0, got -1"),
    ({"memory": "titans"}, r"memory: expected one of \('gated_deltanet', 'delta_rule', 'linear_attention'\)"),
    ({"dt_min": 0.2, "dt_max": 0.1}, "MemoryAttention: expected 0 < dt_min <= dt_max"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        MemoryAttention(HIDDEN, num_heads=HEADS, **kw)
