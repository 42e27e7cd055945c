"""The TTTMLP layer: every path (padding mask, packed cu_seqlens, prefill + decode, gradients) against the
same layer in float64 running the token-by-token reference op one sample at a time, and the layer formula
once against the op composed by hand. The parts it shares with TTTLinear are tested there."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_rms
from layer_checks import assert_gradients_match, assert_states, left_padded, per_sample, with_backend

from ipl_layers.layers import TTTMLP
from ipl_layers.ops import ttt_mlp_reference
from ipl_layers.state import FastWeightCache, TTTMLPState

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
    T = max(LENGTHS)
    x, mask = left_padded(LENGTHS, T, dtype, HIDDEN)
    o_ref, caches_ref = per_sample(with_backend(layer, "reference", torch.float64), x, LENGTHS)
    o_mask, _, cache_mask = layer(x, attention_mask=mask, use_cache=True)
    assert_rel_rms("padding mask", o_mask, o_ref, bound)
    assert_states("padding mask", cache_mask, caches_ref, bound)
    assert isinstance(cache_mask[0]["recurrent_state"], TTTMLPState)
    packed = torch.cat([x[b, T - n :] for b, n in enumerate(LENGTHS)])[None]
    cu_seqlens = F.pad(torch.tensor(LENGTHS).cumsum(0), (1, 0)).to(torch.int32)
    o_var, _, cache_var = layer(packed, cu_seqlens=cu_seqlens, use_cache=True)
    assert_rel_rms("cu_seqlens", o_var[0], o_ref[mask.bool()], bound)
    assert_states("cu_seqlens", cache_var, caches_ref, bound)


def test_prefill_then_decode_equals_full_forward_and_survives_a_reload(tmp_path):
    layer = with_backend(make_layer(), "torch", torch.float64)
    prompt, steps = 6, 4
    lengths = [prompt + steps, 3 + steps]
    x, mask = left_padded(lengths, prompt + steps, torch.float64, HIDDEN)
    o_full, caches_ref = per_sample(with_backend(layer, "reference", torch.float64), x, lengths)
    o, _, cache = layer(x[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True)
    cache.save(str(tmp_path / "mlp.safetensors"))
    cache = FastWeightCache().load(str(tmp_path / "mlp.safetensors"))
    outs = [o]
    for t in range(prompt, prompt + steps):
        o, _, cache = layer(x[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache, use_cache=True)
        outs.append(o)
    assert_rel_rms("prefill + decode", torch.cat(outs, 1), o_full, FP64_BOUND)
    assert_states("prefill + decode", cache, caches_ref, FP64_BOUND)


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
