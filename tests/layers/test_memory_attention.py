"""The MemoryAttention layer, for every memory, plain, with attention sinks and with the memory's adapters: the
formula against a hand composition (dense banded softmax attention and the op's reference on inputs shifted by a
Python loop), its two limits (window past the sequence: causal attention; window 0 with the gate open: the bare
memory op), every path (padding mask, cu_seqlens, prefill + decode through a saved cache, stopping inside TTT
mini-batches and Titans chunks) against the float64 reference backend one sample at a time, gradients, adapters
starting as none, the memory left exactly as it started before the first eviction, the cache size while decoding
far past the window, and input errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from flash_stub import FlashStub
from helpers import assert_rel_rms
from layer_checks import (
    assert_gradients_match,
    assert_padding_mask_equals_varlen_equals_per_sample,
    assert_prefill_decode_survives_reload,
    with_backend,
)

from ipl_layers.layers import MemoryAttention
from ipl_layers.layers.delta_rule import mamba2_log_decay
from ipl_layers.layers.rope import apply_rope
from ipl_layers.ops import (delta_rule_reference, linear_attention_reference, titans_memory_reference,
                            ttt_linear_reference)
from ipl_layers.state import TitansState, TTTLinearState

# float32 torch path vs the float64 reference: measured <= 5e-7 on outputs and states and <= 2.1e-6 on gradients;
# ~20x headroom. float64 agrees to rounding (measured <= 2e-15).
FP32_BOUND = 5e-5
FP64_BOUND = 1e-10

HIDDEN, HEADS, WINDOW = 16, 2, 3
LENGTHS = [11, 5, 1, 0]  # past the window, two tokens past it, a single token, all padding
MEMORIES = ("gated_deltanet", "delta_rule", "linear_attention", "ttt_linear", "titans")
MINI_BATCH = 4  # TTT mini-batch / Titans chunk: the prompts and decoding below stop inside one
# the layer's options: plain, with attention sinks, with sinks and the memory's q/k/v adapters, and as a retrofit
# of a Llama layer builds it (grouped key/value heads, a head dim of its own, RoPE), with a sink
OPTIONS = [{}, {"num_sink_tokens": 2}, {"num_sink_tokens": 2, "adapter_rank": 2},
           {"num_kv_heads": 1, "head_dim": 6, "rope_theta": 100.0, "num_sink_tokens": 1}]
OPTION_IDS = ["plain", "sinks", "sinks+adapter", "gqa+rope"]


def make_layer(memory="gated_deltanet", window=WINDOW, **kw) -> MemoryAttention:
    layer = MemoryAttention(HIDDEN, num_heads=HEADS, window_size=window, memory=memory, layer_idx=0,
                            mini_batch_size=MINI_BATCH, **kw)
    with torch.no_grad():
        layer.gate.normal_()  # gates away from their shared initial value, so a mixed-up head shows
        for adapter in layer.adapters or ():
            adapter[1].weight.normal_(std=0.5)  # away from zero, so that the adapters matter
    return layer


def projected_qkv(layer, x):
    """The projections q, k, v [B, T, H, D], each key/value head repeated for its query heads."""
    q, k, v = (p(x).unflatten(-1, (-1, layer.head_k_dim)) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    group = HEADS // layer.num_kv_heads
    return q, k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)


def memory_qkv(layer, x):
    """The memory's q, k, v [B, T, H, D]: the projections plus the adapters' B A x."""
    qkv = [y.flatten(-2) for y in projected_qkv(layer, x)]
    if layer.adapters is not None:
        qkv = [y + adapter(x) for y, adapter in zip(qkv, layer.adapters)]
    return [y.unflatten(-1, (HEADS, -1)) for y in qkv]


def memory_reference(layer, x, q, k, v, shift):
    """The memory op's float64 reference on q, k, v [B, T, H, D] and the layer's gates of x, every write (k, v
    and gates) passed through `shift`."""
    if layer.memory == "linear_attention":
        return linear_attention_reference(F.normalize(q, dim=-1), shift(F.normalize(k, dim=-1)), shift(v))[0]
    beta = shift(torch.sigmoid(layer.b_proj(x)))  # [B, T, H]
    if layer.memory in ("gated_deltanet", "delta_rule"):
        g = shift(mamba2_log_decay(layer.a_proj(x), layer.A_log, layer.dt_bias)) \
            if layer.memory == "gated_deltanet" else None
        return delta_rule_reference(q, shift(k), shift(v), beta, g, use_qk_l2norm=True)[0]
    N, D = x.shape[0], layer.head_k_dim
    q, k = F.normalize(q, dim=-1), shift(F.normalize(k, dim=-1))
    if layer.memory == "ttt_linear":
        start = (layer.memory_W0.expand(N, HEADS, D, D), layer.memory_b0.expand(N, HEADS, D))
        return ttt_linear_reference(q, k, shift(v), layer.base_lr / D * beta, ln_weight=layer.memory_norm_weight,
                                    ln_bias=layer.memory_norm_bias, mini_batch_size=MINI_BATCH, initial_state=start,
                                    use_residual=False)[0]
    eta, alpha = shift(torch.sigmoid(layer.eta_alpha_proj(x))).unflatten(-1, (2, HEADS)).unbind(-2)
    start = tuple(w.expand(N, *w.shape) for w in layer.memory_weights)
    theta = layer.base_lr * beta * (1 - eta) / MINI_BATCH
    return titans_memory_reference(q, k, shift(v), theta, eta, alpha, chunk_size=MINI_BATCH, initial_state=start,
                                   use_residual=False, normalize_step=True)[0]


def hand_composition(layer, x):
    """The module docstring's formula written out in float64 for x [1, T, hidden]: keys t-W+1 .. t and the
    sinks before them; the memory (on the adapted q, k, v) written at step t with token t-W unless it is a
    sink."""
    layer = layer.double()
    T, D, W, S = x.shape[1], layer.head_k_dim, layer.window_size, layer.num_sink_tokens
    q, k, v = projected_qkv(layer, x)  # [1, T, H, D]
    if layer.rope_theta is not None:  # the attention's q, k at positions 0 .. T-1
        q, k = (apply_rope(y, torch.arange(T)[None], layer.rope_theta) for y in (q, k))
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    keys = ((j <= i) & (j > i - W)) | ((j < S) & (j <= i - W))  # [T, T]
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
    a = torch.einsum("bhts,bshd->bthd", scores.masked_fill(~keys, -math.inf).softmax(-1).nan_to_num(), v)
    shift = lambda y: torch.stack([y[:, t - W] if t - W >= S else torch.zeros_like(y[:, 0]) for t in range(T)], 1)  # noqa: E731
    m = memory_reference(layer, x, *memory_qkv(layer, x), shift)
    return layer.o_proj((a + torch.sigmoid(layer.gate)[:, None] * m).flatten(-2))


@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("window", [1, WINDOW, 20])
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_formula_matches_hand_composition(memory, window, options):
    layer = with_backend(make_layer(memory, window, **options), "torch", torch.float64)
    x = torch.randn(1, 13, HIDDEN, dtype=torch.float64)
    assert_rel_rms("out", layer(x)[0], hand_composition(layer, x), FP64_BOUND)


def test_window_past_the_sequence_is_causal_attention():
    layer = with_backend(make_layer(window=40), "torch", torch.float64)
    x = torch.randn(2, 13, HIDDEN, dtype=torch.float64)
    q, k, v = (p(x).unflatten(-1, (HEADS, -1)).transpose(1, 2) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(-2)
    assert_rel_rms("out", layer(x)[0], layer.o_proj(a), FP64_BOUND)


@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("adapter_rank", [0, 2])
def test_window_zero_with_the_gate_open_is_the_bare_memory_op(memory, adapter_rank):
    layer = with_backend(make_layer(memory, window=0, adapter_rank=adapter_rank), "torch", torch.float64)
    with torch.no_grad():
        layer.gate.fill_(50.0)  # sigmoid(50) rounds to 1 in float64
    x = torch.randn(2, 13, HIDDEN, dtype=torch.float64)
    m = memory_reference(layer, x, *memory_qkv(layer, x), lambda y: y)
    assert_rel_rms("out", layer(x)[0], layer.o_proj(m.flatten(-2)), FP64_BOUND)


@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("dtype,bound", [(torch.float32, FP32_BOUND), (torch.float64, FP64_BOUND)])
def test_padding_mask_equals_varlen_equals_per_sample(memory, options, dtype, bound):
    layer = with_backend(make_layer(memory, **options), "torch", dtype)
    state_type = {"ttt_linear": TTTLinearState, "titans": TitansState}.get(memory, torch.Tensor)
    assert_padding_mask_equals_varlen_equals_per_sample(layer, LENGTHS, HIDDEN, dtype, bound, state_type)


@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_prefill_decode_equals_forward_through_a_saved_cache(memory, options, tmp_path):
    layer = with_backend(make_layer(memory, **options), "torch", torch.float64)
    assert_prefill_decode_survives_reload(layer, HIDDEN, tmp_path / "cache.safetensors", FP64_BOUND)


@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_gradients_match_float64(memory, options):
    layer = with_backend(make_layer(memory, **options), "torch", torch.float32)
    ref = with_backend(layer, "reference", torch.float64)
    assert_gradients_match(layer, ref, LENGTHS[:3], max(LENGTHS), HIDDEN, FP32_BOUND)


@pytest.mark.parametrize("memory", MEMORIES)
@torch.no_grad()
def test_adapters_start_as_no_adapters(memory):
    """B = 0 at the start: the layer with adapters gives exactly the outputs and cache of the layer without."""
    layer = MemoryAttention(HIDDEN, num_heads=HEADS, window_size=WINDOW, memory=memory, adapter_rank=3, layer_idx=0)
    plain = MemoryAttention(HIDDEN, num_heads=HEADS, window_size=WINDOW, memory=memory, layer_idx=0)
    missing, unexpected = plain.load_state_dict(layer.state_dict(), strict=False)
    assert not missing and all(name.startswith("adapters.") for name in unexpected)
    x = torch.randn(2, 9, HIDDEN)
    (o, _, cache), (o_plain, _, cache_plain) = layer(x, use_cache=True), plain(x, use_cache=True)
    assert torch.equal(o, o_plain)
    assert cache.update_norms(cache_plain) == {0: dict.fromkeys(cache_plain[0].keys() - {"seen_tokens"}, 0.0)}


@pytest.mark.parametrize("memory", MEMORIES)
@torch.no_grad()
def test_rows_before_the_first_eviction_leave_the_memory_untouched(memory):
    """A prompt shorter than the window, then a decoded token still inside it: every memory row so far is a zero
    row, and the state must be exactly the start state (TTT: start weights, zero gradient sums; Titans: start
    weights, zero momentum; the others: zeros), through the chunked forward and the decoding step alike."""
    layer = make_layer(memory, window=6)
    x = torch.randn(2, 5, HIDDEN)
    _, _, cache = layer(x[:, :4], use_cache=True)
    _, _, cache = layer(x[:, 4:], past_key_values=cache, use_cache=True)
    state = cache[0]["recurrent_state"]
    if memory == "ttt_linear":
        assert torch.equal(state.W, layer.memory_W0.expand_as(state.W))
        assert torch.equal(state.b, layer.memory_b0.expand_as(state.b))
        assert not state.sum_W.any() and not state.sum_b.any()
    elif memory == "titans":
        for start, weights, p in zip(state.start, state.weights, layer.memory_weights):
            assert torch.equal(start, p.expand_as(start)) and torch.equal(weights, p.expand_as(weights))
        assert not any(m.any() for m in state.momentum)
    else:
        assert not state.any()


@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_cache_size_is_constant_while_decoding_ten_windows(memory, options):
    layer = make_layer(memory, window=4, **options)
    x = torch.randn(2, 1, HIDDEN)
    _, _, cache = layer(torch.randn(2, 6, HIDDEN), use_cache=True)
    sizes = set()
    for _ in range(40):
        _, _, cache = layer(x, past_key_values=cache, use_cache=True)
        state = cache[0]
        recurrent = state["recurrent_state"]
        tensors = [*(recurrent if isinstance(recurrent, tuple) else (recurrent,)), state["memory_queue"],
                   *state["attn_state"]]
        sizes.add(sum(t.numel() for t in tensors))
    assert len(sizes) == 1, f"the cache grew while decoding: {sorted(sizes)} elements"


@pytest.mark.parametrize("kw, match", [
    ({"window_size": -1}, "window_size: expected an int >= 0, got -1"),
    ({"memory": "ttt"}, r"memory: expected one of \('gated_deltanet', .*'titans'\), got 'ttt'"),
    ({"dt_min": 0.2, "dt_max": 0.1}, "MemoryAttention: expected 0 < dt_min <= dt_max"),
    ({"num_sink_tokens": -2}, "num_sink_tokens: expected an int >= 0, got -2"),
    ({"window_size": 0, "num_sink_tokens": 2}, "num_sink_tokens: expected 0 with window_size = 0 .*, got 2"),
    ({"adapter_rank": 1.0}, "adapter_rank: expected an int >= 0, got 1.0"),
    ({"memory": "ttt_linear", "mini_batch_size": 0}, "mini_batch_size: expected a positive int, got 0"),
    ({"memory": "titans", "memory_depth": 1.5}, "memory_depth: expected a positive int, got 1.5"),
    ({"memory": "titans", "base_lr": -0.1}, r"base_lr: expected > 0 \(or None for the memory's default\), got -0.1"),
    ({"num_kv_heads": 3}, "num_kv_heads: expected a positive divisor of num_heads = 2, got 3"),
    ({"head_dim": 0}, "head_dim: expected a positive int or None, got 0"),
    ({"head_dim": 5, "rope_theta": 1e4}, "head_dim: expected an even dim with RoPE .*, got 5"),
    ({"rope_theta": 0.0}, "rope_theta: expected > 0 or None, got 0.0"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        MemoryAttention(HIDDEN, num_heads=HEADS, **kw)


@pytest.mark.parametrize("window", [WINDOW, 20])
def test_flash_attn_path_equals_sdpa_path(monkeypatch, window):
    """Without cache and sinks the window attention goes to flash-attn: through a CPU stand-in with flash-attn's
    semantics (it needs a GPU), outputs and gradients equal the SDPA path's, dense, padded and packed."""
    from ipl_layers.layers import memory_attention, window_attention

    torch.manual_seed(0)
    layer = with_backend(make_layer(window=window, **OPTIONS[3] | {"num_sink_tokens": 0}), "torch", torch.float64)
    x = torch.randn(2, 13, HIDDEN, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[0, :4] = 0
    cases = [(x, {}), (x, dict(attention_mask=mask)), (x[:1], dict(cu_seqlens=torch.tensor([0, 5, 5, 13])))]

    def outputs_and_grads():
        for inputs, kwargs in cases:
            o = layer(inputs, **kwargs)[0]
            yield o, torch.autograd.grad(o.square().sum(), [x, *layer.parameters()])

    expected = list(outputs_and_grads())
    stub = FlashStub()
    monkeypatch.setattr(window_attention, "flash_attn_func", stub.func)
    monkeypatch.setattr(window_attention, "flash_attn_varlen_func", stub.varlen_func)
    monkeypatch.setattr(memory_attention, "flash_applies", lambda q, uses_cache: not uses_cache)
    for (o, grads), (o_ref, grads_ref) in zip(outputs_and_grads(), expected):
        assert_rel_rms("out", o, o_ref, FP64_BOUND)
        for g, g_ref in zip(grads, grads_ref):
            assert_rel_rms("grad", g, g_ref, FP64_BOUND)
    assert [call[0] for call in stub.calls] == ["func", "varlen", "varlen"]


def test_titans_memory_stays_finite_on_repeated_keys():
    """One key over and over (plus noise) at the default gates: every step of a chunk pushes the memory the same way,
    the case where per-token steps adding up C-fold made it diverge (measured: NaN with theta = base_lr * beta)."""
    torch.manual_seed(0)
    layer = MemoryAttention(128, 4, window_size=16, memory="titans", layer_idx=0)
    with torch.no_grad():
        layer.b_proj.weight.zero_()  # beta = 1/2 on every token
    x = torch.randn(1, 1, 128) * 3 + 0.1 * torch.randn(2, 512, 128)
    _, _, cache = layer(x, use_cache=True)
    assert all(torch.isfinite(w).all() for w in cache[0]["recurrent_state"])
