"""Layers decoding on CPU with a cache under no_grad (what `generate()` does) go through the fused C++ steps
(short conv, delta rule, TTT-Linear, TTT-MLP, Titans) and match the same decode with the extension switched off;
the TTT and Titans steps write the next state over the cache's own tensors, and a snapshot stays as it was."""

import copy

import pytest
import torch
from helpers import assert_rel_rms

from ipl_layers import _ext
from ipl_layers.layers import DeltaNet, GatedLinearAttention, MemoryAttention, TitansMemory, TTTLinear, TTTMLP

# fp32 steps against the fp32 torch path over T = 20 decoded tokens (a TTT mini-batch of 8 commits twice);
# measured <= 5.1e-7.
BOUND = 1e-5
B, HIDDEN, HEADS, PREFILL, T = 2, 64, 4, 5, 20


def decode(layer, cache, xs):
    with torch.no_grad():
        return torch.cat([layer(xs[:, t:t + 1], past_key_values=cache, use_cache=True)[0]
                          for t in range(xs.shape[1])], 1)


@pytest.mark.parametrize("make, steps", [
    (lambda: DeltaNet(HIDDEN, HEADS, layer_idx=0), {"short_conv_step": 3 * T, "delta_rule_step": T}),
    (lambda: TTTLinear(HIDDEN, HEADS, mini_batch_size=8, use_short_conv=True, layer_idx=0),
     {"short_conv_step": 3 * T, "ttt_linear_step": T}),
    (lambda: TTTMLP(HIDDEN, HEADS, mini_batch_size=8, use_short_conv=True, layer_idx=0),
     {"short_conv_step": 3 * T, "ttt_mlp_step": T}),
], ids=["DeltaNet", "TTTLinear", "TTTMLP"])
def test_layer_decode_uses_the_fused_steps_and_matches_eager(make, steps, monkeypatch):
    layer = make().eval()
    with torch.no_grad():
        _, _, cache = layer(torch.randn(B, PREFILL, HIDDEN), use_cache=True)
    xs = torch.randn(B, T, HIDDEN)
    calls = {name: 0 for name in steps}
    for name in steps:
        fn = getattr(_ext, name)
        monkeypatch.setattr(_ext, name, lambda *a, _fn=fn, _name=name, **kw: calls.__setitem__(
            _name, calls[_name] + 1) or _fn(*a, **kw))
    eager_cache = copy.deepcopy(cache)
    fused = decode(layer, cache, xs)
    assert calls == steps, f"fused steps called {calls}, expected {steps}"
    monkeypatch.setattr(_ext, "available", lambda: False)
    eager = decode(layer, eager_cache, xs)
    assert calls == steps, "the eager decode reached a fused step"
    assert_rel_rms("decoded outputs", fused, eager, BOUND)


def floating_states(cache):
    """Every floating tensor of layer 0's recurrent and conv states, in order (positions left out; a memory
    attention's window of keys/values and its queue of writes are not fast weights: they shift each step)."""
    out = []
    for name, value in cache[0].items():
        if name not in ("recurrent_state", "conv_state"):
            continue
        for t in value if isinstance(value, tuple) else (value,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                out.append(t)
    return out


@pytest.mark.parametrize("make", [
    lambda: DeltaNet(HIDDEN, HEADS, layer_idx=0),
    lambda: GatedLinearAttention(HIDDEN, HEADS, use_short_conv=True, layer_idx=0),
    lambda: TTTLinear(HIDDEN, HEADS, mini_batch_size=8, layer_idx=0),
    lambda: TTTMLP(HIDDEN, HEADS, mini_batch_size=8, layer_idx=0),
    lambda: TitansMemory(HIDDEN, HEADS, chunk_size=8, layer_idx=0),
    lambda: MemoryAttention(HIDDEN, HEADS, window_size=2, memory="titans", mini_batch_size=8, layer_idx=0),
    lambda: MemoryAttention(HIDDEN, HEADS, window_size=2, memory="ttt_linear", mini_batch_size=8, layer_idx=0),
    lambda: MemoryAttention(HIDDEN, HEADS, window_size=2, layer_idx=0),
], ids=["DeltaNet", "GLA-conv", "TTTLinear", "TTTMLP", "TitansMemory", "MemoryAttention-titans",
        "MemoryAttention-ttt_linear", "MemoryAttention-gated_deltanet"])
def test_decode_updates_the_cache_state_in_place_and_leaves_snapshots(make):
    layer = make().eval()
    with torch.no_grad():
        _, _, cache = layer(torch.randn(B, PREFILL, HIDDEN), use_cache=True)
    xs = torch.randn(B, T, HIDDEN)
    eager_cache = copy.deepcopy(cache)
    with torch.no_grad():  # the first step may allocate: a prefill's state can be views the step cannot write over
        first = layer(xs[:, :1], past_key_values=cache, use_cache=True)[0]
    snap = cache.snapshot()
    kept = [x.clone() for x in floating_states(snap)]
    before = [x.data_ptr() for x in floating_states(cache)]
    fused = torch.cat([first, decode(layer, cache, xs[:, 1:])], 1)
    assert [x.data_ptr() for x in floating_states(cache)] == before, "the decode allocated a new state"
    assert all(torch.equal(x, y) for x, y in zip(floating_states(snap), kept)), "the snapshot changed"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_ext, "available", lambda: False)
        eager = decode(layer, eager_cache, xs)
    assert_rel_rms("decoded outputs", fused, eager, BOUND)
