"""The TTTLinear layer.

Every path (padding mask, packed cu_seqlens, prefill + decode, gradients) is compared with the same layer in
float64 running the token-by-token reference op one sample at a time; the layer formula itself is checked
once against the op and norms composed by hand.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_rms
from layer_checks import assert_gradients_match, assert_states, left_padded, per_sample, with_backend

from ipl_layers.cache import FastWeightCache
from ipl_layers.layers import TTTLinear
from ipl_layers.ops import ttt_linear_reference
from ipl_layers.state import TTTLinearState

# float32 torch path vs the float64 reference: measured <= 2e-6 on outputs, states and gradients here.
FP32_BOUND = 2e-5
FP64_BOUND = 1e-10  # float64 torch path vs float64 reference (same math, different order)
BF16_BOUND = 3e-2  # bfloat16 parameters and activations vs float64 reference

HIDDEN = 32
LENGTHS = [21, 9, 1, 0]  # past one mini-batch of 8 and ending inside the next, short, a single token, all padding
KINDS = ["conv_gate", "plain"]


def make_layer(kind: str) -> torch.nn.Module:
    if kind == "conv_gate":
        layer = TTTLinear(HIDDEN, num_heads=2, mini_batch_size=8, use_short_conv=True, layer_idx=0)
    else:
        layer = TTTLinear(HIDDEN, num_heads=4, mini_batch_size=4, use_output_gate=False, layer_idx=0)
    with torch.no_grad():  # move the learnable parts off their initial values so that every one matters
        layer.token_scale_offset.uniform_(-0.1, 0.1)
        layer.ttt_norm_weight.uniform_(0.5, 1.5)
        layer.ttt_norm_bias.normal_(std=0.1)
        layer.b0.normal_(std=0.1)
        layer.lr_proj.bias.normal_()
    return layer


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
    assert isinstance(cache_mask[0]["recurrent_state"], TTTLinearState)

    packed = torch.cat([x[b, T - n :] for b, n in enumerate(LENGTHS)])[None]  # [1, total, HIDDEN]
    cu_seqlens = F.pad(torch.tensor(LENGTHS).cumsum(0), (1, 0)).to(torch.int32)
    o_var, _, cache_var = layer(packed, cu_seqlens=cu_seqlens, use_cache=True)
    assert_rel_rms("cu_seqlens", o_var[0], o_ref[mask.bool()], bound)
    assert_states("cu_seqlens", cache_var, caches_ref, bound)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,bound", [(torch.float32, FP32_BOUND), (torch.float64, FP64_BOUND)])
def test_prefill_then_decode_equals_full_forward(kind, dtype, bound):
    """A left-padded prompt with use_cache, then one token at a time (crossing mini-batch ends at different
    positions per row), must reproduce one masked forward over the whole sequence: no fractional updates."""
    layer = with_backend(make_layer(kind), "torch", dtype)
    prompt, steps = 11, 6
    lengths = [n + steps for n in (prompt, 5, 0)]
    x, mask = left_padded(lengths, prompt + steps, dtype, HIDDEN)
    o_full, caches_ref = per_sample(with_backend(layer, "reference", torch.float64), x, lengths)

    o, _, cache = layer(x[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True)
    outs = [o]
    for t in range(prompt, prompt + steps):
        o, _, cache = layer(x[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache, use_cache=True)
        outs.append(o)
    assert_rel_rms("prefill + decode", torch.cat(outs, 1), o_full, bound)
    assert_states("prefill + decode", cache, caches_ref, bound)


def test_cache_round_trip_through_safetensors(tmp_path):
    layer = with_backend(make_layer("plain"), "torch", torch.float64)
    x = torch.randn(2, 14, HIDDEN, dtype=torch.float64)
    o_full = layer(x)[0]
    _, _, cache = layer(x[:, :6], use_cache=True)
    cache.save(str(tmp_path / "ttt.safetensors"))
    loaded = FastWeightCache().load(str(tmp_path / "ttt.safetensors"))
    o_rest = layer(x[:, 6:], past_key_values=loaded, use_cache=True)[0]
    assert_rel_rms("after reload", o_rest, o_full[:, 6:], FP64_BOUND)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_parameter_and_match_reference(kind):
    layer = with_backend(make_layer(kind), "torch", torch.float32)
    ref = with_backend(layer, "reference", torch.float64)
    assert_gradients_match(layer, ref, [13, 6], 13, HIDDEN, FP32_BOUND)


def test_triton_backend_prefill_gradients_and_decode():
    """The Triton kernels (interpreter on CPU, float32; they need b in {16, 32, 64}): a left-padded prompt
    past one mini-batch of 16 as packed varlen with gradients, then single-token steps through the fused
    decode kernel, one row crossing a mini-batch end."""
    layer = TTTLinear(HIDDEN, num_heads=2, mini_batch_size=16, use_short_conv=True, layer_idx=0)
    with torch.no_grad():
        layer.b0.normal_(std=0.1)
        layer.token_scale_offset.uniform_(-0.1, 0.1)
    layer = with_backend(layer, "triton", torch.float32)
    ref = with_backend(layer, "reference", torch.float64)
    prompt, steps = 18, 3
    lengths = [prompt + steps, 17]
    x, mask = left_padded(lengths, prompt + steps, torch.float32, HIDDEN)
    o_full, caches_ref = per_sample(ref, x, lengths)

    assert_gradients_match(layer, ref, [prompt, prompt - 1], prompt, HIDDEN, FP32_BOUND)

    with torch.no_grad():
        o, _, cache = layer(x[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True)
        outs = [o]
        for t in range(prompt, prompt + steps):
            o, _, cache = layer(x[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache,
                                use_cache=True)
            outs.append(o)
    assert_rel_rms("triton prefill + decode", torch.cat(outs, 1), o_full, FP32_BOUND)
    assert_states("triton prefill + decode", cache, caches_ref, FP32_BOUND)


def test_bfloat16_layer_keeps_dtype_with_fp32_states():
    layer = with_backend(make_layer("conv_gate"), "torch", torch.bfloat16)
    ref = with_backend(layer, "reference", torch.float64)
    x, mask = left_padded([19, 12], 19, torch.float32, HIDDEN)
    o, _, cache = layer(x.bfloat16(), attention_mask=mask, use_cache=True)
    assert o.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in cache[0]["recurrent_state"][:4])
    assert_rel_rms("bf16 output", o, ref(x.double(), attention_mask=mask)[0], BF16_BOUND)


@pytest.mark.parametrize("gate", [False, True])
def test_layer_matches_formula(gate):
    """Projections, eta = base_lr / K * sigmoid(lr_proj x), s = max(1/i + offset, 0), the reference op from
    (W0, b0), LayerNorm over the hidden features, the tanh-GELU gate and o_proj, composed by hand."""
    H, b = 2, 4
    layer = TTTLinear(HIDDEN, num_heads=H, mini_batch_size=b, base_lr=0.5, use_output_gate=gate, backend="torch")
    layer = layer.double()
    with torch.no_grad():
        layer.token_scale_offset.uniform_(-0.5, 0.1)  # some s_i clamp at 0
        layer.post_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 9, HIDDEN, dtype=torch.float64)
    q, k, v = (p(x).unflatten(-1, (H, -1)) for p in (layer.q_proj, layer.k_proj, layer.v_proj))  # [B, T, H, K]
    K = q.shape[-1]
    eta = 0.5 / K * torch.sigmoid(layer.lr_proj(x))  # [B, T, H]
    s = (1 / torch.arange(1, b + 1, dtype=torch.float64) + layer.token_scale_offset).clamp(min=0)
    o, _ = ttt_linear_reference(q, k, v, eta, ln_weight=layer.ttt_norm_weight, ln_bias=layer.ttt_norm_bias,
                                token_scale=s, mini_batch_size=b,
                                initial_state=(layer.W0.expand(2, H, K, K), layer.b0.expand(2, H, K)))
    o = F.layer_norm(o.flatten(-2), (H * K,), layer.post_norm.weight, layer.post_norm.bias, layer.post_norm.eps)
    if gate:
        o = F.gelu(layer.g_proj(x), approximate="tanh") * o
    assert_rel_rms("layer formula", layer(x)[0], layer.o_proj(o), FP64_BOUND)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match=r"TTTLinear: mini_batch_size: expected a positive int, got 0"):
        TTTLinear(HIDDEN, num_heads=2, mini_batch_size=0)
    with pytest.raises(ValueError, match=r"TTTLinear: base_lr: expected > 0, got -1"):
        TTTLinear(HIDDEN, num_heads=2, base_lr=-1)
    with pytest.raises(ValueError, match=r"key_dim = hidden_size \* expand_k = 32 must be a positive multiple of"):
        TTTLinear(HIDDEN, num_heads=3)
    layer = make_layer("plain")
    _, _, cache = layer(torch.randn(2, 5, HIDDEN), use_cache=True)
    with pytest.raises(ValueError, match=r"past_key_values\[0\] holds 2 sequences, the input has 3"):
        layer(torch.randn(3, 1, HIDDEN), past_key_values=cache, use_cache=True)
