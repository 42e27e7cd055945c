"""Torch path of `ttt_linear`: the dual form of mini-batch gradient descent, the CPU path (autograd backward).

Sequences are padded to [N, Tp, H, *] with Tp a multiple of the mini-batch size b (zero q/k/v and eta in
the padding: eta = 0 adds nothing to the weights' update). Inside a mini-batch with start weights W0, b0
(per head; positions i, j = 1..b), every gradient is taken at W0:

    Z = K W0 + b0,      G = dl/dZ  (closed form through the layer norm, `ln_l2_grad`)
    X_i = q_i W_i + b_i = q_i W0 + b0 - s_i (sum_{j<=i} eta_j (q_i . k_j) G_j + sum_{j<=i} eta_j G_j)
        = [Q W0 + b0 - s * (tril(Q K^T) (eta G) + cumsum(eta G))]_i
    W_end = W0 - s_L K^T (eta G),   b_end = b0 - s_L sum_j eta_j G_j   (L the mini-batch's last real position)

(without bias b = 0 and the cumsum term drops), so no [b, K, K] per-position weights exist. Only Z, G and
the weight update run mini-batch after mini-batch (G depends on W0 non-linearly); Q W0, the tril(Q K^T)
products and the output layer norm run for all mini-batches at once on the stacked start weights.
"""

from typing import Optional, Tuple

import torch

from ipl_layers.ops.chunking import from_chunks, to_chunks

LN_EPS = 1e-6


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """LN over the last dim (biased variance, eps `LN_EPS`) with per-head weight/bias broadcast onto x."""
    mu = x.mean(-1, keepdim=True)
    xc = x - mu
    var = (xc * xc).mean(-1, keepdim=True)
    return xc * torch.rsqrt(var + LN_EPS) * weight + bias


def ln_l2_grad(z: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """d/dz of 1/2 ||LN(z) - target||^2 per row, in closed form:

    with x = (z - mean z) / sigma, sigma = sqrt(var z + eps), gx = gamma (LN(z) - target) the gradient at x,
    dl/dz = (gx - mean(gx) - x mean(gx x)) / sigma (the means over the K features).
    """
    mu = z.mean(-1, keepdim=True)
    zc = z - mu
    rstd = torch.rsqrt((zc * zc).mean(-1, keepdim=True) + LN_EPS)
    x = zc * rstd
    gx = (x * weight + bias - target) * weight
    return (gx - gx.mean(-1, keepdim=True) - x * (gx * x).mean(-1, keepdim=True)) * rstd


def chunk_forward(
    q, k, v, eta, valid, ln_weight, ln_bias, scale, W0, b0, C, use_ln, use_residual
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Padded inputs -> (o [N, Tp, H, V] in v.dtype, final W [N, H, K, K], final b [N, H, K] or None).

    q, k, v [N, Tp, H, K]; eta [N, Tp, H]; valid [N, Tp, 1] (1 on real tokens, 0 on padding); ln_weight,
    ln_bias [H, K]; scale [H, C] (s_i per head); W0 [N, H, K, K]; b0 [N, H, K], or None: no bias.
    """
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc = (to_chunks(x, C, dt) for x in (q, k, v))  # [N, H, NC, C, K]
    etac = to_chunks(eta, C, dt)[..., None]  # [N, H, NC, C, 1]
    H, K = qc.shape[1], qc.shape[-1]
    gamma, beta = (x.to(dt).reshape(1, H, 1, K) for x in (ln_weight, ln_bias))  # per-chunk rows [N, H, C, K]
    s = scale.to(dt)  # [H, C]
    # s at each mini-batch's last real position (a trailing partial mini-batch ends early): [N, H, NC, 1, 1]
    last = to_chunks(valid, C, torch.long)[:, 0].sum(-1).sub_(1).clamp_(min=0)  # [N, NC]
    s_last = s[:, last].movedim(0, 1)[..., None, None]
    target = vc - kc if use_residual else vc  # [N, H, NC, C, K]

    W, bias = W0.to(dt), None if b0 is None else b0.to(dt)[:, :, None]  # [N, H, K, K], [N, H, 1, K]
    Ws, bs, eGs = [], [], []
    for n in range(qc.shape[2]):
        Ws.append(W)
        bs.append(bias)
        kn = kc[:, :, n]  # [N, H, C, K]
        Z = kn @ W if bias is None else kn @ W + bias
        G = ln_l2_grad(Z, target[:, :, n], gamma, beta) if use_ln else Z - target[:, :, n]
        eG = etac[:, :, n] * G  # [N, H, C, K]
        eGs.append(eG)
        W = W - s_last[:, :, n] * (kn.transpose(-1, -2) @ eG)
        if bias is not None:
            bias = bias - s_last[:, :, n] * eG.sum(-2, keepdim=True)
    eG = torch.stack(eGs, 2)  # [N, H, NC, C, K]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    update = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0) @ eG  # [N, H, NC, C, K]: q_i (W0 - W_i) / s_i
    if bias is not None:
        update = update + eG.cumsum(-2)  # + (b0 - b_i) / s_i
    X = qc @ torch.stack(Ws, 2) - s[None, :, None, :, None] * update  # [N, H, NC, C, K]
    if bias is not None:
        X = X + torch.stack(bs, 2)
    out = layer_norm(X, gamma[:, :, None], beta[:, :, None]) if use_ln else X
    if use_residual:
        out = out + qc
    return from_chunks(out).to(v.dtype), W, None if bias is None else bias[:, :, 0]
