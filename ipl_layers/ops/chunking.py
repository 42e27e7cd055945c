"""Sequence padding and chunk layout shared by the chunked torch paths.

Sequences are padded to [N, Tp, H, *] with Tp a multiple of the chunk size (zeros in the padding: the
chunked ops choose their inputs so that zero tokens leave the state untouched), then viewed per chunk as
[N, H, NC, C, *] for batched matmuls.
"""

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def pad_sequences(
    tensors: Sequence[Optional[torch.Tensor]], cu_seqlens: Optional[torch.Tensor], chunk_size: int
) -> Tuple[List[Optional[torch.Tensor]], Callable[[torch.Tensor], torch.Tensor]]:
    """[B, T, H, *] tensors (or packed [1, T, H, *] with cu_seqlens; None passes through) -> [N, Tp, H, *]
    with Tp a multiple of `chunk_size` (at least one chunk, so T = 0 passes the state on), and the inverse
    for outputs."""
    T = next(x for x in tensors if x is not None).shape[1]
    if cu_seqlens is None:
        Tp = max(-(-T // chunk_size), 1) * chunk_size
        pad = lambda x: x if x is None or Tp == T else F.pad(x, (0, 0) * (x.dim() - 2) + (0, Tp - T))  # noqa: E731
        return [pad(x) for x in tensors], lambda o: o[:, :T]
    offsets = cu_seqlens.to(torch.long)
    lengths = offsets[1:] - offsets[:-1]  # [N]
    Tp = max(-(-int(lengths.max()) // chunk_size) * chunk_size, chunk_size) if lengths.numel() else chunk_size
    pos = torch.arange(Tp, device=cu_seqlens.device)  # [Tp]
    valid = pos[None, :] < lengths[:, None]  # [N, Tp]
    index = torch.where(valid, offsets[:-1, None] + pos[None, :], T)  # [N, Tp]; T points at a zero row

    def gather(x):
        if x is None:
            return None
        rows = torch.cat([x[0], x.new_zeros((1,) + x.shape[2:])])  # [T + 1, H, *]
        return rows[index]  # [N, Tp, H, *]

    def unpad(o):  # [N, Tp, H, *] -> [1, T, H, *]
        return o[valid][None]

    return [gather(x) for x in tensors], unpad


def to_chunks(x: torch.Tensor, C: int, dtype) -> torch.Tensor:
    """[N, Tp, H, *] -> [N, H, NC, C, *] in the compute dtype, contiguous for batched matmuls."""
    N, Tp, H = x.shape[:3]
    return x.to(dtype).reshape(N, Tp // C, C, H, *x.shape[3:]).movedim(3, 1).contiguous()


def from_chunks(x: torch.Tensor) -> torch.Tensor:
    """[N, H, NC, C, *] -> [N, Tp, H, *]."""
    N, H, NC, C = x.shape[:4]
    return x.movedim(1, 3).reshape(N, NC * C, H, *x.shape[4:])
