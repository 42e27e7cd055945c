"""Product-key search (Lample et al. 2019) and the product-key memory read built on it.

Per head h, the N = n^2 memory slots are indexed by pairs (i, j) of sub-keys from two sets of n sub-keys
(keys[h, 0], keys[h, 1], each [n, Dk / 2]); slot i * n + j has the score <q1, c1_i> + <q2, c2_j> for the query
split into halves q = [q1, q2]. The top-k slots of that sum always lie among the k x k pairs of each half's
own top-k, so the search costs 2 n + k^2 scores instead of n^2:

    s1, s2 = q1 C1^T, q2 C2^T                     [*, n] each
    (a, i), (b, j) = topk(s1, k), topk(s2, k)      the k best of each half
    scores, slots = topk(a_u + b_v over u, v), indices i_u * n + j_v

`product_key_memory` then reads `embedding_bag(slots, softmax(scores), values)` with every head's k slots in
one bag (the heads' reads are summed). Gradients reach the query and the sub-keys through the selected
scores (the selection itself is piecewise constant).
"""

from typing import Optional, Tuple

import torch

from ipl_layers._checks import check_positive_int, check_shape, check_tensor
from ipl_layers.backend import resolve_backend
from ipl_layers.ops.embedding_bag import embedding_bag

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
    q1, q2 = query.chunk(2, dim=-1)
    a, i = torch.topk(torch.einsum("...hd,hnd->...hn", q1, keys[:, 0]), topk, dim=-1)  # [*, H, k]
    b, j = torch.topk(torch.einsum("...hd,hnd->...hn", q2, keys[:, 1]), topk, dim=-1)
    cand = (a[..., :, None] + b[..., None, :]).flatten(-2)  # [*, H, k * k]
    slots = (i[..., :, None] * n + j[..., None, :]).flatten(-2)
    scores, best = torch.topk(cand, topk, dim=-1)
    return scores, slots.gather(-1, best)


def product_key_memory(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, topk: int, *,
                       sparse_grad: bool = False, backend: Optional[str] = None) -> torch.Tensor:
    """sum over heads h of sum_k softmax(scores_h)_k values[slot_hk]: [*, H, Dk] -> [*, D].

    Args:
        query, keys, topk: as `product_key_topk`; values: [n^2, D] the value table shared by the heads.
        sparse_grad: a sparse gradient for `values` (see `embedding_bag`).
        backend: "torch" or "reference" for both steps, or "triton": the bag read on the Triton kernels, the
            search on the torch path (einsum and topk, on any device). Default: `IPL_BACKEND`, else "triton" on
            CUDA and "torch" on CPU.
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
    return embedding_bag(slots.flatten(-2), weights.flatten(-2), values, sparse_grad=sparse_grad, backend=name)
