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
