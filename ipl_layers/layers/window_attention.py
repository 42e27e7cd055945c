"""Causal sliding-window softmax attention over [N, T, H, D] sequences with a cache of the last window-1 keys
and values, so that a prefill followed by token-by-token decoding equals one forward.

On CUDA with flash-attn installed, `flash_attention` runs the calls that neither read nor write a cache (training, a
prefill without cache) and have no sinks: `flash_attn_func` / `flash_attn_varlen_func` with `window_size`.

Each query attends to itself and the window-1 tokens before it in its own sequence. The cache prepends up to
window-1 earlier keys/values per sequence (right-aligned: the last cached token sits next to the first new
one), so in the "timeline" [cache | new tokens] query i sits at index window-1+i and its keys are the
timeline indices i .. i+window-1 that hold real tokens. Queries run in blocks, each against only its band
of keys, so memory grows with T * window, not T^2.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ipl_layers.ops.chunking import pad_sequences

try:  # optional: the GPU path of training and prefill
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:
    flash_attn_func = flash_attn_varlen_func = None

BLOCK = 256  # queries per attention call (at least the window)

# (keys [N, window-1, H, D], values, count [N] int64), with sinks followed by (sink keys [N, S, H, D], sink
# values, seen [N] int64: the tokens of each sequence so far)
AttnState = Tuple[torch.Tensor, ...]


def flash_applies(q: torch.Tensor, uses_cache: bool) -> bool:
    """flash-attn (half precision on CUDA, when installed) runs the calls that neither read nor write a cache."""
    half = q.dtype in (torch.float16, torch.bfloat16)
    return flash_attn_func is not None and q.is_cuda and half and not uses_cache


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Optional[int],
                    cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
    """Causal attention by flash-attn, full (window None) or each query over itself and the window - 1 tokens
    before it: q [B, T, Hq, D], k, v [B, T, Hkv, D] (Hq a multiple of Hkv), or packed [1, total, *] with
    cu_seqlens [N+1]. Returns o [B, T, Hq, D] (or [1, total, Hq, D])."""
    reach = (-1, -1) if window is None else (window - 1, 0)  # flash-attn's (left, right) window
    if cu_seqlens is None:
        return flash_attn_func(q, k, v, causal=True, window_size=reach)
    cu = cu_seqlens.to(torch.int32)
    longest = int(torch.diff(cu).max())
    return flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, longest, longest, causal=True, window_size=reach)[None]


def _sinks(k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, S: int, past: Optional[AttnState]):
    """The first S keys and values of each sequence after this call, [N, S, H, D] each (zeros where a sequence
    has fewer tokens), taken from the cached sinks and the new k, v [N, T, H, D]; and `seen` before it [N]."""
    N, T, H, D = k.shape
    if past is None:
        sk, sv, seen = k.new_zeros(N, S, H, D), v.new_zeros(N, S, H, D), lengths.new_zeros(N)
    else:
        sk, sv, seen = past[3:]
        seen = seen.to(lengths.device)
    j = torch.arange(S, device=k.device)[None]  # [1, S]
    new = j - seen[:, None]  # [N, S]: the index of sink j among the new tokens (< 0: already cached)
    index = torch.where(new < 0, j, S + new).clamp(max=S + T - 1)  # into the timeline [cached sinks | new]
    have = (j < (seen + lengths)[:, None])[..., None, None]  # [N, S, 1, 1]
    out = []
    for cached, x in ((sk, k), (sv, v)):
        timeline = torch.cat([cached.to(x.dtype), x], 1)  # [N, S + T, H, D]
        out.append(torch.where(have, timeline.gather(1, index[..., None, None].expand(-1, -1, H, D)), 0.0))
    return out[0], out[1], seen


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    window: int,
    past: Optional[AttnState] = None,
    output_final_state: bool = False,
    num_sinks: int = 0,
) -> Tuple[torch.Tensor, Optional[AttnState]]:
    """q, k, v [N, T, H, D], each sequence's first lengths[n] rows real (right padding); `past`: the
    `AttnState` of an earlier call (with `num_sinks` > 0, its sink part too). Returns o [N, T, H, D] (zeros at
    padded rows) and, with `output_final_state`, the cache after the last real token of each sequence."""
    N, T, H, D = q.shape
    P, S = window - 1, num_sinks
    if S:
        sink_k, sink_v, seen = _sinks(k, v, lengths, S, past)  # [N, S, H, D] x2, [N]
        sink_keys, sink_values = sink_k.transpose(1, 2), sink_v.transpose(1, 2)  # [N, H, S, D]
    if past is None:
        past = (k.new_zeros(N, P, H, D), v.new_zeros(N, P, H, D), torch.zeros(N, dtype=torch.long, device=q.device))
    pk, pv, count = past[:3]
    keys = torch.cat([pk.to(k.dtype), k], 1).transpose(1, 2)  # [N, H, P + T, D]
    values = torch.cat([pv.to(v.dtype), v], 1).transpose(1, 2)
    slots = torch.arange(P + T, device=q.device)  # [P + T]
    valid = torch.where(slots[None] < P, slots[None] >= P - count[:, None], slots[None] - P < lengths[:, None])
    queries = q.transpose(1, 2)  # [N, H, T, D]
    block = max(BLOCK, window)
    out = []
    for s in range(0, T, block):
        e = min(s + block, T)
        rows = torch.arange(s, e, device=q.device)[:, None]  # [Bq, 1]: query i sits at timeline index P + i
        cols = slots[None, s : e + P]  # [1, L]
        band = (cols >= rows) & (cols <= rows + P)  # [Bq, L]
        # a padded query sees only itself, so no row is empty; its output is dropped
        mask = band[None] & (valid[:, None, s : e + P] | (cols == rows + P)[None])  # [N, Bq, L]
        k_blk, v_blk = keys[:, :, s : e + P], values[:, :, s : e + P]
        if S:  # sink j joins query i (sequence position seen + i) once it has left the window
            position = seen[:, None] + rows[:, 0]  # [N, Bq]
            sinks = torch.arange(S, device=q.device) <= (position - window)[..., None]  # [N, Bq, S]
            mask = torch.cat([sinks, mask], -1)  # [N, Bq, S + L]
            k_blk, v_blk = torch.cat([sink_keys, k_blk], 2), torch.cat([sink_values, v_blk], 2)
        out.append(F.scaled_dot_product_attention(queries[:, :, s:e], k_blk, v_blk, attn_mask=mask[:, None]))
    o = torch.cat(out, 2).transpose(1, 2) if out else torch.zeros_like(q)  # [N, T, H, D]
    o = torch.where((torch.arange(T, device=q.device)[None] < lengths[:, None])[..., None, None], o, 0.0)
    if not output_final_state:
        return o, None
    index = lengths[:, None] + torch.arange(P, device=q.device)[None]  # [N, P]: the P slots before each end
    keep = valid.gather(1, index)[..., None, None]  # [N, P, 1, 1]
    rows = torch.arange(N, device=q.device)[:, None]
    final = tuple(torch.where(keep, x.transpose(1, 2)[rows, index], 0.0) for x in (keys, values))
    sink_state = (sink_k, sink_v, seen + lengths) if S else ()
    return o, (*final, (count + lengths).clamp(max=P), *sink_state)


def window_attention_heads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    window: int,
    cu_seqlens: Optional[torch.Tensor] = None,
    past: Optional[AttnState] = None,
    output_final_state: bool = False,
    num_sinks: int = 0,
) -> Tuple[torch.Tensor, Optional[AttnState]]:
    """`window_attention` of a layer's projections q, k, v [B, T, num_heads * D] (or packed [1, total, *] with
    cu_seqlens [N+1]): returns o [B, T, num_heads * D] and the cache."""
    q, k, v = (x.unflatten(-1, (num_heads, -1)) for x in (q, k, v))  # [B, T, H, D]
    if cu_seqlens is None:
        lengths = torch.full((q.shape[0],), q.shape[1], dtype=torch.long, device=q.device)
        o, state = window_attention(q, k, v, lengths, window, past, output_final_state, num_sinks)
    else:  # one right-padded row per sequence, so each attends within itself
        (qp, kp, vp), back = pad_sequences([q, k, v], cu_seqlens, 1)
        o, state = window_attention(qp, kp, vp, torch.diff(cu_seqlens.long()), window, past, output_final_state,
                                    num_sinks)
        o = back(o)
    return o.flatten(-2), state
