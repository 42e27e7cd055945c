"""The TTTMLP layer: every path (padding mask, packed cu_seqlens, prefill + decode, gradients) against the
same layer in float64 running the token-by-token reference op one sample at a time, and the layer formula
once against the op composed by hand. The parts it shares with TTTLinear are tested there."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_rms
from layer_checks import (assert_gradients_match, assert_padding_mask_equals_varlen_equals_per_sample,
                          assert_prefill_decode_survives_reload, with_backend)

from ipl_layers.layers import TTTMLP
from ipl_layers.ops import ttt_mlp_reference
from ipl_layers.state import TTTMLPState

# float32 torch path vs the float64 reference: measured <= 1.2e-6 on outputs, states and gradients here
# (dlr_proj.bias the worst); the bound leaves ~40x headroom.
FP32_BOUND = 5e-5
FP64_BOUND = 1e-10

HIDDEN = 16
LENGTHS = [11, 5, 1, 0]  # past one mini-batch of 4 and inside the next, short, a single token, all padding


def make_layer() -> TTTMLP:
    layer = TTTMLP(HIDDEN, num_heads=2, mini_batch_size=4, expand=2, use_short_conv=True, layer_idx=0)
    with torch.no_grad():  # unit-scale activations (0.02 init makes the inner LN ill-conditioned in fp32)
        layer.W1.normal_(std=layer.head_k_dim**-0.5)
        layer.W2.normal_(std=(2 * layer.head_k_dim) ** -0.5)
        for p in (layer.b1, layer.b2, layer.ttt_norm_bias, layer.lr_proj.bias):
            p.normal_(std=0.1)
        layer.token_scale_offset.uniform_(-0.1, 0.1)
    return layer


@pytest.mark.parametrize("dtype,bound", [(torch.float32, FP32_BOUND), (torch.float64, FP64_BOUND)])
def test_padding_mask_equals_varlen_equals_per_sample(dtype, bound):
    layer = with_backend(make_layer(), "torch", dtype)
    assert_padding_mask_equals_varlen_equals_per_sample(layer, LENGTHS, HIDDEN, dtype, bound, TTTMLPState)


def test_prefill_then_decode_equals_full_forward_and_survives_a_reload(tmp_path):
    layer = with_backend(make_layer(), "torch", torch.float64)
    assert_prefill_decode_survives_reload(layer, HIDDEN, tmp_path / "state.safetensors", FP64_BOUND)


def test_gradients_reach_every_parameter_and_match_reference():
    layer = with_backend(make_layer(), "torch", torch.float32)
    assert_gradients_match(layer, with_backend(layer, "reference", torch.float64), [9, 4], 9, HIDDEN, FP32_BOUND)


def test_layer_matches_formula():
    layer = make_layer().double()
    x = torch.randn(2, 7, HIDDEN, dtype=torch.float64)
    H, K = layer.num_heads, layer.head_k_dim
    conv = [layer.q_conv1d, layer.k_conv1d, layer.v_conv1d]
    q, k, v = (c(p(x))[0].unflatten(-1, (H, K)) for c, p in zip(conv, (layer.q_proj, layer.k_proj, layer.v_proj)))
    eta = 1.0 / K * torch.sigmoid(layer.lr_proj(x))
    weights = tuple(w.expand(2, *w.shape) for w in (layer.W1, layer.b1, layer.W2, layer.b2))
    o, _ = ttt_mlp_reference(q, k, v, eta, ln_weight=layer.ttt_norm_weight, ln_bias=layer.ttt_norm_bias,
                             token_scale=layer.token_scale(), mini_batch_size=4, expand=2, initial_state=weights)
    o = F.gelu(layer.g_proj(x), approximate="tanh") * layer.post_norm(o.flatten(-2))
    assert_rel_rms("layer formula", layer(x)[0], layer.o_proj(o), FP64_BOUND)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match=r"TTTMLP: expand: expected a positive int, got 0"):
        TTTMLP(HIDDEN, num_heads=2, expand=0)
    with pytest.raises(ValueError, match=r"TTTMLP: mini_batch_size: expected a positive int, got 0"):
        TTTMLP(HIDDEN, num_heads=2, mini_batch_size=0)
