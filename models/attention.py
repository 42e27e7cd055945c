"""`IPLAttention`: causal softmax attention, full or sliding-window, with RoPE and grouped-query heads, as a mixer
with the interface of the `ipl_layers.layers` layers (forward signature, [B, T] padding mask, `cu_seqlens`,
`FastWeightCache`), so that attention and fast-weight layers stack in one model and one cache.

Padded tokens are packed away first (as the other layers do), so each sequence's real tokens are contiguous and
its RoPE positions count only its real tokens; left-padded batches therefore match the unpadded sequences.

The cache holds per sequence the keys and values of its last tokens ("kv_state": keys, values [N, L, H_kv, D]
right-aligned, the count of real ones [N]) and the number of real tokens seen ("position" [N], the next RoPE
position). A full-attention layer keeps every token; a sliding-window layer keeps only the window - 1 tokens that
the next query can still see. Queries run in blocks, each against only the keys it can see, so the memory of a
sliding-window layer grows with T * window, not T^2.

On CUDA with flash-attn installed, a forward without past keys (training, a prefill) calls flash-attn with
`window_size` (`ipl_layers.layers.window_attention.flash_attention`); everything else runs through PyTorch's
`scaled_dot_product_attention` with a boolean banded causal mask.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ipl_layers._checks import check_cu_seqlens
from ipl_layers.cache import FastWeightCache
from ipl_layers.layers.padding import check_attention_mask, repad, unpad
from ipl_layers.layers.rope import apply_rope
from ipl_layers.layers.window_attention import flash_applies, flash_attention
from ipl_layers.ops.chunking import pad_sequences

BLOCK = 256  # queries per scaled_dot_product_attention call

KVState = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    window: Optional[int],
    past: Optional[KVState] = None,
    output_final_state: bool = False,
) -> Tuple[torch.Tensor, Optional[KVState]]:
    """q [N, T, Hq, D], k, v [N, T, Hkv, D] (Hq a multiple of Hkv), each sequence's first lengths[n] rows real
    (right padding); `past`: (keys [N, P, Hkv, D], values, count [N]) from an earlier call, right-aligned.

    In the timeline [past | new] query i sits at index P + i and sees the real keys at indices <= P + i (and
    > P + i - window with a window). Returns o [N, T, Hq, D] (zeros at padded rows) and, with
    `output_final_state`, the keys and values a later call needs: all real ones, or the last window - 1."""
    N, T, Hq, D = q.shape
    Hkv = k.shape[2]
    if past is None:
        past = (k.new_zeros(N, 0, Hkv, D), v.new_zeros(N, 0, Hkv, D), torch.zeros(N, dtype=torch.long, device=q.device))
    pk, pv, count = past
    P = pk.shape[1]
    keys = torch.cat([pk.to(k.dtype), k], 1)  # [N, P + T, Hkv, D]
    values = torch.cat([pv.to(v.dtype), v], 1)
    slots = torch.arange(P + T, device=q.device)  # [P + T]
    valid = torch.where(slots[None] < P, slots[None] >= P - count[:, None], slots[None] - P < lengths[:, None])
    group = Hq // Hkv  # query heads per key head (GQA)
    kh, vh = (x.transpose(1, 2).repeat_interleave(group, 1) for x in (keys, values))  # [N, Hq, P + T, D]
    qh = q.transpose(1, 2)  # [N, Hq, T, D]
    out = []
    for s in range(0, T, BLOCK):
        e = min(s + BLOCK, T)
        lo = 0 if window is None else max(0, P + s - window + 1)  # the first key any query of the block sees
        rows = P + torch.arange(s, e, device=q.device)[:, None]  # [Bq, 1] timeline indices of the queries
        cols = slots[None, lo : P + e]  # [1, L]
        band = cols <= rows if window is None else (cols <= rows) & (cols > rows - window)  # [Bq, L]
        # a padded query sees only itself, so no row of the mask is empty; its output is dropped below
        mask = band[None] & (valid[:, None, lo : P + e] | (cols == rows)[None])  # [N, Bq, L]
        out.append(F.scaled_dot_product_attention(qh[:, :, s:e], kh[:, :, lo : P + e], vh[:, :, lo : P + e],
                                                  attn_mask=mask[:, None]))
    o = torch.cat(out, 2).transpose(1, 2) if out else torch.zeros_like(q)  # [N, T, Hq, D]
    o = torch.where((torch.arange(T, device=q.device)[None] < lengths[:, None])[..., None, None], o, 0.0)
    if not output_final_state:
        return o, None
    total = count + lengths  # [N] real tokens in the timeline
    L = int(total.max()) if N else 0
    if window is not None:
        L = min(L, window - 1)
    index = P + lengths[:, None] - L + torch.arange(L, device=q.device)[None]  # [N, L]: the L slots before each end
    keep = ((index >= 0) & valid.gather(1, index.clamp(min=0)))[..., None, None]  # [N, L, 1, 1]
    rows = torch.arange(N, device=q.device)[:, None]
    final = tuple(torch.where(keep, x[rows, index.clamp(min=0)], 0.0) for x in (keys, values))  # [N, L, Hkv, D]
    return o, (*final, total.clamp(max=L))


class IPLAttention(nn.Module):
    """Causal multi-head attention with RoPE: full (`window_size=None`) or sliding-window (each query sees itself
    and the window_size - 1 tokens before it), `num_kv_heads` key/value heads shared by groups of query heads."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: Optional[int] = None,
        window_size: Optional[int] = None,
        rope_theta: float = 10000.0,
        head_dim: Optional[int] = None,
        layer_idx: Optional[int] = None,
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = hidden_size // num_heads if head_dim is None else head_dim
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"IPLAttention: {name}: expected a positive int, got {value!r}")
        if num_heads % num_kv_heads:
            raise ValueError(f"IPLAttention: num_heads = {num_heads} must be a multiple of "
                             f"num_kv_heads = {num_kv_heads}")
        if head_dim % 2:
            raise ValueError(f"IPLAttention: head_dim: expected an even dim (RoPE rotates pairs), got {head_dim}")
        if window_size is not None and (not isinstance(window_size, int) or window_size < 1):
            raise ValueError(f"IPLAttention: window_size: expected a positive int or None, got {window_size!r}")
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim = head_dim
        self.window_size, self.rope_theta, self.layer_idx = window_size, rope_theta, layer_idx
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"window_size={self.window_size}, rope_theta={self.rope_theta}")

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[FastWeightCache] = None,
        use_cache: bool = False,
        **kwargs,
    ) -> Tuple[torch.Tensor, None, Optional[FastWeightCache]]:
        cu_seqlens = kwargs.get("cu_seqlens")
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
            raise ValueError("IPLAttention: hidden_states: expected a 3-D tensor [B, T, hidden_size]")
        B, T, _ = hidden_states.shape
        check_cu_seqlens(cu_seqlens, B, T, hidden_states.device, like_name="hidden_states")
        if (use_cache or past_key_values is not None) and self.layer_idx is None:
            raise ValueError("IPLAttention: a cache needs the layer's index: build the layer with layer_idx=...")
        if past_key_values is not None and not isinstance(past_key_values, FastWeightCache):
            raise TypeError(f"IPLAttention: past_key_values: expected a FastWeightCache, got "
                            f"{type(past_key_values).__name__}")
        if use_cache and past_key_values is None:
            past_key_values = FastWeightCache()
        has_past = past_key_values is not None and len(past_key_values) > self.layer_idx
        last = past_key_values[self.layer_idx] if has_past else {}

        indices = None
        if attention_mask is not None:
            if cu_seqlens is not None:
                raise ValueError("IPLAttention: pass either attention_mask or cu_seqlens, not both")
            mask = check_attention_mask(attention_mask, B, T, has_past=last.get("seen_tokens", 0) > 0)
            if not mask.all():
                hidden_states, indices, cu_seqlens = unpad(hidden_states, mask)  # [1, total, hidden]

        x = hidden_states  # [B, T, hidden] or packed [1, total, hidden]
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))  # [B, T, Hq, D]
        k = self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))  # [B, T, Hkv, D]
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))  # [B, T, Hkv, D]
        if cu_seqlens is None:
            lengths = torch.full((B,), x.shape[1], dtype=torch.long, device=x.device)
            back = lambda o: o  # noqa: E731
        else:  # one right-padded row per sequence, so each attends within itself
            (q, k, v), back = pad_sequences([q, k, v], cu_seqlens, 1)  # [N, Tmax, H, D]
            lengths = torch.diff(cu_seqlens.long())
        N, Tq = q.shape[:2]
        start = last.get("position", torch.zeros(N, dtype=torch.long, device=x.device))  # [N]
        if start.shape[0] != N:
            raise ValueError(f"IPLAttention: past_key_values[{self.layer_idx}] holds {start.shape[0]} sequences, "
                             f"the input has {N}")
        positions = start[:, None] + torch.arange(Tq, device=x.device)  # [N, Tq]: each sequence's own count
        q, k = apply_rope(q, positions, self.rope_theta), apply_rope(k, positions, self.rope_theta)

        if flash_applies(q, use_cache or "kv_state" in last):
            packed = cu_seqlens is not None
            q, k, v = (back(x) if packed else x for x in (q, k, v))  # [B, T, H, D] or [1, total, H, D]
            o = flash_attention(q, k, v, self.window_size, cu_seqlens)
        else:
            o, kv_state = causal_attention(q, k, v, lengths, self.window_size, last.get("kv_state"), use_cache)
            o = back(o)  # [B, T, Hq, D] or [1, total, Hq, D]
            if use_cache:
                past_key_values.update_states(self.layer_idx, offset=T, kv_state=kv_state, position=start + lengths)

        o = self.o_proj(o.flatten(-2))  # [B, T, hidden]
        if indices is not None:
            o = repad(o, indices, B, T)
        return o, None, past_key_values
