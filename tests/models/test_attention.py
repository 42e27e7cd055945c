"""IPLAttention and `causal_attention` against a float64 reference written from the definition: causal softmax
attention with RoPE at each sequence's own positions, query head h reading key head h // (Hq / Hkv), and with a
window each query seeing itself and the window - 1 tokens before it."""

import pytest
import torch
from flash_stub import FlashStub

from ipl_layers.cache import FastWeightCache
from ipl_layers.models.attention import IPLAttention, apply_rope, causal_attention

TOL = 1e-5  # relative RMS error of fp32 outputs against the float64 reference


def rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def reference(q, k, v, window):
    """q [T, Hq, D], k, v [T, Hkv, D] of one sequence, float64: o [T, Hq, D] token by token."""
    T, Hq, D = q.shape
    group = Hq // k.shape[1]
    o = torch.zeros(T, Hq, D, dtype=torch.float64)
    for t in range(T):
        lo = 0 if window is None else max(0, t - window + 1)
        for h in range(Hq):
            scores = k[lo : t + 1, h // group].double() @ q[t, h].double() / D**0.5  # [t + 1 - lo]
            o[t, h] = torch.softmax(scores, 0) @ v[lo : t + 1, h // group].double()
    return o


def right_padded(x, starts, counts):
    """[N, T, *] -> [N, T, *] whose row n holds x[n, starts[n] : starts[n] + counts[n]] first, zeros after."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        out[n, : counts[n]] = x[n, starts[n] : starts[n] + counts[n]]
    return out


@pytest.mark.parametrize("window", [None, 1, 4])
@pytest.mark.parametrize("split", [0, 3, 9])
def test_causal_attention_matches_reference(window, split):
    """Two calls (the first `split` tokens, then the rest, through the returned state) equal one reference pass,
    with sequences of different lengths (right padding) and GQA."""
    N, T, Hq, Hkv, D = 3, 9, 4, 2, 8
    q, k, v = torch.randn(N, T, Hq, D), torch.randn(N, T, Hkv, D), torch.randn(N, T, Hkv, D)
    lengths = torch.tensor([9, 5, 0])
    first = torch.clamp(lengths, max=split)
    rest = lengths - first
    o1, state = causal_attention(q, k, v, first, window, output_final_state=True)
    shifted = [right_padded(x, first, rest) for x in (q, k, v)]  # each sequence's remaining tokens
    o2, _ = causal_attention(*shifted, rest, window, past=state)
    if window is not None:
        assert state[0].shape[1] <= window - 1  # a sliding-window cache keeps only the window
    for n in range(N):
        L = int(lengths[n])
        if L == 0:
            assert o1[n].abs().max() == 0 and o2[n].abs().max() == 0  # padded rows are zeros
            continue
        got = torch.cat([o1[n, : first[n]], o2[n, : rest[n]]])
        assert rel(got, reference(q[n, :L], k[n, :L], v[n, :L], window)) < TOL


def test_rope_rotates_relative_positions():
    """<rope(q, i), rope(k, j)> depends on i - j only: the property attention relies on."""
    q, k = torch.randn(1, 1, 1, 8).double(), torch.randn(1, 1, 1, 8).double()

    def dot(i, j):
        return (apply_rope(q, torch.tensor([[i]]), 100.0) * apply_rope(k, torch.tensor([[j]]), 100.0)).sum()

    assert torch.allclose(dot(5, 2), dot(13, 10)) and not torch.allclose(dot(5, 2), dot(5, 3))


@pytest.mark.parametrize("window", [None, 3])
def test_layer_padding_and_decode(window):
    """The layer on a left-padded batch equals each sequence alone, and prefill + token-by-token decode with the
    cache equals one forward (so RoPE positions continue from the cache)."""
    layer = IPLAttention(32, num_heads=4, num_kv_heads=2, window_size=window, layer_idx=0)
    x = torch.randn(2, 10, 32)
    full, _, _ = layer(x)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    padded, _, _ = layer(x, attention_mask=mask)
    alone, _, _ = layer(x[1:, 4:])
    assert rel(padded[1, 4:], alone[0]) < TOL and padded[1, :4].abs().max() == 0
    assert rel(padded[0], full[0]) < TOL

    out, _, cache = layer(x[:, :6], use_cache=True)
    steps = [out]
    for t in range(6, 10):
        out, _, cache = layer(x[:, t : t + 1], past_key_values=cache, use_cache=True)
        steps.append(out)
    assert rel(torch.cat(steps, 1), full) < TOL
    assert cache.get_seq_length(0) == 10
    keys = cache[0]["kv_state"][0]
    assert keys.shape[1] == (10 if window is None else window - 1)


def test_layer_errors():
    with pytest.raises(ValueError, match="num_heads = 4 must be a multiple of num_kv_heads = 3"):
        IPLAttention(32, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="window_size: expected a positive int or None, got 0"):
        IPLAttention(32, num_heads=4, window_size=0)
    layer = IPLAttention(32, num_heads=4)
    with pytest.raises(ValueError, match="a cache needs the layer's index"):
        layer(torch.randn(1, 3, 32), use_cache=True)
    with pytest.raises(TypeError, match="expected a FastWeightCache, got dict"):
        IPLAttention(32, num_heads=4, layer_idx=0)(torch.randn(1, 3, 32), past_key_values={})
    cache = FastWeightCache()
    IPLAttention(32, num_heads=4, layer_idx=0)(torch.randn(2, 3, 32), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match=r"past_key_values\[0\] holds 2 sequences, the input has 1"):
        IPLAttention(32, num_heads=4, layer_idx=0)(torch.randn(1, 1, 32), past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("window", [None, 3])
def test_flash_attn_path_equals_sdpa_path(monkeypatch, window):
    """The flash-attn calls (window conversion, packing for the varlen call, unpacking back) give what the SDPA path
    gives, dense, padded and packed, outputs and gradients; with a cache the layer keeps to SDPA. flash-attn needs a
    GPU, so a CPU stand-in with its documented semantics takes its place and the device check is skipped."""
    from ipl_layers.layers import window_attention
    from ipl_layers.models import attention

    torch.manual_seed(0)
    layer = IPLAttention(32, num_heads=4, num_kv_heads=2, window_size=window, layer_idx=0).double()
    x = torch.randn(2, 7, 32, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    packed = dict(cu_seqlens=torch.tensor([0, 2, 2, 7]))
    cases = [(x, {}), (x, dict(attention_mask=mask)), (x[:1], packed)]
    expected = []
    for inputs, kwargs in cases:
        o = layer(inputs, **kwargs)[0]
        expected.append((o, torch.autograd.grad(o.square().sum(), [x, *layer.parameters()])))

    stub = FlashStub()
    monkeypatch.setattr(window_attention, "flash_attn_func", stub.func)
    monkeypatch.setattr(window_attention, "flash_attn_varlen_func", stub.varlen_func)
    monkeypatch.setattr(attention, "flash_applies", lambda q, uses_cache: not uses_cache)
    for (inputs, kwargs), (o_ref, grads_ref) in zip(cases, expected):
        o = layer(inputs, **kwargs)[0]
        grads = torch.autograd.grad(o.square().sum(), [x, *layer.parameters()])
        assert rel(o, o_ref) < 1e-12
        for g, g_ref in zip(grads, grads_ref):
            assert rel(g, g_ref) < 1e-12
    window_size = (-1, -1) if window is None else (window - 1, 0)  # flash-attn's (left, right) reach
    assert stub.calls == [("func", window_size), ("varlen", window_size), ("varlen", window_size)]
    layer(x, use_cache=True)
    assert len(stub.calls) == 3, "a call that writes a cache keeps to SDPA"
