"""Padding masks <-> packed variable-length sequences.

A layer given a [B, T] padding mask (1 keep, 0 pad) packs the kept tokens of every row into one
[1, total, *] sequence with `cu_seqlens` [B+1], runs the op in varlen mode, and scatters the result back
to [B, T, *] with zeros at the padded positions. Each row is one sequence, so its state is row b of the
cache, whatever its padding.
"""

from typing import Tuple

import torch
import torch.nn.functional as F


def check_attention_mask(attention_mask, batch: int, seqlen: int, has_past: bool) -> torch.Tensor:
    """Validates a [B, T'] padding mask and returns its last `seqlen` columns as bool [B, T].

    Without past state T' must equal T; when decoding with a cache the mask covers past and current
    tokens (T' >= T), as `generate` passes it.
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        got = f"{attention_mask.dim()}-D" if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask: expected a 2-D [B, T] padding mask (1 keep, 0 pad), got {got}")
    rows, cols = attention_mask.shape
    if rows != batch:
        raise ValueError(f"attention_mask: expected B = {batch} rows (the batch of hidden_states), got {rows}")
    if cols < seqlen or (cols != seqlen and not has_past):
        need = f">= T = {seqlen} (past + current tokens)" if has_past else f"T = {seqlen}"
        raise ValueError(f"attention_mask: expected {need} columns, got {cols}")
    mask = attention_mask[:, cols - seqlen :]
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("attention_mask: expected a padding mask of 0s and 1s (got other values)")
    return mask.bool()


def unpad(x: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, T, *], bool mask [B, T] -> packed [1, total, *], token indices into B*T [total], cu_seqlens [B+1]."""
    indices = mask.flatten().nonzero().squeeze(1)  # [total]
    cu_seqlens = F.pad(mask.sum(-1).cumsum(0), (1, 0)).to(torch.int32)  # [B+1]
    return x.flatten(0, 1)[indices][None], indices, cu_seqlens


def repad(x: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Packed [1, total, *] -> [B, T, *] with zeros at the positions not in `indices`."""
    out = x.new_zeros((batch * seqlen,) + x.shape[2:])
    return out.index_copy(0, indices, x[0]).unflatten(0, (batch, seqlen))
