"""Causal sliding-window softmax attention over [N, T, H, D] sequences with a cache of the last window-1 keys
and values, so that a prefill followed by token-by-token decoding equals one forward.

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

BLOCK = 256  # queries per attention call (at least the window)

AttnState = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    window: int,
    past: Optional[AttnState] = None,
    output_final_state: bool = False,
) -> Tuple[torch.Tensor, Optional[AttnState]]:
    """q, k, v [N, T, H, D], each sequence's first lengths[n] rows real (right padding); `past`: (keys
    [N, window-1, H, D], values, count [N] int64) from an earlier call. Returns o [N, T, H, D] (zeros at
    padded rows) and, with `output_final_state`, the cache after the last real token of each sequence."""
    N, T, H, D = q.shape
    P = window - 1
    if past is None:
        past = (k.new_zeros(N, P, H, D), v.new_zeros(N, P, H, D), torch.zeros(N, dtype=torch.long, device=q.device))
    pk, pv, count = past
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
        out.append(F.scaled_dot_product_attention(queries[:, :, s:e], keys[:, :, s : e + P], values[:, :, s : e + P],
                                                  attn_mask=mask[:, None]))
    o = torch.cat(out, 2).transpose(1, 2) if out else torch.zeros_like(q)  # [N, T, H, D]
    o = torch.where((torch.arange(T, device=q.device)[None] < lengths[:, None])[..., None, None], o, 0.0)
    if not output_final_state:
        return o, None
    index = lengths[:, None] + torch.arange(P, device=q.device)[None]  # [N, P]: the P slots before each end
    keep = valid.gather(1, index)[..., None, None]  # [N, P, 1, 1]
    rows = torch.arange(N, device=q.device)[:, None]
    final = tuple(torch.where(keep, x.transpose(1, 2)[rows, index], 0.0) for x in (keys, values))
    return o, (*final, (count + lengths).clamp(max=P))


def window_attention_heads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    window: int,
    cu_seqlens: Optional[torch.Tensor] = None,
    past: Optional[AttnState] = None,
    output_final_state: bool = False,
) -> Tuple[torch.Tensor, Optional[AttnState]]:
    """`window_attention` of a layer's projections q, k, v [B, T, num_heads * D] (or packed [1, total, *] with
    cu_seqlens [N+1]): returns o [B, T, num_heads * D] and the cache."""
    q, k, v = (x.unflatten(-1, (num_heads, -1)) for x in (q, k, v))  # [B, T, H, D]
    if cu_seqlens is None:
        lengths = torch.full((q.shape[0],), q.shape[1], dtype=torch.long, device=q.device)
        o, state = window_attention(q, k, v, lengths, window, past, output_final_state)
    else:  # one right-padded row per sequence, so each attends within itself
        (qp, kp, vp), back = pad_sequences([q, k, v], cu_seqlens, 1)
        o, state = window_attention(qp, kp, vp, torch.diff(cu_seqlens.long()), window, past, output_final_state)
        o = back(o)
    return o.flatten(-2), state
