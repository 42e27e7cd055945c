"""Per-key (GLA) intra-chunk form of the torch path for strong decay: sub-chunks, every exponent <= 0.

Used when some chunk's log-decay spans more than the one-matmul form allows. A chunk of C positions
splits into n sub-chunks of s: between sub-chunks both factors are taken against a reference point (the
log-decay r_I at the end of the sub-chunk before query sub-chunk I), inside one the [s, s, K] decays are
explicit. A_ij = sum_k q_ik k_jk exp(b_ik - b_jk), lower triangular, unscaled.
"""

import math

import torch

SUB = 8  # sub-chunk length: balances the [n, C, K] and [n, s, s, K] factor tensors (s ~ sqrt(C))


def _blocks(x: torch.Tensor, n: int, s: int) -> torch.Tensor:
    """[.., C, *] -> [.., n, s, *]."""
    return x.reshape(*x.shape[:-2], n, s, x.shape[-1])


def _unblock(x: torch.Tensor) -> torch.Tensor:
    """[.., n, s, K] -> [.., C, K]."""
    return x.reshape(*x.shape[:-3], x.shape[-3] * x.shape[-2], x.shape[-1])


def _factors(b: torch.Tensor, C: int):
    """qf [.., n, s, K] = exp(b_i - r_I); kf [.., n, C, K] = exp(r_I - b_j) for j before sub-chunk I (0
    elsewhere); ef [.., n, s, s, K] = exp(b_i - b_j) for j <= i inside sub-chunk I (0 elsewhere)."""
    s = math.gcd(SUB, C)
    n = C // s
    bs = _blocks(b, n, s)  # [.., n, s, K]
    ref = torch.cat([torch.zeros_like(b[..., :1, :]), b[..., s - 1 : C - 1 : s, :]], dim=-2)  # [.., n, K]
    qf = (bs - ref[..., :, None, :]).exp()
    before = torch.arange(C, device=b.device)[None, :] < (torch.arange(n, device=b.device) * s)[:, None]  # [n, C]
    kexp = ref[..., :, None, :] - b[..., None, :, :]  # [.., n, C, K]
    kf = torch.where(before[:, :, None], kexp, float("-inf")).exp()
    causal = torch.ones(s, s, dtype=torch.bool, device=b.device).tril()[:, :, None]  # [s, s, 1]
    ef = torch.where(causal, bs[..., :, None, :] - bs[..., None, :, :], float("-inf")).exp()
    return qf, kf, ef, s, n


def intra(q: torch.Tensor, k: torch.Tensor, b: torch.Tensor, C: int) -> torch.Tensor:
    """A [N, H, NC, C, C] from q, k, b [N, H, NC, C, K]."""
    qf, kf, ef, s, n = _factors(b, C)
    qb, kb = _blocks(q, n, s), _blocks(k, n, s)
    ks = k[..., None, :, :] * kf  # [.., n, C, K]
    A = ((qb * qf) @ ks.transpose(-1, -2)).reshape(*q.shape[:-2], C, C)  # blocks before the diagonal
    diag = (qb[..., :, None, :] * kb[..., None, :, :] * ef).sum(-1)  # [.., n, s, s]
    torch.diagonal(A.view(*A.shape[:-2], n, s, n, s), dim1=-4, dim2=-2).copy_(diag.movedim(-3, -1))
    return A


def intra_grads(q, k, b, C, dA):
    """Gradients of q and k [N, H, NC, C, K] through `intra`, given dA [.., C, C] (lower triangular)."""
    qf, kf, ef, s, n = _factors(b, C)
    qb, kb = _blocks(q, n, s), _blocks(k, n, s)
    dAb = dA.reshape(*dA.shape[:-2], n, s, C)  # [.., n, s, C]; kf is 0 on the diagonal blocks
    dq = (dAb @ (k[..., None, :, :] * kf)) * qf  # [.., n, s, K]
    dk = ((dAb.transpose(-1, -2) @ (qb * qf)) * kf).sum(-3)  # [.., C, K]
    ddiag = torch.diagonal(dA.reshape(*dA.shape[:-2], n, s, n, s), dim1=-4, dim2=-2).movedim(-1, -3)  # [.., n, s, s]
    w = ddiag[..., None] * ef  # [.., n, s, s, K]
    dq = dq + (w * kb[..., None, :, :]).sum(-2)
    dk = dk + _unblock((w * qb[..., :, None, :]).sum(-3))
    return _unblock(dq), dk
