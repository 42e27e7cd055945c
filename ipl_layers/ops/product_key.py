"""Product-key search (Lample et al. 2019) and the product-key memory read built on it.

Per head h, the N = n^2 memory slots are indexed by pairs (i, j) of sub-keys from two sets of n sub-keys
(keys[h, 0], keys[h, 1], each [n, Dk / 2]); slot i * n + j has the score <q1, c1_i> + <q2, c2_j> for the query
split into halves q = [q1, q2]. The top-k slots of that sum always lie among the k x k pairs of each half's
own top-k, so the search costs 2 n + k^2 scores instead of n^2:

    s1, s2 = q1 C1^T, q2 C2^T                     [*, n] each
    (a, i), (b, j) = topk(s1, k), topk(s2, k)      the k best of each half, sorted descending
    scores, slots = topk(a_u + b_v over (u, v) in P), indices i_u * n + j_v

and fewer than k^2 pairs need scoring: with a and b sorted, the pair (u, v) is beaten by the (u + 1)(v + 1) pairs
(u' <= u, v' <= v), so it can be among the top k only if (u + 1)(v + 1) <= k. P is that set: 119 pairs for
k = 32 instead of 1024 (about k ln k), so the final top-k reads 9x fewer candidates.

`product_key_memory` then reads `embedding_bag(slots, softmax(scores), values)` with every head's k slots in
one bag (the heads' reads are summed). Gradients reach the query and the sub-keys through the selected
scores (the selection itself is piecewise constant).
"""

import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ipl_layers import _ext
from ipl_layers._checks import check_positive_int, check_shape, check_tensor
from ipl_layers.backend import resolve_backend
from ipl_layers.ops.embedding_bag import embedding_bag, reverse_index
from ipl_layers.ops.sharded_embedding_bag import sharded_embedding_bag

BACKENDS = ("reference", "torch")


def _check_inputs(query, keys, topk):
    """query [*, H, Dk], keys [H, 2, n, Dk / 2], 1 <= topk <= n; returns H, n."""
    if not isinstance(query, torch.Tensor) or query.dim() < 2:
        got = f"{query.dim()}-D" if isinstance(query, torch.Tensor) else type(query).__name__
        raise ValueError(f"query: expected a tensor [*, H, Dk] (at least 2-D), got {got}")
    check_tensor("query", query, query.dim(), "*, H, Dk")
    H, Dk = query.shape[-2:]
    if Dk % 2:
        raise ValueError(f"query: the key dim Dk is split into two halves, so it must be even, got Dk = {Dk}")
    check_tensor("keys", keys, 4, "H, 2, n, Dk / 2", like=query, like_name="query")
    n = keys.shape[2]
    check_shape("keys", keys, (H, 2, n, Dk // 2), "H, 2, n, Dk / 2")
    check_positive_int("topk", topk)
    if topk > n:
        raise ValueError(f"topk: expected at most the number of sub-keys per half n = {n}, got {topk}")
    return H, n


def product_key_topk_reference(query: torch.Tensor, keys: torch.Tensor, topk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Brute force: the score of every one of the n^2 slots, then its top-k (the ground truth for the search)."""
    H, n = _check_inputs(query, keys, topk)
    q1, q2 = query.chunk(2, dim=-1)  # [*, H, Dk / 2] each
    s1 = torch.einsum("...hd,hnd->...hn", q1, keys[:, 0])  # [*, H, n]
    s2 = torch.einsum("...hd,hnd->...hn", q2, keys[:, 1])
    full = (s1[..., :, None] + s2[..., None, :]).flatten(-2)  # [*, H, n * n]: slot i * n + j
    return torch.topk(full, topk, dim=-1)


def product_key_topk(query: torch.Tensor, keys: torch.Tensor, topk: int, *,
                     backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The top-k memory slots per head by product-key search (module docstring).

    Args:
        query: [*, H, Dk] (Dk even); keys: [H, 2, n, Dk / 2] the two sub-key sets per head; topk: k <= n.
        backend: "torch" (the CPU path) or "reference" (brute force over n^2 slots).

    Returns:
        scores [*, H, k] (descending, differentiable in query and keys) and slots [*, H, k] int64 in [0, n^2).
    """
    H, n = _check_inputs(query, keys, topk)
    name = resolve_backend("product_key_topk", backend, query.device, BACKENDS)
    if name == "reference":
        return product_key_topk_reference(query, keys, topk)
    lead, M = query.shape[:-2], math.prod(query.shape[:-2])
    # head-major [H, M, Dk / 2] halves: the scores come out of bmm as contiguous [H, M, n] rows for the top-k
    q1, q2 = (x.reshape(M, H, x.shape[-1]).transpose(0, 1) for x in query.chunk(2, dim=-1))
    with torch.no_grad():  # the search; gradients reach the k selected scores only (SelectedScoresFunction)
        a, i = _topk(torch.bmm(q1, keys[:, 0].transpose(1, 2)), topk)  # [H, M, k], descending
        b, j = _topk(torch.bmm(q2, keys[:, 1].transpose(1, 2)), topk)
        u, v = _candidate_pairs(topk, query.device)  # [P] each
        best = _topk(a[..., u] + b[..., v], topk)[1]  # of the [H, M, P] candidates
        u, v = u[best], v[best]  # [H, M, k] per-half ranks of the winners
        rows1, rows2 = i.gather(-1, u), j.gather(-1, v)  # [H, M, k] sub-key indices
        a, b = a.gather(-1, u), b.gather(-1, v)  # their half scores: a + b is the candidates' sum, bit for bit
    scores = _selected_scores(q1, keys[:, 0], rows1, a) + _selected_scores(q2, keys[:, 1], rows2, b)
    return tuple(x.transpose(0, 1).reshape(*lead, H, topk) for x in (scores, rows1 * n + rows2))


def _selected_scores(q: torch.Tensor, subkeys: torch.Tensor, rows: torch.Tensor, values: torch.Tensor):
    """<q[h, m], subkeys[h, rows[h, m, t]]> [H, M, k], differentiable in q and subkeys, with the values the
    search already computed: q [H, M, d], subkeys [H, n, d], rows [H, M, k]."""
    H, n, d = subkeys.shape
    k = rows.shape[-1]
    flat = (rows + torch.arange(H, device=rows.device)[:, None, None] * n).reshape(-1, k)  # [H * M, k] of [H * n]
    out = SelectedScoresFunction.apply(q.reshape(-1, d), subkeys.reshape(H * n, d), flat, values.reshape(-1, k))
    return out.view_as(values)


class SelectedScoresFunction(torch.autograd.Function):
    """scores[b, t] = <q[b], table[idx[b, t]]> for the few selected rows, forward values given (the search
    computed them). The backward is two bags over the small sub-key table instead of the dense [*, n] score
    gradient and two [M, n] x [n, d] matmuls: dq[b] = sum_t g[b, t] table[idx[b, t]] and, through the
    reverse index (deterministic), dtable[r] = sum over (b, t) with idx[b, t] = r of g[b, t] q[b]."""

    @staticmethod
    def forward(ctx, q, table, idx, values):  # q [M, d], table [R, d], idx [M, k], values [M, k]
        ctx.save_for_backward(q, table, idx)
        return values.clone()

    @staticmethod
    def backward(ctx, g):  # g [M, k]
        q, table, idx = ctx.saved_tensors
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        g = g.to(acc)
        dq = dtable = None
        if ctx.needs_input_grad[0]:
            dq = F.embedding_bag(idx, table.to(acc), per_sample_weights=g, mode="sum").to(q.dtype)
        if ctx.needs_input_grad[1]:
            k = idx.shape[1]
            rows, order, offsets = reverse_index(idx.reshape(-1), k)
            per_row = F.embedding_bag(order // k, q.to(acc), offsets, per_sample_weights=g.reshape(-1)[order],
                                      mode="sum")
            dtable = per_row.new_zeros(table.shape).index_copy_(0, rows, per_row).to(table.dtype)
        return dq, dtable, None, None


def _topk(x: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """torch.topk over the last dim (sorted descending); fp32 CPU rows go to the C++ scan when it is built (for
    k = 32 of a few hundred scores per row it beats torch's general selection; ties keep the earlier index)."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() and _ext.available():
        values, indices = _ext.topk_rows(x.reshape(-1, x.shape[-1]), k)
        return values.view(*x.shape[:-1], k), indices.view(*x.shape[:-1], k)
    return torch.topk(x, k, dim=-1)


_PAIRS = {}


def _candidate_pairs(k: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The pairs (u, v) of sorted per-half ranks with (u + 1)(v + 1) <= k (module docstring), as two index
    vectors [P]; cached per (k, device)."""
    key = (k, device)
    if key not in _PAIRS:
        pairs = [(u, v) for u in range(k) for v in range(k // (u + 1))]
        _PAIRS[key] = tuple(torch.tensor(c, dtype=torch.long, device=device) for c in zip(*pairs))
    return _PAIRS[key]


def product_key_memory(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, topk: int, *,
                       sparse_grad: bool = False, backend: Optional[str] = None,
                       values_group: Optional["dist.ProcessGroup"] = None) -> torch.Tensor:
    """sum over heads h of sum_k softmax(scores_h)_k values[slot_hk]: [*, H, Dk] -> [*, D].

    Args:
        query, keys, topk: as `product_key_topk`; values: [n^2, D] the value table shared by the heads.
        sparse_grad: a sparse gradient for `values` (see `embedding_bag`).
        backend: "torch" or "reference" for both steps, or "triton": the bag read on the Triton kernels, the
            search on the torch path (einsum and topk, on any device). Default: `IPL_BACKEND`, else "triton" on
            CUDA and "torch" on CPU.
        values_group: the process group whose ranks each hold a column shard of the table: `values` is then this
            rank's [n^2, D_r] and the read is `sharded_embedding_bag`'s (None: `values` is the whole table).
    """
    H, n = _check_inputs(query, keys, topk)
    check_tensor("values", values, 2, "N, D", like=query, like_name="query")
    if values.shape[0] != n * n:
        raise ValueError(f"values: expected N = n^2 = {n * n} rows (n = {n} sub-keys per half), "
                         f"got {values.shape[0]}")
    name = resolve_backend("product_key_memory", backend, query.device, BACKENDS + ("triton",))
    scores, slots = product_key_topk(query, keys, topk, backend="torch" if name == "triton" else name)
    acc = torch.float64 if scores.dtype == torch.float64 else torch.float32
    weights = torch.softmax(scores, dim=-1, dtype=acc).to(scores.dtype)  # [*, H, k]
    if values_group is not None:
        return sharded_embedding_bag(slots.flatten(-2), weights.flatten(-2), values, group=values_group,
                                     sparse_grad=sparse_grad, backend=name)
    return embedding_bag(slots.flatten(-2), weights.flatten(-2), values, sparse_grad=sparse_grad, backend=name)
