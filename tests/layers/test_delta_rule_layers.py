"""DeltaNet / GatedDeltaNet layers.

Every path (padding mask, packed cu_seqlens, prefill + decode, gradients) is compared with the same layer in
float64 running the token-by-token reference op one sample at a time; the layer formula itself is checked
once against the op and norms composed by hand.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_rms
from layer_checks import assert_gradients_match, assert_states, left_padded, per_sample, with_backend

from ipl_layers.cache import FastWeightCache
from ipl_layers.layers import DeltaNet, GatedDeltaNet
from ipl_layers.ops import delta_rule_reference

FP32_BOUND = 2e-5  # float32 torch and Triton paths vs float64 reference
FP64_BOUND = 1e-10  # float64 torch path vs float64 reference (same math, different order)
BF16_BOUND = 3e-2  # bfloat16 parameters and activations vs float64 reference

HIDDEN = 32
LENGTHS = [70, 23, 1, 0]  # one sequence past a 64-chunk, a short one, a single token, an all-padding row
KINDS = ["delta", "delta_plain", "gated_delta"]


def make_layer(kind: str) -> torch.nn.Module:
    if kind == "delta":
        return DeltaNet(HIDDEN, num_heads=2, use_output_gate=True, layer_idx=0)
    if kind == "delta_plain":
        return DeltaNet(HIDDEN, num_heads=4, use_short_conv=False, layer_idx=0)
    return GatedDeltaNet(HIDDEN, num_heads=2, layer_idx=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,bound", [(torch.float32, FP32_BOUND), (torch.float64, FP64_BOUND)])
def test_padding_mask_equals_varlen_equals_per_sample(kind, dtype, bound):
    layer = with_backend(make_layer(kind), "torch", dtype)
    ref = with_backend(layer, "reference", torch.float64)
    T = max(LENGTHS)
    x, mask = left_padded(LENGTHS, T, dtype, HIDDEN)
    o_ref, caches_ref = per_sample(ref, x, LENGTHS)

    o_mask, _, cache_mask = layer(x, attention_mask=mask, use_cache=True)
    assert_rel_rms("padding mask", o_mask, o_ref, bound)
    assert (o_mask[mask == 0] == 0).all(), "padded positions must get output 0"
    assert_states("padding mask", cache_mask, caches_ref, bound)
    assert cache_mask.get_seq_length() == T

    packed = torch.cat([x[b, T - n :] for b, n in enumerate(LENGTHS)])[None]  # [1, total, HIDDEN]
    cu_seqlens = F.pad(torch.tensor(LENGTHS).cumsum(0), (1, 0)).to(torch.int32)
    o_var, _, cache_var = layer(packed, cu_seqlens=cu_seqlens, use_cache=True)
    assert_rel_rms("cu_seqlens", o_var[0], o_ref[mask.bool()], bound)
    assert_states("cu_seqlens", cache_var, caches_ref, bound)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,bound", [(torch.float32, FP32_BOUND), (torch.float64, FP64_BOUND)])
def test_prefill_then_decode_equals_full_forward(kind, dtype, bound):
    """Generation-style: a left-padded prompt with use_cache, then one token at a time with the mask
    covering past and current tokens, must reproduce one masked forward over the whole sequence."""
    layer = with_backend(make_layer(kind), "torch", dtype)
    prompt, steps = 11, 5
    lengths = [n + steps for n in (prompt, 4, 0)]
    x, mask = left_padded(lengths, prompt + steps, dtype, HIDDEN)
    o_full, caches_ref = per_sample(with_backend(layer, "reference", torch.float64), x, lengths)

    o, _, cache = layer(x[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True)
    outs = [o]
    for t in range(prompt, prompt + steps):
        o, _, cache = layer(x[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache, use_cache=True)
        outs.append(o)
    assert_rel_rms("prefill + decode", torch.cat(outs, 1), o_full, bound)
    assert_states("prefill + decode", cache, caches_ref, bound)
    assert cache.get_seq_length(0) == prompt + steps


@pytest.mark.parametrize("kind", ["delta", "gated_delta"])
def test_triton_backend_prefill_then_decode(kind):
    """The generation-style run on the Triton kernels (interpreter on CPU, float32): a left-padded prompt
    longer than a 64-token chunk goes through the chunked kernels (packed varlen), then single-token
    decode steps through the fused recurrent ones."""
    layer = with_backend(make_layer(kind), "triton", torch.float32)
    prompt, steps = 66, 3
    lengths = [prompt + steps, 5]
    x, mask = left_padded(lengths, prompt + steps, torch.float32, HIDDEN)
    o_full, caches_ref = per_sample(with_backend(layer, "reference", torch.float64), x, lengths)
    o, _, cache = layer(x[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True)
    outs = [o]
    for t in range(prompt, prompt + steps):
        o, _, cache = layer(x[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache, use_cache=True)
        outs.append(o)
    assert_rel_rms("triton prefill + decode", torch.cat(outs, 1), o_full, FP32_BOUND)
    assert_states("triton prefill + decode", cache, caches_ref, FP32_BOUND)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_parameter_and_match_reference(kind):
    layer = with_backend(make_layer(kind), "torch", torch.float32)
    ref = with_backend(layer, "reference", torch.float64)
    assert_gradients_match(layer, ref, [20, 7], 20, HIDDEN, FP32_BOUND)


@pytest.mark.parametrize("kind", ["delta", "gated_delta"])
def test_bfloat16_layer_keeps_dtype_with_fp32_states(kind):
    layer = with_backend(make_layer(kind), "torch", torch.bfloat16)
    ref = with_backend(layer, "reference", torch.float64)
    x, mask = left_padded([30, 12], 30, torch.float32, HIDDEN)
    o, _, cache = layer(x.bfloat16(), attention_mask=mask, use_cache=True)
    assert o.dtype == torch.bfloat16
    assert cache[0]["recurrent_state"].dtype == torch.float32
    assert all(c.dtype == torch.float32 for c in cache[0]["conv_state"])
    assert_rel_rms("bf16 output", o, ref(x.double(), attention_mask=mask)[0], BF16_BOUND)


@pytest.mark.parametrize("gated", [False, True])
def test_layer_matches_formula(gated):
    """Without short convs: silu on q/k/v, beta = sigmoid(b_proj x), the Mamba2 gate for GatedDeltaNet,
    the reference op with L2-normalised q/k, the (gated) per-head RMSNorm and o_proj, composed by hand."""
    H = 2
    cls = GatedDeltaNet if gated else DeltaNet
    layer = cls(HIDDEN, num_heads=H, use_short_conv=False, use_output_gate=gated, backend="torch").double()
    with torch.no_grad():
        layer.o_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 9, HIDDEN, dtype=torch.float64)

    def heads(t):
        return F.silu(t).unflatten(-1, (H, -1))  # [B, T, H, D]

    q, k, v = heads(layer.q_proj(x)), heads(layer.k_proj(x)), heads(layer.v_proj(x))
    beta = torch.sigmoid(layer.b_proj(x))  # [B, T, H]
    g = -layer.A_log.exp() * F.softplus(layer.a_proj(x) + layer.dt_bias) if gated else None  # [B, T, H]
    o, _ = delta_rule_reference(q, k, v, beta, g, use_qk_l2norm=True)  # [B, T, H, V]
    o = o / (o.pow(2).mean(-1, keepdim=True) + layer.o_norm.eps).sqrt() * layer.o_norm.weight
    if gated:
        o = o * F.silu(layer.g_proj(x).unflatten(-1, (H, -1)))
    expected = layer.o_proj(o.flatten(-2))  # [B, T, HIDDEN]
    assert_rel_rms("layer formula", layer(x)[0], expected, FP64_BOUND)


def test_gated_deltanet_mamba2_initialisation_and_defaults():
    layer = GatedDeltaNet(hidden_size=64, num_heads=4, dt_min=1e-3, dt_max=1e-1)
    A = layer.A_log.detach().exp()
    assert ((A >= 1) & (A <= 16)).all(), f"A = exp(A_log) outside [1, 16]: {A}"
    dt = F.softplus(layer.dt_bias.detach().double())
    assert ((dt >= 1e-3 * (1 - 1e-6)) & (dt <= 1e-1 * (1 + 1e-6))).all(), f"softplus(dt_bias) outside range: {dt}"
    assert layer.A_log._no_weight_decay and layer.dt_bias._no_weight_decay
    assert (layer.head_k_dim, layer.head_v_dim) == (16, 32) and layer.use_output_gate and layer.use_short_conv
    g = layer.bfloat16()._log_decay(torch.randn(1, 3, 64).bfloat16())
    assert g.dtype == torch.float32 and g.shape == (1, 3, 4) and (g <= 0).all()
    default = DeltaNet()
    assert (default.num_heads, default.head_k_dim, default.use_output_gate) == (8, 128, False)


def test_bad_inputs_raise_clear_errors():
    layer = with_backend(make_layer("gated_delta"), "torch", torch.float32)
    x = torch.randn(2, 5, HIDDEN)
    cases = [
        (ValueError, "hidden_size = 32", lambda: layer(torch.randn(2, 5, HIDDEN + 1))),
        (ValueError, "3-D", lambda: layer(torch.randn(5, HIDDEN))),
        (ValueError, "B = 2 rows", lambda: layer(x, attention_mask=torch.ones(3, 5))),
        (ValueError, "0s and 1s", lambda: layer(x, attention_mask=torch.full((2, 5), 2))),
        (ValueError, "B == 1", lambda: layer(x, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))),
        (TypeError, "FastWeightCache", lambda: layer(x, past_key_values={})),
        (ValueError, "layer_idx", lambda: DeltaNet(HIDDEN, num_heads=2)(x, use_cache=True)),
        (ValueError, "multiple of num_heads", lambda: DeltaNet(HIDDEN, num_heads=5)),
        (ValueError, "value_dim", lambda: GatedDeltaNet(HIDDEN, num_heads=2, expand_v=0.03)),
        (ValueError, "dt_min <= dt_max", lambda: GatedDeltaNet(HIDDEN, num_heads=2, dt_min=0.1, dt_max=0.01)),
    ]
    for error, words, call in cases:
        with pytest.raises(error, match=words):
            call()
    _, _, cache = layer(x, use_cache=True)
    assert isinstance(cache, FastWeightCache)
    with pytest.raises(ValueError, match="holds 2 sequences, the input has 3"):
        layer(torch.randn(3, 1, HIDDEN), past_key_values=cache, use_cache=True)
    assert math.isfinite(layer(x, past_key_values=cache)[0].sum().item())
