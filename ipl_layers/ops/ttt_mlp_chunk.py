"""Torch path of `ttt_mlp`: the dual form of mini-batch gradient descent applied layer by layer, the CPU
path, with a hand-written backward (`ttt_mlp_chunk_bwd.py`).

Sequences come padded to [N, Tp, H, *] so that mini-batches are the chunks of C tokens (eta = 0 in the
padding adds nothing to the sums). Per (sequence, head), chunk c with start weights (W1, b1, W2, b2), the
keys' forward and the closed-form inner gradients at those weights (rows are tokens, L = tril(ones)):

    Z1 = K W1 + b1,  X2 = gelu(Z1),  Z2 = X2 W2 + b2,  G2 = dl/dZ2 (through the LN),  G1 = (G2 W2^T) * gelu'(Z1)

Position i's weights are W1_i = W1 - s_i sum_{j<=i} eta_j k_j^T G1_j (b1_i likewise without k_j), so its first
layer is Q W1_i + b1_i = Q W1 + b1 - s * ((tril(Q K^T) + L) (eta G1)); with X2q = gelu(that), the second
layer follows in the same way from X2q and the keys' X2: X2q W2 + b2 - s * ((tril(X2q X2^T) + L) (eta G2)).
This is exact (each layer's weights at position i are linear in the gradient sums), and no [C, K, F]
per-position weights exist. The open mini-batch's sums S (chunk 0 only) enter as - s * (Q S_W1 + S_b1) and
- s * (X2q S_W2 + S_b2); the update at the chunk's end is theta - s_C (sums).

Both sides of a chunk run in the loop while its start weights are in cache (stacking every chunk's weights
for a batched query side measured slower and held [NC, K, F] weights: 580 MiB at T = 4096); only
tril(Q K^T) runs for all chunks at once. No weights but each sequence's final ones are kept.
"""

import math
from typing import List, NamedTuple, Optional

import torch
import torch.nn.functional as F

from ipl_layers.ops.ttt_linear_chunk import LN_EPS, grid, ln_l2_grad, per_row, ungrid

GELU_C, GELU_A = math.sqrt(2 / math.pi), 0.044715


def gelu_and_slope(z: torch.Tensor):
    """The tanh-approximated GELU (as `F.gelu(approximate="tanh")`) and its derivative, in few ops (they run once
    per chunk): with u = tanh(c (z + a z^3)), gelu = z (1 + u) / 2 and
    gelu' = (1 + u) / 2 + (c / 2) z (1 - u^2) (1 + 3 a z^2)."""
    z2 = z * z
    u = torch.tanh(torch.addcmul(z, z2, z, value=GELU_A).mul_(GELU_C))
    half = torch.add(u, 1).mul_(0.5)  # (1 + u) / 2
    poly = torch.mul(z2, 3 * GELU_A).add_(1)  # 1 + 3 a z^2
    return z * half, torch.addcmul(half, torch.rsub(u * u, 1).mul_(z), poly, value=GELU_C / 2)


class Saved(NamedTuple):
    """What the backward needs: chunk-major operands [NC, NH, ...] in the compute dtype, and per chunk its
    start weights and pre-activations."""

    qk: torch.Tensor  # [NC, NH, 2C, K]: rows q then k of each chunk
    t: torch.Tensor  # [NC, NH, C, K]: the target, v - k with the residual, else v
    e: torch.Tensor  # [NC, NH, C, 1]: eta
    P1: torch.Tensor  # [NC, NH, C, C]: tril(Q K^T) + tril(ones)
    thetas: List[List[torch.Tensor]]  # NC + 1 entries (W1, b1, W2, b2): the weights chunk c starts from
    Z1: List[torch.Tensor]  # NC x [NH, 2C, F]: [Q; K] W1 + b1
    Z1q: List[torch.Tensor]  # NC x [NH, C, F]: the queries' first-layer pre-activations
    xo: Optional[torch.Tensor]  # [NC, NH, C, K]: the normalised output pre-activation (with LN)
    ro: Optional[torch.Tensor]  # [NC, NH, C, 1]: its 1 / sigma
    open_sums: List[torch.Tensor]  # the open mini-batch's sums before chunk 0, [NH, ...]
    gamma: torch.Tensor  # [NH, 1, K]
    beta: torch.Tensor  # [NH, 1, K]
    s: torch.Tensor  # [NH, C, 1]


def chunk_forward(q, k, v, eta, ln_weight, ln_bias, scale, weights, sums, last, C, use_ln, use_residual,
                  save=False):
    """Padded inputs -> (o [N, Tp, H, K] in v.dtype, the state at chunk `last` per sequence as the 8 tensors
    W1, b1, W2, b2, sum_W1, sum_b1, sum_W2, sum_b2).

    q, k, v [N, Tp, H, K]; eta [N, Tp, H]; ln_weight, ln_bias [H, K]; scale [H, C]; weights (W1 [N, H, K, F],
    b1 [N, H, F], W2 [N, H, F, K], b2 [N, H, K]) and sums likewise (the open mini-batch before chunk 0); last
    [N] int64 in [0, NC]. With `save`, also returns the `Saved` for the backward (else None)."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    N, Tp, H, K = q.shape
    NC, NH = Tp // C, N * H

    def chunked(x):  # [N, Tp, H, *] -> [NC, NH, C, *] in dt
        return grid(x.to(dt), C).flatten(1, 2)

    def rows(x):  # [N, H, *] -> [NH, 1 or *, *]: biases become one row that broadcasts over the tokens
        x = x.to(dt).flatten(0, 1)
        return x[:, None] if x.dim() == 2 else x

    qc, kc, vc, ec = chunked(q), chunked(k), chunked(v), chunked(eta[..., None])  # [NC, NH, C, K or 1]
    target = vc - kc if use_residual else vc
    gamma, beta = (per_row(x, N, dt)[:, None] for x in (ln_weight, ln_bias))  # [NH, 1, K]
    target_term, gamma_sq = (beta - target) * gamma, gamma * gamma
    s = per_row(scale, N, dt)[..., None]  # [NH, C, 1]
    s_end = s[:, -1:]  # [NH, 1, 1]: every chunk but a sequence's last is full; nothing reads past that one
    theta = [rows(x) for x in weights]  # W1 [NH, K, F], b1 [NH, 1, F], W2 [NH, F, K], b2 [NH, 1, K]
    open_sums = [rows(x) for x in sums]
    qk = torch.cat([qc, kc], 2)  # [NC, NH, 2C, K]: one matmul gives both sides' first layer
    # tril(Q K^T) plus the bias's cumsum (tril of ones), for all chunks at once: [NC, NH, C, C]
    causal = torch.ones(C, C, dtype=dt, device=q.device).tril_()
    P1 = (qc @ kc.mT).tril_() + causal
    wanted = {int(c) for c in last}  # the chunks some sequence's final state starts at
    kept, Z2qs, thetas, Z1s, Z1qs = {}, [], [theta], [], []
    t = target_term if use_ln else target
    for c, (qk_c, k_c, e_c, t_c, P1_c) in enumerate(zip(qk, kc, ec, t, P1)):
        W1, b1, W2, b2 = theta
        Z1 = torch.baddbmm(b1, qk_c, W1)  # [NH, 2C, F]: rows q then k
        X2, slope = gelu_and_slope(Z1[:, C:])  # the keys' side at the start weights: [NH, C, F]
        Z2 = torch.baddbmm(b2, X2, W2)  # [NH, C, K]
        if use_ln:
            f = ln_l2_grad(Z2, t_c, gamma_sq)
            G2 = f.g * f.r
        else:
            G2 = Z2 - t_c
        eG2 = e_c * G2  # [NH, C, K]
        eG1 = (e_c * slope) * (G2 @ W2.mT)  # [NH, C, F]
        grads = [k_c.mT @ eG1, eG1.sum(1, keepdim=True), X2.mT @ eG2, eG2.sum(1, keepdim=True)]

        # the queries, layer by layer from the same start weights
        Z1q = Z1[:, :C] - s * (P1_c @ eG1)  # [NH, C, F]
        if c == 0:
            Z1q = Z1q - s * (qk_c[:, :C] @ open_sums[0] + open_sums[1])
        X2q = F.gelu(Z1q, approximate="tanh")
        P2 = (X2q @ X2.mT).tril_().add_(causal)  # [NH, C, C]
        Z2q = torch.baddbmm(b2, X2q, W2) - s * (P2 @ eG2)  # [NH, C, K]
        if c == 0:
            Z2q = Z2q - s * (X2q @ open_sums[2] + open_sums[3])
            grads = [g + S for g, S in zip(grads, open_sums)]
        Z2qs.append(Z2q)
        if c in wanted:
            kept[c] = (theta, grads)
        theta = [w - s_end * g for w, g in zip(theta, grads)]
        if save:
            thetas.append(theta)
            Z1s.append(Z1)
            Z1qs.append(Z1q)
    out = torch.stack(Z2qs)  # [NC, NH, C, K]
    del Z2qs
    xo = ro = None
    if use_ln:
        xo, _, ro = torch.native_layer_norm(out, (K,), None, None, LN_EPS)
        out = torch.addcmul(beta, xo, gamma)
    o = ungrid(out + qc if use_residual else out, N).to(v.dtype)  # [N, Tp, H, K]

    # each sequence's state: the weights chunk last[n] starts from and that chunk's sums (zero past the end)
    kept[NC] = (theta, [torch.zeros_like(x) for x in theta])
    final = []
    for part in range(2):
        for i, shape in enumerate(w.shape for w in weights):
            rows_n = [kept[int(c)][part][i].unflatten(0, (N, H))[n] for n, c in enumerate(last)]
            final.append(torch.stack(rows_n).reshape(shape) if N else theta[i].new_zeros(shape))
    saved = Saved(qk, target, ec, P1, thetas, Z1s, Z1qs, xo, ro, open_sums, gamma, beta, s) if save else None
    return o, final, saved
