"""The TitansMemory layer: every path (padding mask, packed cu_seqlens, prefill + decode, gradients) against
the same layer in float64 running the token-by-token reference op one sample at a time, and the layer
formula once against the op composed by hand."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_rms
from layer_checks import (assert_gradients_match, assert_padding_mask_equals_varlen_equals_per_sample,
                          assert_prefill_decode_survives_reload, with_backend)

from ipl_layers.layers import TitansMemory
from ipl_layers.ops import titans_memory_reference
from ipl_layers.state import TitansState

# float32 torch path vs the float64 reference: measured below 5e-6 on outputs, states and gradients here; the
# bound leaves > 10x headroom.
FP32_BOUND = 5e-5
FP64_BOUND = 1e-10

HIDDEN = 16
LENGTHS = [11, 5, 1, 0]  # past one chunk of 4 and inside the next, short, a single token, all padding


def make_layer(use_ln=False, use_output_gate=False) -> TitansMemory:
    layer = TitansMemory(HIDDEN, num_heads=2, depth=2, expand=2, chunk_size=4, base_lr=0.5, use_ln=use_ln,
                         use_output_gate=use_output_gate, layer_idx=0)
    with torch.no_grad():  # gates away from their starting values so every one of them matters
        layer.gate_proj.bias.normal_(std=0.5)
        if use_ln:
            layer.memory_norm_bias.normal_(std=0.1)
    return layer


@pytest.mark.parametrize("use_ln", [False, True])
@pytest.mark.parametrize("dtype,bound", [(torch.float32, FP32_BOUND), (torch.float64, FP64_BOUND)])
def test_padding_mask_equals_varlen_equals_per_sample(dtype, bound, use_ln):
    layer = with_backend(make_layer(use_ln), "torch", dtype)
    assert_padding_mask_equals_varlen_equals_per_sample(layer, LENGTHS, HIDDEN, dtype, bound, TitansState)


def test_prefill_then_decode_equals_full_forward_and_survives_a_reload(tmp_path):
    layer = with_backend(make_layer(), "torch", torch.float64)
    assert_prefill_decode_survives_reload(layer, HIDDEN, tmp_path / "state.safetensors", FP64_BOUND)


@pytest.mark.parametrize("use_ln", [False, True])
def test_gradients_reach_every_parameter_and_match_reference(use_ln):
    layer = with_backend(make_layer(use_ln), "torch", torch.float32)
    assert_gradients_match(layer, with_backend(layer, "reference", torch.float64), [9, 4], 9, HIDDEN, FP32_BOUND)


def test_layer_matches_formula():
    layer = make_layer(use_output_gate=True).double()
    x = torch.randn(2, 7, HIDDEN, dtype=torch.float64)
    H, K = layer.num_heads, layer.head_k_dim
    conv = [layer.q_conv1d, layer.k_conv1d, layer.v_conv1d]
    q, k, v = (c(p(x))[0].unflatten(-1, (H, K)) for c, p in zip(conv, (layer.q_proj, layer.k_proj, layer.v_proj)))
    theta, eta, alpha = torch.sigmoid(layer.gate_proj(x)).unflatten(-1, (3, H)).unbind(2)
    weights = tuple(w.expand(2, *w.shape) for w in layer.memory_weights)
    o, _ = titans_memory_reference(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, 0.5 / 4 * theta * (1 - eta),
                                   eta, alpha, chunk_size=4, initial_state=weights, use_residual=True,
                                   normalize_step=True)
    gate = layer.g_proj(x).unflatten(-1, (H, K))
    o = F.rms_norm(o, (K,), layer.o_norm.weight, eps=1e-5) * F.silu(gate)
    assert_rel_rms("layer formula", layer(x)[0], layer.o_proj(o.flatten(-2)), FP64_BOUND)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match=r"TitansMemory: depth: expected a positive int, got 0"):
        TitansMemory(HIDDEN, num_heads=2, depth=0)
    with pytest.raises(ValueError, match=r"TitansMemory: chunk_size: expected a positive int, got 0"):
        TitansMemory(HIDDEN, num_heads=2, chunk_size=0)
    with pytest.raises(ValueError, match=r"TitansMemory: base_lr: expected > 0, got 0"):
        TitansMemory(HIDDEN, num_heads=2, base_lr=0)


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_memory_stays_finite_on_a_repeated_key(chunk_size):
    """One key over and over (plus noise) at the default step: every gradient of a chunk, all taken at its start
    weights, pushes the memory the same way (measured: NaN with per-token steps not divided by the chunk size)."""
    torch.manual_seed(0)
    layer = TitansMemory(128, num_heads=4, chunk_size=chunk_size, layer_idx=0)
    with torch.no_grad():
        layer.gate_proj.weight.zero_()  # the gates at their starting values on every token
    x = torch.randn(1, 1, 128) * 3 + 0.1 * torch.randn(2, 512, 128)
    _, _, cache = layer(x, use_cache=True)
    assert all(torch.isfinite(w).all() for w in cache[0]["recurrent_state"])
