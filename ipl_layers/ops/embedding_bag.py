"""`embedding_bag`: the weighted sum of selected value rows, the read of the sparse key-value memory layers.

    out[b] = sum_j weights[b, j] * values[indices[b, j]]          (a bag of n rows per leading index b)

Its backward gives the weights' gradient, dweights[b, j] = <dout[b], values[indices[b, j]]>, and the value
table's, dvalues[r] = sum over the (b, j) with indices[b, j] = r of weights[b, j] * dout[b]. The table can have
millions of rows of which a batch touches few, so that gradient is accumulated deterministically through a
reverse index (the (b, j) sorted by row, stably: each row's contributions are summed in one fixed order, with
no atomics) and can be returned as a sparse row set (`sparse_grad=True`, as `nn.Embedding(sparse=True)`), so a
dense [N, D] gradient never exists.

This module holds the reference, the input checks, the torch and Triton paths' autograd Functions and the
dispatch.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ipl_layers import _ext
from ipl_layers._checks import FLOAT_DTYPES, _fmt
from ipl_layers.backend import resolve_backend

BACKENDS = ("reference", "torch", "cpp", "triton")
GATHER_BLOCK = 1 << 22  # elements of gathered rows at once in the weights' gradient ([bags, n, D] in blocks)


def _check_inputs(indices, weights, values):
    """indices [*, n] int32/int64, weights [*, n] floating, values [N, D] floating, one device; every index in
    [0, N)."""
    for name, x in (("indices", indices), ("weights", weights), ("values", values)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(x).__name__}")
    if values.dim() != 2:
        raise ValueError(f"values: expected 2-D [N, D], got {values.dim()}-D with shape {_fmt(values.shape)}")
    if values.dtype not in FLOAT_DTYPES:
        raise TypeError(f"values: expected a floating dtype (float16/bfloat16/float32/float64), got {values.dtype}")
    if indices.dim() < 1:
        raise ValueError("indices: expected at least 1-D [*, n], got a 0-D tensor")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices: expected dtype int32 or int64, got {indices.dtype}")
    if weights.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weights: expected a floating dtype (float16/bfloat16/float32/float64), got {weights.dtype}")
    if weights.shape != indices.shape:
        raise ValueError(f"weights: expected the shape of indices [*, n] = {_fmt(indices.shape)}, "
                         f"got {_fmt(weights.shape)}")
    for name, x in (("indices", indices), ("weights", weights)):
        if x.device != values.device:
            raise ValueError(f"{name}: expected device {values.device} (the device of values), got {x.device}")
    if indices.numel():
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= values.shape[0]:
            raise ValueError(f"indices: expected values in [0, N = {values.shape[0]}), got min {low}, max {high}")


def embedding_bag_reference(indices: torch.Tensor, weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Bag by bag and row by row, written for clarity; accumulates in float64 for float64 inputs (else fp32)."""
    _check_inputs(indices, weights, values)
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    M, n = math.prod(indices.shape[:-1]), indices.shape[-1]
    idx, w = indices.reshape(M, n), weights.reshape(M, n)
    bags = []
    for b in range(idx.shape[0]):
        out = values[:0].to(acc).sum(0)  # zeros [D] (in the graph of values, so an empty bag has a gradient)
        for j in range(idx.shape[1]):
            out = out + w[b, j].to(acc) * values[idx[b, j]].to(acc)
        bags.append(out)
    out = torch.stack(bags) if bags else values[:0].to(acc)  # no bags: [0, D]
    return out.reshape(*indices.shape[:-1], values.shape[1]).to(values.dtype)


def reverse_index(idx: torch.Tensor, n: int):
    """Flat indices [M * n] -> (rows [U] the distinct rows touched, ascending; order [M * n] the entries sorted
    by row, stably; offsets [U] where each row's run of entries starts in `order`)."""
    sorted_idx, order = torch.sort(idx, stable=True)
    rows, counts = torch.unique_consecutive(sorted_idx, return_counts=True)
    offsets = torch.cumsum(counts, 0) - counts
    return rows, order, offsets


class EmbeddingBagFunction(torch.autograd.Function):
    """The torch path: `F.embedding_bag` (sum with per-sample weights) forward; the backward described in the
    module docstring, for fp32 CPU tensors by the C++ extension's single pass over the reverse index when it is
    built (each touched row read once for both gradients), else by torch ops. With `cpp`, the extension's loops
    (csrc/cpu/embedding_bag.cpp, fp32) run forward and backward."""

    @staticmethod
    def forward(ctx, idx, w, values, sparse_grad, cpp):
        # idx [M, n] int64, w [M, n] in the compute dtype, values [N, D]
        ctx.save_for_backward(idx, w, values)
        ctx.sparse_grad, ctx.cpp = sparse_grad, cpp
        acc = torch.float64 if values.dtype == torch.float64 else torch.float32
        if idx.shape[1] == 0:
            return values.new_zeros(idx.shape[0], values.shape[1])
        if cpp:
            return _ext.embedding_bag_forward(idx, w, values).to(values.dtype)
        if values.dtype == acc:
            out = F.embedding_bag(idx, values, per_sample_weights=w.to(acc), mode="sum")
        else:  # low precision: convert only the rows touched, never the whole table
            rows, inverse = torch.unique(idx, return_inverse=True)
            out = F.embedding_bag(inverse, values[rows].to(acc), per_sample_weights=w.to(acc), mode="sum")
        return out.to(values.dtype)

    @staticmethod
    def backward(ctx, dout):
        idx, w, values = ctx.saved_tensors
        M, n = idx.shape
        N, D = values.shape
        acc = torch.float64 if values.dtype == torch.float64 else torch.float32
        dout = dout.to(acc)
        dw = dvalues = None
        # both gradients from the C++ extension's one pass over the reverse index (each touched row read once):
        # with backend "cpp", and in the torch path for fp32 CPU tensors when the extension is built
        fused = values.device.type == "cpu" and values.dtype == w.dtype == torch.float32 and _ext.available()
        if (ctx.cpp or fused) and n:
            rows, order, offsets = reverse_index(idx.reshape(-1), n)
            dw, per_row = _ext.embedding_bag_backward(idx, w, values, dout, order, offsets)
            return None, dw.to(w.dtype), _table_grad(rows, per_row.to(values.dtype), N, D, ctx.sparse_grad), None, None
        if ctx.needs_input_grad[1] and values.dtype == acc and n:
            # torch's per-sample-weights backward: one dot per (bag, slot) straight from the table, no gathered copy
            # (3x faster on CPU than the blocked gather below at M = 4096, n = 128, D = 256)
            flat = idx.reshape(-1)
            dw = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                dout, values, flat, torch.arange(0, M * n, n, device=idx.device),
                torch.arange(M, device=idx.device).repeat_interleave(n), 0, -1).view(M, n).to(w.dtype)
        elif ctx.needs_input_grad[1]:  # low precision (or n = 0): gather blocks of rows, convert only those
            dw = w.new_empty(M, n, dtype=acc)
            block = max(1, GATHER_BLOCK // max(1, n * D))  # bags per block: [block, n, D] gathered at a time
            for s in range(0, M, block):
                rows = values[idx[s:s + block]].to(acc)  # [block, n, D]
                dw[s:s + block] = (rows @ dout[s:s + block, :, None])[..., 0]
            dw = dw.to(w.dtype)
        if ctx.needs_input_grad[2]:
            rows, order, offsets = reverse_index(idx.reshape(-1), n)
            # each touched row sums w * dout of its (bag, slot) entries, in the stable order: a bag over dout
            per_row = (F.embedding_bag(order // n, dout, offsets, per_sample_weights=w.reshape(-1)[order].to(acc),
                                       mode="sum") if rows.numel() else dout.new_zeros(0, D)).to(values.dtype)
            dvalues = _table_grad(rows, per_row, N, D, ctx.sparse_grad)
        return None, dw, dvalues, None, None


class EmbeddingBagTritonFunction(torch.autograd.Function):
    """The Triton path (kernels/memory/): the bag forward; backward over the same reverse index, the value
    table's kernel also giving the weights' gradient when both are needed (one pass instead of two)."""

    @staticmethod
    def forward(ctx, idx, w, values, sparse_grad):
        # idx [M, n] int32/int64, w [M, n], values [N, D]; all contiguous
        from ipl_layers.kernels import memory as kern

        ctx.save_for_backward(idx, w, values)
        ctx.sparse_grad = sparse_grad
        return kern.embedding_bag_fwd(idx, w, values)

    @staticmethod
    def backward(ctx, dout):
        from ipl_layers.kernels import memory as kern

        idx, w, values = ctx.saved_tensors
        N, D = values.shape
        dout = dout.contiguous()
        dw = dvalues = None
        if ctx.needs_input_grad[2]:
            rows, order, offsets = reverse_index(idx.reshape(-1), idx.shape[1])
            rows = rows.long()  # int32 indices give int32 rows; the table's gradient indexes with int64
            per_row, dw = kern.embedding_bag_bwd_values(w.reshape(-1), values, dout, rows, order, offsets,
                                                        with_dw=ctx.needs_input_grad[1])
            dvalues = _table_grad(rows, per_row, N, D, ctx.sparse_grad)
        elif ctx.needs_input_grad[1]:
            dw = kern.embedding_bag_bwd_weights(idx, values, dout, w.dtype)
        return None, None if dw is None else dw.to(w.dtype).view_as(w), dvalues, None


def _table_grad(rows: torch.Tensor, per_row: torch.Tensor, N: int, D: int, sparse: bool) -> torch.Tensor:
    """The touched rows' gradients [U, D] (rows ascending, distinct) as the table's [N, D] gradient: sparse COO
    (coalesced by construction) or dense (written once per row: no accumulation)."""
    if sparse:
        return torch.sparse_coo_tensor(rows[None], per_row, (N, D), is_coalesced=True, check_invariants=False)
    return per_row.new_zeros(N, D).index_copy_(0, rows, per_row)


def embedding_bag(
    indices: torch.Tensor,
    weights: torch.Tensor,
    values: torch.Tensor,
    *,
    sparse_grad: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """out[b] = sum_j weights[b, j] * values[indices[b, j]].

    Args:
        indices: [*, n] int32/int64 rows of `values`, each in [0, N) (repeats allowed).
        weights: [*, n] their weights (e.g. the softmax over the selected scores); differentiable.
        values: [N, D] the value table; differentiable.
        sparse_grad: give `values` a sparse COO gradient holding only the rows touched (coalesced), as
            `nn.Embedding(sparse=True)` does: for tables too large for a dense gradient (use an optimizer that
            takes sparse gradients, e.g. `torch.optim.SparseAdam`).
        backend: "torch" (CPU path), "cpp" (the C++ extension's OpenMP loops; CPU, computes in fp32), "triton"
            (the kernels of kernels/memory/; CUDA, or CPU under TRITON_INTERPRET=1) or "reference". Default:
            `IPL_BACKEND`, else "triton" on CUDA and "torch" on CPU.

    Returns:
        [*, D] in the dtype of values (accumulated in fp32, float64 for float64 values).
    """
    _check_inputs(indices, weights, values)
    name = resolve_backend("embedding_bag", backend, values.device, BACKENDS)
    if name == "reference":
        return embedding_bag_reference(indices, weights, values)
    if name == "cpp":
        if values.device.type != "cpu":
            raise ValueError(f"embedding_bag: backend 'cpp' runs on CPU tensors, got device {values.device}")
        if torch.float64 in (values.dtype, weights.dtype):
            raise ValueError("embedding_bag: backend 'cpp' computes in fp32; use backend='torch' for float64")
    M, n = math.prod(indices.shape[:-1]), indices.shape[-1]  # bags, rows per bag (either may be 0)
    if name == "triton":
        out = EmbeddingBagTritonFunction.apply(indices.reshape(M, n).contiguous(), weights.reshape(M, n).contiguous(),
                                               values.contiguous(), sparse_grad)
        return out.reshape(*indices.shape[:-1], values.shape[1])
    out = EmbeddingBagFunction.apply(indices.reshape(M, n).long(), weights.reshape(M, n), values, sparse_grad,
                                     name == "cpp")
    return out.reshape(*indices.shape[:-1], values.shape[1])
