"""Sequence padding and chunk layout shared by the chunked torch paths.

Sequences are padded to [N, Tp, H, *] with Tp a multiple of the chunk size (zeros in the padding: the
chunked ops choose their inputs so that zero tokens leave the state untouched), then viewed per chunk as
[N, H, NC, C, *] for batched matmuls.
"""

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def pad_sequences(
    tensors: Sequence[Optional[torch.Tensor]],
    cu_seqlens: Optional[torch.Tensor],
    chunk_size: int,
    front: Optional[torch.Tensor] = None,
) -> Tuple[List[Optional[torch.Tensor]], Callable[[torch.Tensor], torch.Tensor]]:
    """[B, T, H, *] tensors (or packed [1, T, H, *] with cu_seqlens; None passes through) -> [N, Tp, H, *]
    with Tp a multiple of `chunk_size` (at least one chunk, so T = 0 passes the state on), and the inverse
    for outputs. `front` ([N] int, optional): zero rows put before each sequence (its chunk grid then starts
    front[n] positions early, as when a sequence continues an open mini-batch)."""
    T = next(x for x in tensors if x is not None).shape[1]
    if cu_seqlens is None and front is None:
        Tp = max(-(-T // chunk_size), 1) * chunk_size
        pad = lambda x: x if x is None or Tp == T else F.pad(x, (0, 0) * (x.dim() - 2) + (0, Tp - T))  # noqa: E731
        return [pad(x) for x in tensors], lambda o: o[:, :T]
    B = next(x for x in tensors if x is not None).shape[0]
    if cu_seqlens is None:  # B sequences of length T in the flattened [B * T] rows
        device = front.device
        offsets = torch.arange(B + 1, device=device) * T
    else:
        device = cu_seqlens.device
        offsets = cu_seqlens.to(torch.long)
    lengths = offsets[1:] - offsets[:-1]  # [N]
    shift = torch.zeros_like(lengths) if front is None else front.to(device=device, dtype=torch.long)  # [N]
    ends = shift + lengths
    Tp = max(-(-int(ends.max()) // chunk_size) * chunk_size, chunk_size) if ends.numel() else chunk_size
    pos = torch.arange(Tp, device=device)  # [Tp]
    valid = (pos[None, :] >= shift[:, None]) & (pos[None, :] < ends[:, None])  # [N, Tp]
    rows_total = B * T
    index = torch.where(valid, offsets[:-1, None] + pos[None, :] - shift[:, None], rows_total)  # [N, Tp]

    def gather(x):  # the sentinel index rows_total points at a zero row
        if x is None:
            return None
        flat = x.reshape(rows_total, *x.shape[2:])
        return torch.cat([flat, x.new_zeros((1,) + x.shape[2:])])[index]  # [N, Tp, H, *]

    def unpad(o):  # [N, Tp, H, *] -> [B, T, H, *] (B = 1 with cu_seqlens)
        return o[valid].reshape(B, T, *o.shape[2:])

    return [gather(x) for x in tensors], unpad


def to_chunks(x: torch.Tensor, C: int, dtype) -> torch.Tensor:
    """[N, Tp, H, *] -> [N, H, NC, C, *] in the compute dtype, contiguous for batched matmuls."""
    N, Tp, H = x.shape[:3]
    return x.to(dtype).reshape(N, Tp // C, C, H, *x.shape[3:]).movedim(3, 1).contiguous()


def from_chunks(x: torch.Tensor) -> torch.Tensor:
    """[N, H, NC, C, *] -> [N, Tp, H, *]."""
    N, H, NC, C = x.shape[:4]
    return x.movedim(1, 3).reshape(N, NC * C, H, *x.shape[4:])
