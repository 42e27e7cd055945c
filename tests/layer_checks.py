"""Helpers shared by the layer tests: backend/dtype copies, left-padded batches, per-sample references."""

import copy

import torch
import torch.nn.functional as F
from helpers import assert_rel_rms


def with_backend(layer: torch.nn.Module, backend: str, dtype: torch.dtype) -> torch.nn.Module:
    out = copy.deepcopy(layer).to(dtype)
    for m in out.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    return out


def left_padded(lengths, T, dtype, hidden):
    """x [B, T, hidden] and its left-padding mask [B, T] for sequences of the given lengths."""
    x = torch.randn(len(lengths), T, hidden, dtype=dtype)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n :] = 1
    return x, mask


def per_sample(ref, x, lengths):
    """Each sample alone (no padding) through the reference layer: outputs and its cache states."""
    T = x.shape[1]
    outs, caches = [], []
    for b, n in enumerate(lengths):
        o, _, cache = ref(x[b : b + 1, T - n :].double(), use_cache=True)
        outs.append(F.pad(o, (0, 0, T - n, 0)))  # zeros at the padded positions
        caches.append(cache[0])
    return torch.cat(outs), caches


def assert_states(name, cache, refs, bound):
    """The cache of one batched/packed run holds, row by row, the states of the per-sample runs."""
    state = cache[0]
    got = state["recurrent_state"]
    if isinstance(got, tuple):  # a multi-tensor state: each field row by row; integer fields exactly
        for i, part in enumerate(got):
            ref_part = torch.cat([c["recurrent_state"][i] for c in refs])
            if part.is_floating_point():
                assert_rel_rms(f"{name} recurrent_state[{i}]", part, ref_part, bound)
            else:
                assert torch.equal(part, ref_part), f"{name} recurrent_state[{i}]: {part} != {ref_part}"
    else:
        assert_rel_rms(f"{name} recurrent_state", got, torch.cat([c["recurrent_state"] for c in refs]), bound)
    if "conv_state" in state:
        for i, qkv in enumerate("qkv"):
            ref_conv = torch.cat([c["conv_state"][i] for c in refs])
            assert_rel_rms(f"{name} conv_state {qkv}", state["conv_state"][i], ref_conv, bound)


def assert_gradients_match(layer, ref, lengths, T, hidden, bound):
    """Input and parameter gradients of `layer` on a left-padded fp32 batch against `ref` (the same layer in
    float64), for one random cotangent so that every output direction matters; every parameter must get a
    non-zero gradient."""
    x, mask = left_padded(lengths, T, torch.float32, hidden)
    x.requires_grad_(True)
    x_ref = x.detach().double().requires_grad_(True)
    w = torch.randn(len(lengths), T, hidden)
    (layer(x, attention_mask=mask)[0] * w).sum().backward()
    (ref(x_ref, attention_mask=mask)[0] * w.double()).sum().backward()
    assert_rel_rms("dx", x.grad, x_ref.grad, bound)
    for (name, p), p_ref in zip(layer.named_parameters(), ref.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient"
        assert_rel_rms(f"d{name}", p.grad, p_ref.grad, bound)


def assert_padding_mask_equals_varlen_equals_per_sample(layer, lengths, hidden, dtype, bound, state_type):
    """`layer` (torch path, `dtype`) on a left-padded batch and on the same sequences packed with cu_seqlens,
    against each sample alone through its float64 reference-backend copy: outputs and cache states."""
    T = max(lengths)
    x, mask = left_padded(lengths, T, dtype, hidden)
    o_ref, caches_ref = per_sample(with_backend(layer, "reference", torch.float64), x, lengths)
    o_mask, _, cache_mask = layer(x, attention_mask=mask, use_cache=True)
    assert_rel_rms("padding mask", o_mask, o_ref, bound)
    assert_states("padding mask", cache_mask, caches_ref, bound)
    assert isinstance(cache_mask[0]["recurrent_state"], state_type)
    packed = torch.cat([x[b, T - n :] for b, n in enumerate(lengths)])[None]
    cu_seqlens = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
    o_var, _, cache_var = layer(packed, cu_seqlens=cu_seqlens, use_cache=True)
    assert_rel_rms("cu_seqlens", o_var[0], o_ref[mask.bool()], bound)
    assert_states("cu_seqlens", cache_var, caches_ref, bound)


def assert_prefill_decode_survives_reload(layer, hidden, path, bound, prompt=6, steps=4):
    """A left-padded float64 prompt with use_cache, the cache saved and loaded back, then one token at a time:
    equals each sample's full forward through the reference backend (outputs and final states)."""
    from ipl_layers.cache import FastWeightCache

    lengths = [prompt + steps, 3 + steps]
    x, mask = left_padded(lengths, prompt + steps, torch.float64, hidden)
    o_full, caches_ref = per_sample(with_backend(layer, "reference", torch.float64), x, lengths)
    o, _, cache = layer(x[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True)
    cache.save(str(path))
    cache = FastWeightCache().load(str(path))
    outs = [o]
    for t in range(prompt, prompt + steps):
        o, _, cache = layer(x[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache, use_cache=True)
        outs.append(o)
    assert_rel_rms("prefill + decode", torch.cat(outs, 1), o_full, bound)
    assert_states("prefill + decode", cache, caches_ref, bound)
