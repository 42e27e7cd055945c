"""A CPU stand-in for flash-attn's two functions, with flash-attn's documented semantics, so the calls our attention
layers make to it (window conversion, packing for the varlen call, unpacking back) can be checked without a GPU."""

import torch


def flash_one_sequence(q, k, v, causal, window_size):
    """flash-attn's documented semantics for q [T, Hq, D], k, v [S, Hkv, D]: query i (bottom-right aligned, at key
    index i + S - T) sees keys j with j <= i + S - T when causal and i + S - T - left <= j <= i + S - T + right for
    window_size = (left, right), -1 meaning unbounded; softmax scale 1 / sqrt(D); query heads grouped over key heads."""
    T, Hq, D = q.shape
    S, Hkv = k.shape[:2]
    k, v = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)  # [S, Hq, D]
    i = torch.arange(T)[:, None] + S - T
    j = torch.arange(S)[None]
    allowed = (j <= i) if causal else torch.ones(T, S, dtype=torch.bool)
    left, right = window_size
    if left >= 0:
        allowed &= j >= i - left
    if right >= 0:
        allowed &= j <= i + right
    scores = torch.einsum("thd,shd->hts", q, k) / D**0.5
    return torch.einsum("hts,shd->thd", torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1), v)


class FlashStub:
    """Stands in for flash_attn's two functions on CPU (same signatures and layouts), recording each call."""

    def __init__(self):
        self.calls = []

    def func(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1)):
        self.calls.append(("func", window_size))
        return torch.stack([flash_one_sequence(q[b], k[b], v[b], causal, window_size) for b in range(q.shape[0])])

    def varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                    softmax_scale=None, causal=False, window_size=(-1, -1)):
        assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32, "flash-attn takes int32 cu_seqlens"
        assert max_seqlen_q == max_seqlen_k == int(torch.diff(cu_seqlens_q).max())
        self.calls.append(("varlen", window_size))
        bounds = cu_seqlens_q.tolist()
        return torch.cat([flash_one_sequence(q[s:e], k[s:e], v[s:e], causal, window_size)
                          for s, e in zip(bounds[:-1], bounds[1:])])
