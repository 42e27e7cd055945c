"""The LaCT layer: every path (padding mask, packed cu_seqlens, prefill + decode with both caches, gradients)
against the same layer in float64 running the reference op one sample at a time, and the layer formula once
against the op and a dense banded softmax attention composed by hand."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_rms
from layer_checks import assert_gradients_match, assert_states, left_padded, per_sample, with_backend

from ipl_layers.cache import FastWeightCache
from ipl_layers.layers import LaCT
from ipl_layers.ops import lact_reference
from ipl_layers.state import LaCTState

# float32 torch path vs the float64 reference: measured <= 4.1e-6 on outputs and states (Muon on) and <= 1.2e-6
# on gradients without Muon; gradients through Muon measured <= 2.0e-4 (dlr_proj.bias: the Newton-Schulz
# quintic amplifies the rounding of small singular values, see tests/ops/test_lact.py). ~10x headroom each.
FP32_BOUND = 5e-5
FP32_MUON_BOUND = 2e-3
FP64_BOUND = 1e-10

HIDDEN = 16
CHUNK, WINDOW = 4, 3
LENGTHS = [11, 5, 1, 0]  # two chunks of 4 and an open third, one open chunk, a single token, all padding


def make_layer(**kw) -> LaCT:
    kw = {"num_heads": 2, "num_lact_heads": 2, "chunk_size": CHUNK, "window_size": WINDOW, "expand": 2,
          "use_muon": True, "layer_idx": 0, **kw}
    layer = LaCT(HIDDEN, **kw)
    with torch.no_grad():  # learning rates well away from softplus's floor, so the updates matter
        layer.lr_proj.bias.uniform_(6.0, 7.0)
        layer.qk_offset.normal_(std=0.1)
    return layer


def assert_attn_states(name, cache, refs, bound):
    """The sliding-window caches (keys, values, count) of one batched run against the per-sample runs'."""
    got = cache[0]["attn_state"]
    for i, part in enumerate(got):
        ref = torch.cat([c["attn_state"][i] for c in refs])
        if part.is_floating_point():
            assert_rel_rms(f"{name} attn_state[{i}]", part, ref, bound)
        else:
            assert torch.equal(part, ref), f"{name} attn_state[{i}]: {part.tolist()} != {ref.tolist()}"


@pytest.mark.parametrize("dtype,bound", [(torch.float32, FP32_BOUND), (torch.float64, FP64_BOUND)])
def test_padding_mask_equals_varlen_equals_per_sample(dtype, bound):
    layer = with_backend(make_layer(), "torch", dtype)
    T = max(LENGTHS)
    x, mask = left_padded(LENGTHS, T, dtype, HIDDEN)
    o_ref, caches_ref = per_sample(with_backend(layer, "reference", torch.float64), x, LENGTHS)
    o_mask, _, cache_mask = layer(x, attention_mask=mask, use_cache=True)
    assert_rel_rms("padding mask", o_mask, o_ref, bound)
    assert_states("padding mask", cache_mask, caches_ref, bound)
    assert_attn_states("padding mask", cache_mask, caches_ref, bound)
    assert isinstance(cache_mask[0]["recurrent_state"], LaCTState)
    packed = torch.cat([x[b, T - n :] for b, n in enumerate(LENGTHS)])[None]
    cu_seqlens = F.pad(torch.tensor(LENGTHS).cumsum(0), (1, 0)).to(torch.int32)
    o_var, _, cache_var = layer(packed, cu_seqlens=cu_seqlens, use_cache=True)
    assert_rel_rms("cu_seqlens", o_var[0], o_ref[mask.bool()], bound)
    assert_states("cu_seqlens", cache_var, caches_ref, bound)
    assert_attn_states("cu_seqlens", cache_var, caches_ref, bound)


@pytest.mark.parametrize("use_momentum", [True, False])
def test_prefill_then_decode_equals_full_forward_and_survives_a_reload(tmp_path, use_momentum):
    layer = with_backend(make_layer(use_momentum=use_momentum), "torch", torch.float64)
    prompt, steps = 6, 5  # decoding crosses a chunk boundary (an update inside a decode step) for both rows
    lengths = [prompt + steps, 3 + steps]
    x, mask = left_padded(lengths, prompt + steps, torch.float64, HIDDEN)
    o_full, caches_ref = per_sample(with_backend(layer, "reference", torch.float64), x, lengths)
    o, _, cache = layer(x[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True)
    cache.save(str(tmp_path / "lact.safetensors"))
    cache = FastWeightCache().load(str(tmp_path / "lact.safetensors"))
    outs = [o]
    for t in range(prompt, prompt + steps):
        o, _, cache = layer(x[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache, use_cache=True)
        outs.append(o)
    assert_rel_rms("prefill + decode", torch.cat(outs, 1), o_full, FP64_BOUND)
    assert_states("prefill + decode", cache, caches_ref, FP64_BOUND)
    assert_attn_states("prefill + decode", cache, caches_ref, FP64_BOUND)


def test_packed_prefill_then_packed_continuation_equals_one_call():
    # cu_seqlens with a cache: a second packed call continues every sequence (window and open chunk alike)
    layer = with_backend(make_layer(), "torch", torch.float64)
    first, second = [5, 0, 2], [3, 6, 1]
    seqs = [torch.randn(a + b, HIDDEN, dtype=torch.float64) for a, b in zip(first, second)]
    cu = lambda lengths: F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)  # noqa: E731
    full, _, _ = layer(torch.cat(seqs)[None], cu_seqlens=cu([a + b for a, b in zip(first, second)]))
    o1, _, cache = layer(torch.cat([s[:a] for s, a in zip(seqs, first)])[None], cu_seqlens=cu(first), use_cache=True)
    o2, _, _ = layer(torch.cat([s[a:] for s, a in zip(seqs, first)])[None], cu_seqlens=cu(second),
                     past_key_values=cache, use_cache=True)
    parts, s1, s2 = [], 0, 0
    for a, b in zip(first, second):
        parts += [o1[0, s1 : s1 + a], o2[0, s2 : s2 + b]]
        s1, s2 = s1 + a, s2 + b
    assert_rel_rms("two packed calls", torch.cat(parts), full[0], FP64_BOUND)


@pytest.mark.parametrize("use_muon,bound", [(False, FP32_BOUND), (True, FP32_MUON_BOUND)])
def test_gradients_reach_every_parameter_and_match_reference(use_muon, bound):
    layer = with_backend(make_layer(use_muon=use_muon), "torch", torch.float32)
    assert_gradients_match(layer, with_backend(layer, "reference", torch.float64), [9, 4], 9, HIDDEN, bound)


def test_layer_matches_formula():
    layer = make_layer(num_lact_heads=4).double()
    B, T = 2, 9
    x = torch.randn(B, T, HIDDEN, dtype=torch.float64)
    q, k, v = layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)
    heads = lambda y, H: y.unflatten(-1, (H, HIDDEN // H)).transpose(1, 2)  # noqa: E731
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    band = (j <= i) & (j > i - WINDOW)  # dense causal band of WINDOW keys, itself included
    scores = heads(q, 2) @ heads(k, 2).mT / math.sqrt(HIDDEN // 2)
    a = (scores.masked_fill(~band, float("-inf")).softmax(-1) @ heads(v, 2)).transpose(1, 2).flatten(-2)

    def fast(y, n):
        y = F.silu(y * layer.qk_scale[n] + layer.qk_offset[n]).unflatten(-1, (4, 4))
        return y / (y.norm(dim=-1, keepdim=True) + 1e-5)

    lr = F.softplus(layer.lr_proj(x) + math.log(math.expm1(1e-3))).unflatten(-1, (4, 3))
    weights = tuple(w.expand(B, *w.shape) for w in (layer.W0, layer.W1, layer.W2))
    f, _ = lact_reference(fast(q, 0), fast(k, 1), F.silu(v).unflatten(-1, (4, 4)), lr, chunk_size=CHUNK,
                          initial_state=weights, momentum=torch.sigmoid(layer.momentum_proj(x)), use_muon=True)
    f = f / (f.pow(2).mean(-1, keepdim=True) + layer.ttt_norm.eps).sqrt() * layer.ttt_norm.weight
    assert_rel_rms("layer formula", layer(x)[0], layer.o_proj(a + f.flatten(-2)), FP64_BOUND)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match=r"LaCT: chunk_size: expected a positive int, got 0"):
        LaCT(HIDDEN, num_heads=2, chunk_size=0)
    with pytest.raises(ValueError, match=r"LaCT: hidden_size = 16 must be a multiple of num_lact_heads = 3"):
        LaCT(HIDDEN, num_heads=2, num_lact_heads=3)
    with pytest.raises(ValueError, match=r"LaCT: pass either attention_mask or cu_seqlens, not both"):
        LaCT(HIDDEN, num_heads=2)(torch.randn(1, 3, HIDDEN), attention_mask=torch.ones(1, 3),
                                  cu_seqlens=torch.tensor([0, 3]))
