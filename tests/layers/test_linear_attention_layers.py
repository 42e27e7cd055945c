"""LinearAttention / GatedLinearAttention layers, their norms and short-conv module.

Every path (padding mask, packed cu_seqlens, prefill + decode; torch backend, and the Triton kernels under
the interpreter) is compared with the same layer in float64 running the token-by-token reference ops one
sample at a time.
"""


import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_rms
from layer_checks import assert_gradients_match, assert_states, left_padded, per_sample, with_backend

from ipl_layers.layers import GatedLinearAttention, GatedRMSNorm, LinearAttention, RMSNorm, ShortConvolution
from ipl_layers.ops import short_conv_reference

FP32_BOUND = 2e-5  # float32 torch path vs float64 reference
FP64_BOUND = 1e-10  # float64 torch path vs float64 reference (same math, different order)
BF16_BOUND = 3e-2  # bfloat16 parameters and activations vs float64 reference

HIDDEN = 32
LENGTHS = [70, 23, 1, 0]  # one sequence past a 64-chunk, a short one, a single token, an all-padding row


def make_layer(kind: str) -> torch.nn.Module:
    if kind == "linear":
        return LinearAttention(
            HIDDEN, num_heads=2, feature_map="elu", use_short_conv=True, use_output_gate=True, layer_idx=0
        )
    if kind == "linear_plain":
        return LinearAttention(HIDDEN, num_heads=4, layer_idx=0)
    return GatedLinearAttention(HIDDEN, num_heads=2, use_short_conv=True, gate_low_rank_dim=8, layer_idx=0)


@pytest.mark.parametrize("kind", ["linear", "linear_plain", "gla"])
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


@pytest.mark.parametrize("kind", ["linear", "gla"])
def test_bfloat16_layer_keeps_dtype_with_fp32_states(kind):
    layer = with_backend(make_layer(kind), "torch", torch.bfloat16)
    ref = with_backend(layer, "reference", torch.float64)
    x, mask = left_padded([30, 12], 30, torch.float32, HIDDEN)
    o, _, cache = layer(x.bfloat16(), attention_mask=mask, use_cache=True)
    assert o.dtype == torch.bfloat16
    assert cache[0]["recurrent_state"].dtype == torch.float32
    assert all(c.dtype == torch.float32 for c in cache[0]["conv_state"])
    assert_rel_rms("bf16 output", o, ref(x.double(), attention_mask=mask)[0], BF16_BOUND)


def test_all_ones_mask_equals_no_mask():
    layer = with_backend(make_layer("gla"), "torch", torch.float64)
    x = torch.randn(2, 9, HIDDEN, dtype=torch.float64)
    o, _, _ = layer(x)
    o_mask, _, _ = layer(x, attention_mask=torch.ones(2, 9, dtype=torch.bool))
    assert_rel_rms("all-ones mask", o_mask, o, FP64_BOUND)


@pytest.mark.parametrize("kind", ["linear", "linear_plain", "gla"])
@pytest.mark.parametrize("dtype,bound", [(torch.float32, FP32_BOUND), (torch.float64, FP64_BOUND)])
def test_prefill_then_decode_equals_full_forward(kind, dtype, bound):
    """Generation-style: a left-padded prompt with use_cache, then one token at a time with the mask
    covering past and current tokens, must reproduce one masked forward over the whole sequence."""
    layer = with_backend(make_layer(kind), "torch", dtype)
    prompt, steps = 11, 6
    lengths = [prompt, 4, 0]
    x, mask = left_padded([n + steps for n in lengths], prompt + steps, dtype, HIDDEN)
    ref = with_backend(layer, "reference", torch.float64)
    o_full, caches_ref = per_sample(ref, x, [n + steps for n in lengths])

    o, _, cache = layer(x[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True)
    outs = [o]
    for t in range(prompt, prompt + steps):
        o, _, cache = layer(x[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache, use_cache=True)
        outs.append(o)
    assert_rel_rms("prefill + decode", torch.cat(outs, 1), o_full, bound)
    assert_states("prefill + decode", cache, caches_ref, bound)
    assert cache.get_seq_length(0) == prompt + steps


@pytest.mark.parametrize("kind", ["linear", "gla"])
def test_gradients_reach_every_parameter_and_match_reference(kind):
    layer = with_backend(make_layer(kind), "torch", torch.float32)
    ref = with_backend(layer, "reference", torch.float64)
    assert_gradients_match(layer, ref, [20, 7], 20, HIDDEN, FP32_BOUND)


def test_bad_inputs_raise_clear_errors():
    layer = with_backend(make_layer("gla"), "torch", torch.float32)
    x = torch.randn(2, 5, HIDDEN)
    cu_one = torch.tensor([0, 5])
    cases = [
        (ValueError, "hidden_size = 32", lambda: layer(torch.randn(2, 5, HIDDEN + 1))),
        (ValueError, "3-D", lambda: layer(torch.randn(5, HIDDEN))),
        (ValueError, "B = 2 rows", lambda: layer(x, attention_mask=torch.ones(3, 5))),
        (ValueError, "T = 5 columns", lambda: layer(x, attention_mask=torch.ones(2, 6))),
        (ValueError, "2-D", lambda: layer(x, attention_mask=torch.ones(2, 5, 1))),
        (ValueError, "0s and 1s", lambda: layer(x, attention_mask=torch.full((2, 5), 2))),
        (ValueError, "B == 1", lambda: layer(x, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))),
        (ValueError, "not both", lambda: layer(x[:1], attention_mask=torch.ones(1, 5), cu_seqlens=cu_one)),
        (TypeError, "FastWeightCache", lambda: layer(x, past_key_values={})),
        (ValueError, "layer_idx", lambda: GatedLinearAttention(HIDDEN, num_heads=2)(x, use_cache=True)),
        (ValueError, "feature_map", lambda: LinearAttention(HIDDEN, feature_map="softmax")),
        (ValueError, "multiple of num_heads", lambda: LinearAttention(HIDDEN, num_heads=5)),
    ]
    for error, words, call in cases:
        with pytest.raises(error, match=words):
            call()
    _, _, cache = layer(x, use_cache=True)
    with pytest.raises(ValueError, match=">= T = 5"):
        layer(x, attention_mask=torch.ones(2, 4), past_key_values=cache)
    with pytest.raises(ValueError, match="holds 2 sequences, the input has 3"):
        layer(torch.randn(3, 1, HIDDEN), past_key_values=cache, use_cache=True)


def test_norms_match_formula_and_keep_dtype():
    x, gate = torch.randn(3, 4, 8, dtype=torch.float64), torch.randn(3, 4, 8, dtype=torch.float64)
    norm, gated = RMSNorm(8, eps=1e-6).double(), GatedRMSNorm(8, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        gated.weight.copy_(norm.weight)
    expected = x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * norm.weight
    assert_rel_rms("RMSNorm", norm(x), expected, FP64_BOUND)
    assert_rel_rms("GatedRMSNorm", gated(x, gate), expected * gate * torch.sigmoid(gate), FP64_BOUND)
    assert norm.float()(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="gate shape"):
        gated(x, gate[..., :4])


def test_short_convolution_module_matches_reference():
    conv = ShortConvolution(6, kernel_size=3, bias=True, backend="torch").double()
    assert conv.weight.shape == (6, 3)
    x, h0 = torch.randn(2, 5, 6, dtype=torch.float64), torch.randn(2, 6, 2, dtype=torch.float64)
    y, state = conv(x, cache=h0, output_final_state=True)
    y_ref, state_ref = short_conv_reference(
        x, conv.weight, conv.bias, activation="silu", initial_state=h0, output_final_state=True
    )
    assert_rel_rms("short conv y", y, y_ref, FP64_BOUND)
    assert_rel_rms("short conv state", state, state_ref, FP64_BOUND)


@pytest.mark.parametrize("kind", ["linear", "gla"])
def test_triton_backend_prefill_then_decode(kind):
    """The same generation-style run on the Triton kernels (interpreter on CPU, float32): packed varlen
    prefill kernels, then the single-token decode path."""
    layer = with_backend(make_layer(kind), "triton", torch.float32)
    prompt, steps = 9, 3
    x, mask = left_padded([prompt + steps, 5], prompt + steps, torch.float32, HIDDEN)
    o_full, caches_ref = per_sample(with_backend(layer, "reference", torch.float64), x, [prompt + steps, 5])
    o, _, cache = layer(x[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True)
    outs = [o]
    for t in range(prompt, prompt + steps):
        o, _, cache = layer(x[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache, use_cache=True)
        outs.append(o)
    assert_rel_rms("triton prefill + decode", torch.cat(outs, 1), o_full, FP32_BOUND)
    assert_states("triton prefill + decode", cache, caches_ref, FP32_BOUND)
