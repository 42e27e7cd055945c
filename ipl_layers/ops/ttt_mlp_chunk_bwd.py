"""Backward of the `ttt_mlp` torch path (forward and notation: `ttt_mlp_chunk.py`).

Per (sequence, head) and chunk c in reverse, with dθ' the gradient of the next chunk's start weights
θ_{c+1} = θ_c - s_C g_c (g_c the chunk's gradient sums), the chunk's forward is walked back step by step:

    output   dZ2q (the output LN's backward, all chunks at once before the loop)
    layer 2  Z2q = X2q W2 + b2 - s (P2 eG2):  dX2q = dZ2q W2^T + dP2 X2,  dP2 = tril(-s dZ2q eG2^T),
             deG2 = -P2^T (s dZ2q),  dX2 += dP2^T X2q,  dW2 += X2q^T dZ2q
    layer 1  Z1q = Q W1 + b1 - s (P1 eG1), Z1q's gradient dX2q gelu'(Z1q); likewise for dP1 and deG1
    sums     g = (K^T eG1, 1^T eG1, X2^T eG2, 1^T eG2), dg = -s_C dθ' (+ the final sums' cotangent)
    inner    eG1 = eta gelu'(Z1k) (G2 W2^T), eG2 = eta G2, G2 = `ln_l2_grad`(Z2) (VJP as for `ttt_linear`),
             Z2 = X2 W2 + b2, X2 = gelu(Z1k): dZ1k = dX2 gelu'(Z1k) + d(gelu') gelu''(Z1k)
    input    [Z1q0; Z1k] = [Q; K] W1 + b1

(the P terms and the open sums S of chunk 0 enter as in the forward). The chunk's keys' side (X2, G2 and
its LN intermediates) is recomputed from the saved start weights and pre-activations; dQ and dK from
P1 = tril(Q K^T) run for all chunks at once after the loop.
"""

import torch

from ipl_layers.ops.ttt_linear_chunk import ln_l2_grad, ungrid
from ipl_layers.ops.ttt_linear_chunk_bwd import _centered, ln_l2_grad_vjp
from ipl_layers.ops.ttt_mlp_chunk import GELU_A, GELU_C, gelu_and_slope


def gelu_second(z: torch.Tensor) -> torch.Tensor:
    """gelu''(z) of the tanh approximation: with u = tanh(c (z + a z^3)) and w = c (1 + 3 a z^2),
    (1 - u^2) (w - z u w^2 + 3 a c z^2)."""
    z2 = z * z
    u = torch.tanh(torch.addcmul(z, z2, z, value=GELU_A).mul_(GELU_C))
    w = torch.mul(z2, 3 * GELU_A).add_(1).mul_(GELU_C)
    inner = torch.addcmul(w, z2, torch.full_like(z2, 3 * GELU_A * GELU_C)).sub_(z * u * w * w)
    return inner.mul_(torch.rsub(u * u, 1))


def chunk_backward(saved, do, dfinal, last, C, use_ln, use_residual, dtypes):
    """Gradients of the padded q, k, v, eta, of ln_weight, ln_bias, scale and of the initial weights and sums
    (8 tensors), for the cotangents do [N, Tp, H, K] and dfinal (8 tensors of the final state, or None).
    `dtypes`: the input dtypes to return the gradients in (None: no gradient)."""
    qk, t, ec, P1, thetas, Z1s, Z1qs, xo, ro, open_sums, gamma, beta, s = saved
    NC, NH, C2, K = qk.shape
    N = do.shape[0]
    H = NH // N
    dt = qk.dtype
    s_end = s[:, -1:]  # [NH, 1, 1]
    causal = torch.ones(C, C, dtype=dt, device=qk.device).tril_()
    gamma_sq = gamma * gamma
    tt = (beta - t) * gamma if use_ln else t  # the inner gradient's target term
    shapes = [x.shape for x in thetas[0]]  # [NH, ...] per part

    # the output LN's backward, all chunks at once: dZ2q [NC, NH, C, K]
    doc = ungrid_inverse(do, C, dt)  # [NC, NH, C, K]
    dgamma = dbeta = None
    if use_ln:
        dgamma, dbeta = (doc * xo).sum((0, 2)), doc.sum((0, 2))  # [NH, K]
        dxo = doc * gamma
        dZ2q_all = _centered(dxo, xo, torch.linalg.vecdot(dxo, xo).unsqueeze_(-1)).mul_(ro)
        del dxo
    else:
        dZ2q_all = doc
    dqk = torch.zeros_like(qk)  # [NC, NH, 2C, K]: dq rows then dk rows
    if use_residual:
        dqk[:, :, :C] += doc
    dt_all = torch.empty_like(t)  # gradient of the target term tt
    de = torch.empty_like(ec)  # [NC, NH, C, 1]
    dP1 = torch.empty_like(P1)
    ds = torch.zeros_like(s)  # [NH, C, 1]
    dgamma_sq = torch.zeros_like(gamma)
    dS = [torch.zeros_like(x) for x in open_sums]

    # the final state's cotangents: weights to the chunk each sequence ends at, sums to that chunk's g
    rows_at = {}
    for n, c in enumerate(last.tolist()):
        rows_at.setdefault(c, []).extend(range(n * H, (n + 1) * H))

    def final_part(offset, c):  # the cotangent rows of sequences whose state is read at chunk c, [NH, ...]
        if dfinal is None or c not in rows_at:
            return None
        rows = torch.tensor(rows_at[c], device=qk.device)
        out = []
        for i, shape in enumerate(shapes):
            d = dfinal[offset + i]
            full = torch.zeros(shape, dtype=dt, device=qk.device)
            full[rows] = d.reshape(shape).to(dt)[rows] if d is not None else 0
            out.append(full)
        return out

    carry = [torch.zeros(shape, dtype=dt, device=qk.device) for shape in shapes]  # d theta_{c+1}
    extra = final_part(0, NC)
    if extra is not None:
        carry = [a + b for a, b in zip(carry, extra)]
    for c in range(NC - 1, -1, -1):
        W1, b1, W2, b2 = thetas[c]
        qk_c, e_c, P1_c, Z1, Z1q = qk[c], ec[c], P1[c], Z1s[c], Z1qs[c]
        q_c, k_c = qk_c[:, :C], qk_c[:, C:]
        # the keys' side, recomputed at the start weights
        Z1k = Z1[:, C:]
        X2, sl = gelu_and_slope(Z1k)  # [NH, C, F]
        Z2 = torch.baddbmm(b2, X2, W2)  # [NH, C, K]
        if use_ln:
            f = ln_l2_grad(Z2, tt[c], gamma_sq)
            G2 = f.g * f.r
        else:
            G2 = Z2 - t[c]
        D = G2 @ W2.mT  # [NH, C, F]
        esl = e_c * sl
        eG1, eG2 = esl * D, e_c * G2
        g = [k_c.mT @ eG1, eG1.sum(1, keepdim=True), X2.mT @ eG2, eG2.sum(1, keepdim=True)]
        if c == 0:
            g = [a + b for a, b in zip(g, open_sums)]

        # the update theta_{c+1} = theta_c - s_C g
        dg = [-s_end * d for d in carry]
        ds[:, -1] -= sum((d * x).flatten(1).sum(1) for d, x in zip(carry, g))[:, None]
        extra = final_part(4, c)
        if extra is not None:
            dg = [a + b for a, b in zip(dg, extra)]
        dW1, db1, dW2, db2 = (x.clone() for x in carry)

        # layer 2 of the queries
        X2q, slq = gelu_and_slope(Z1q)
        dZ2q = dZ2q_all[c]
        P2 = (X2q @ X2.mT).tril_().add_(causal)  # [NH, C, C]
        R2 = P2 @ eG2
        if c == 0:
            R2 = R2 + X2q @ open_sums[2] + open_sums[3]
        ds -= (dZ2q * R2).sum(-1, keepdim=True)
        dZ2s = -s * dZ2q
        dP2 = (dZ2s @ eG2.mT).tril_()
        dX2q = torch.baddbmm(dP2 @ X2, dZ2q, W2.mT)
        dW2 += X2q.mT @ dZ2q
        db2 += dZ2q.sum(1, keepdim=True)
        deG2 = P2.mT @ dZ2s
        dX2 = dP2.mT @ X2q
        if c == 0:
            dX2q += dZ2s @ open_sums[2].mT
            dS[2] += X2q.mT @ dZ2s
            dS[3] += dZ2s.sum(1, keepdim=True)

        # layer 1 of the queries
        dZ1q = dX2q * slq
        R1 = P1_c @ eG1
        if c == 0:
            R1 = R1 + q_c @ open_sums[0] + open_sums[1]
        ds -= (dZ1q * R1).sum(-1, keepdim=True)
        dZ1s = -s * dZ1q
        deG1 = P1_c.mT @ dZ1s
        dP1[c] = (dZ1s @ eG1.mT).tril_()
        dq_c = dqk[c, :, :C]
        if c == 0:
            dq_c += dZ1s @ open_sums[0].mT
            dS[0] += q_c.mT @ dZ1s
            dS[1] += dZ1s.sum(1, keepdim=True)
            for i in range(4):
                dS[i] += dg[i]

        # the sums g
        dk_c = dqk[c, :, C:]
        dk_c += eG1 @ dg[0].mT
        deG1 += k_c @ dg[0] + dg[1]
        dX2 += eG2 @ dg[2].mT
        deG2 += X2 @ dg[2] + dg[3]

        # eG1 = eta gelu'(Z1k) (G2 W2^T), eG2 = eta G2
        dD = deG1 * esl
        de[c] = (deG1 * sl * D).sum(-1, keepdim=True) + (deG2 * G2).sum(-1, keepdim=True)
        dsl = deG1 * e_c * D
        dG2 = torch.baddbmm(deG2 * e_c, dD, W2)
        dW2 += dD.mT @ G2
        if use_ln:
            dZ2, dtt = torch.empty_like(Z2), torch.empty_like(Z2)
            ln_l2_grad_vjp(dG2, f, G2, gamma_sq, dZ2, dtt)  # dtt: the gradient of gamma (beta - t)
            dt_all[c] = dtt
            dgamma_sq += (dtt * f.x).sum(1, keepdim=True)
        else:
            dZ2 = dG2
            dt_all[c] = -dG2
        # Z2 = X2 W2 + b2, X2 = gelu(Z1k)
        dX2 = torch.baddbmm(dX2, dZ2, W2.mT)
        dW2 += X2.mT @ dZ2
        db2 += dZ2.sum(1, keepdim=True)
        dZ1k = dX2 * sl + dsl * gelu_second(Z1k)
        # [Z1q0; Z1k] = [Q; K] W1 + b1
        dZ1 = torch.cat([dZ1q, dZ1k], 1)  # [NH, 2C, F]
        dW1 += qk_c.mT @ dZ1
        db1 += dZ1.sum(1, keepdim=True)
        dqk[c] += dZ1 @ W1.mT

        carry = [dW1, db1, dW2, db2]
        extra = final_part(0, c)
        if extra is not None:
            carry = [a + b for a, b in zip(carry, extra)]

    # P1 = tril(Q K^T) + L, all chunks at once
    dqk[:, :, :C] += dP1 @ qk[:, :, C:]
    dqk[:, :, C:] += dP1.mT @ qk[:, :, :C]
    # the target term (gamma (beta - t) with LN, else t) and t = v - k (residual) or v
    if use_ln:  # the target term gamma (beta - target), and gamma^2 in the inner gradient
        dbeta += (dt_all * gamma).sum((0, 2))
        dgamma += (dt_all * (beta - t)).sum((0, 2)) + 2 * gamma[:, 0] * dgamma_sq[:, 0]
        dtarget = -dt_all * gamma
    else:
        dtarget = dt_all
    dv = dtarget
    if use_residual:
        dqk[:, :, C:] -= dtarget
    grads = [ungrid(x, N) for x in (dqk[:, :, :C], dqk[:, :, C:], dv, de)]
    dq, dk, dv, deta = grads[0], grads[1], grads[2], grads[3][..., 0]
    per_head = lambda x: None if x is None else x.reshape(N, H, *x.shape[1:]).sum(0)  # noqa: E731
    dln_w, dln_b = per_head(dgamma), per_head(dbeta)
    dscale = ds[..., 0].reshape(N, H, C).sum(0)  # [H, C]
    out = [dq, dk, dv, deta, dln_w, dln_b, dscale]
    for parts in (carry, dS):  # [NH, ...] -> [N, H, ...]; the biases' row dim [NH, 1, *] goes
        out += [x.reshape(N, H, *x.shape[1 + i % 2:]) for i, x in enumerate(parts)]
    return [None if d is None or g is None else g.to(d) for g, d in zip(out, dtypes)]


def ungrid_inverse(x: torch.Tensor, C: int, dt) -> torch.Tensor:
    """[N, Tp, H, K] -> [NC, NH, C, K] in dt (the forward's chunk-major layout)."""
    N, Tp, H, K = x.shape
    return x.to(dt).reshape(N, Tp // C, C, H, K).permute(1, 0, 3, 2, 4).reshape(Tp // C, N * H, C, K)
