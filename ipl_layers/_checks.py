"""Input validation shared by every op: errors name the argument, what was expected and what came."""

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fmt(shape: Sequence) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def check_tensor(
    name: str, x, ndim: int, dims: str, *, like: Optional[torch.Tensor] = None, like_name: str = "q", floating: bool = True
):
    """`x` is a tensor of rank `ndim` (named dims `dims`, e.g. "B, T, H, K"), on the device of `like`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor [{dims}], got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim}-D [{dims}], got {x.dim()}-D with shape {_fmt(x.shape)}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype (float16/bfloat16/float32/float64), got {x.dtype}")
    if like is not None and x.device != like.device:
        raise ValueError(f"{name}: expected device {like.device} (the device of {like_name}), got {x.device}")


def check_shape(name: str, x: torch.Tensor, expected: Sequence[int], dims: str):
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape [{dims}] = {_fmt(expected)}, got {_fmt(x.shape)}")


def check_qkv(q, k, v, *, same_kv: bool = False):
    """q, k [B, T, H, K] and v [B, T, H, V] (V == K with `same_kv`), one dtype and device; returns B, T, H, K, V."""
    check_tensor("q", q, 4, "B, T, H, K")
    B, T, H, K = q.shape
    check_tensor("k", k, 4, "B, T, H, K", like=q)
    check_shape("k", k, (B, T, H, K), "B, T, H, K")
    check_tensor("v", v, 4, "B, T, H, V", like=q)
    V = K if same_kv else v.shape[-1]
    check_shape("v", v, (B, T, H, V), "B, T, H, V (V == K)" if same_kv else "B, T, H, V")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k, v: expected the dtype of q ({q.dtype}), got k {k.dtype}, v {v.dtype}")
    return B, T, H, K, V


def check_positive_int(name: str, x):
    if not isinstance(x, int) or x < 1:
        raise ValueError(f"{name}: expected a positive int, got {x!r}")


def check_cu_seqlens(
    cu_seqlens: Optional[torch.Tensor], batch: int, total: int, device: torch.device, like_name: str = "q"
) -> int:
    """Validates `cu_seqlens` and returns the number of sequences N (N = B without it)."""
    if cu_seqlens is None:
        return batch
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
        got = f"{cu_seqlens.dim()}-D" if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise ValueError(f"cu_seqlens: expected a 1-D integer tensor [N+1], got {got}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens: expected dtype int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens: expected device {device} (the device of {like_name}), got {cu_seqlens.device}")
    if batch != 1:
        raise ValueError(f"cu_seqlens: requires batch size B == 1 (sequences packed along T), got B = {batch}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected at least 2 entries [N+1], got {cu_seqlens.numel()}")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens: expected to start at 0, got {offsets[0]}")
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets, got {offsets}")
    if offsets[-1] != total:
        raise ValueError(f"cu_seqlens: expected to end at T = {total}, got {offsets[-1]}")
    return len(offsets) - 1


def sequence_spans(batch: int, total: int, cu_seqlens: Optional[torch.Tensor]):
    """(batch row, start, end) of every sequence: one per row, or the packed ones of `cu_seqlens`."""
    if cu_seqlens is None:
        return [(b, 0, total) for b in range(batch)]
    offsets = cu_seqlens.tolist()
    return [(0, offsets[n], offsets[n + 1]) for n in range(len(offsets) - 1)]
