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

(the P terms and the open sums S of chunk 0 enter as in the forward). Everything on the queries' side
(output, layers 2 and 1, the P products, dq) depends on no later chunk, so it runs for all chunks at once
before the loop, against the saved start weights; the loop runs the rest, which the next chunk's dθ'
enters, with the keys' side (Z1k, gelu' and gelu'', Z2, G2 and its LN intermediates) recomputed from the
saved start weights and activations.
"""

import torch

from ipl_layers.ops.ttt_linear_chunk import ln_l2_grad, ungrid
from ipl_layers.ops.ttt_linear_chunk_bwd import _centered, ln_l2_grad_vjp
from ipl_layers.ops.ttt_mlp_chunk import GELU_A, GELU_C, gelu_and_slope


def gelu_slopes(z: torch.Tensor):
    """gelu'(z) and gelu''(z) of the tanh approximation: with u = tanh(c (z + a z^3)), w = c (1 + 3 a z^2),
    gelu' = (1 + u) / 2 + z (1 - u^2) w / 2 and gelu'' = (1 - u^2) (w - z u w^2 + 3 a c z^2)."""
    z2 = z * z
    u = torch.tanh(torch.addcmul(z, z2, z, value=GELU_A).mul_(GELU_C))
    w = torch.mul(z2, 3 * GELU_A * GELU_C).add_(GELU_C)
    one_u2 = torch.rsub(u * u, 1)
    zw = z * w
    first = torch.add(u, 1).mul_(0.5).addcmul_(one_u2, zw, value=0.5)
    second = torch.addcmul(w, zw * w, u, value=-1).add_(z2, alpha=3 * GELU_A * GELU_C).mul_(one_u2)
    return first, second


def chunk_backward(saved, do, dfinal, last, C, use_ln, use_residual, dtypes):
    """Gradients of the padded q, k, v, eta, of ln_weight, ln_bias, scale and of the initial weights and sums
    (8 tensors), for the cotangents do [N, Tp, H, K] and dfinal (8 tensors of the final state).
    `dtypes`: the input dtypes to return the gradients in (None: no gradient)."""
    qc, kc, target, ec, P1, thetas, X2, eG1, eG2, Z1q, xo, ro, S, gamma, beta, s = saved
    NC, NH, _, K = qc.shape
    N = do.shape[0]
    H = NH // N
    dt = qc.dtype
    s_end = s[:, -1:]  # [NH, 1, 1]
    gamma_sq = gamma * gamma
    tt = (beta - target) * gamma if use_ln else target  # the inner gradient's target term
    W1s, W2s = thetas[0][:-1], thetas[2][:-1]  # each chunk's start weights [NC, NH, ...]

    # the output LN's backward: dZ2q [NC, NH, C, K]
    doc = chunk_major(do, C, dt)
    dgamma = dbeta = None
    if use_ln:
        dgamma, dbeta = (doc * xo).sum((0, 2)), doc.sum((0, 2))  # [NH, K]
        dxo = doc * gamma
        dZ2q = _centered(dxo, xo, torch.linalg.vecdot(dxo, xo).unsqueeze_(-1)).mul_(ro)
        del dxo
    else:
        dZ2q = doc

    # the queries of all chunks at once: layer 2, Z2q = X2q W2 + b2 - s (P2 eG2) [- s (X2q S_W2 + S_b2)]
    X2q, slq = gelu_and_slope(Z1q)
    P2 = (X2q @ X2.mT).tril_().add_(P1.new_ones(C, C).tril_())
    R2 = P2 @ eG2
    R2[0] += X2q[0] @ S[2] + S[3]
    ds = -(dZ2q * R2).sum(-1, keepdim=True).sum(0)  # [NH, C, 1]
    del R2
    dZ2s = -s * dZ2q
    dP2 = (dZ2s @ eG2.mT).tril_()
    dX2q = torch.matmul(dZ2q, W2s.mT).add_(dP2 @ X2)
    dX2q[0] += dZ2s[0] @ S[2].mT
    deG2 = P2.mT @ dZ2s
    dX2 = dP2.mT @ X2q
    dS = [None, None, X2q[0].mT @ dZ2s[0], dZ2s[0].sum(1, keepdim=True)]
    del P2, dP2
    # layer 1, Z1q = Q W1 + b1 - s (P1 eG1) [- s (Q S_W1 + S_b1)]
    dZ1q = dX2q.mul_(slq)
    del slq
    R1 = P1 @ eG1
    R1[0] += qc[0] @ S[0] + S[1]
    ds -= (dZ1q * R1).sum(-1, keepdim=True).sum(0)
    del R1
    dZ1s = -s * dZ1q
    deG1 = P1.mT @ dZ1s
    dP1 = (dZ1s @ eG1.mT).tril_()
    dq = torch.matmul(dZ1q, W1s.mT).add_(dP1 @ kc)
    dq[0] += dZ1s[0] @ S[0].mT
    if use_residual:
        dq += doc
    dk = dP1.mT @ qc
    dS[0], dS[1] = qc[0].mT @ dZ1s[0], dZ1s[0].sum(1, keepdim=True)
    del dP1, dZ1s, dZ2s
    db1q, db2q = dZ1q.sum(2, keepdim=True), dZ2q.sum(2, keepdim=True)  # [NC, NH, 1, *]

    # the final state's cotangents: weights to the chunk each sequence ends at, sums to that chunk's g
    rows_at = {}
    for n, c in enumerate(last.tolist()):
        rows_at.setdefault(c, []).extend(range(n * H, (n + 1) * H))

    def final_part(offset, c):  # the cotangent rows of the sequences whose state is read at chunk c
        if c not in rows_at:
            return None
        rows = torch.tensor(rows_at[c], device=qc.device)
        parts = []
        for i, x in enumerate(thetas):
            full = torch.zeros(x.shape[1:], dtype=dt, device=qc.device)
            full[rows] = dfinal[offset + i].reshape(full.shape).to(dt)[rows]
            parts.append(full)
        return parts

    carry = [torch.zeros(x.shape[1:], dtype=dt, device=qc.device) for x in thetas]  # d theta_{c+1}
    extra = final_part(0, NC)
    if extra is not None:
        carry = [a + b for a, b in zip(carry, extra)]
    dtt = torch.empty_like(tt)
    de = torch.empty_like(ec)
    dgamma_sq = torch.zeros_like(gamma)
    ds_end = torch.zeros_like(s_end)
    for c in range(NC - 1, -1, -1):
        W1, b1, W2, b2 = (x[c] for x in thetas)
        k_c, e_c, X2_c, eG1_c, eG2_c = kc[c], ec[c], X2[c], eG1[c], eG2[c]
        # the keys' side, recomputed from the start weights
        Z1k = torch.baddbmm(b1, k_c, W1)
        sl, sl2 = gelu_slopes(Z1k)
        Z2 = torch.baddbmm(b2, X2_c, W2)
        if use_ln:
            f = ln_l2_grad(Z2, tt[c], gamma_sq)
            G2 = f.g * f.r
        else:
            G2 = Z2 - tt[c]
        D = G2 @ W2.mT  # [NH, C, F]

        # the update theta_{c+1} = theta_c - s_C g, g = (K^T eG1, 1^T eG1, X2^T eG2, 1^T eG2) (+ S at chunk 0)
        a1 = torch.baddbmm(carry[1], k_c, carry[0])  # K dW1' + db1': [NH, C, F]
        a2 = torch.baddbmm(carry[3], X2_c, carry[2])  # [NH, C, K]
        ds_end -= (a1 * eG1_c).sum((1, 2), keepdim=True) + (a2 * eG2_c).sum((1, 2), keepdim=True)
        deG1_c = torch.addcmul(deG1[c], s_end, a1, value=-1)
        deG2_c = torch.addcmul(deG2[c], s_end, a2, value=-1)
        dX2_c = dX2[c] - s_end * (eG2_c @ carry[2].mT)
        dk_c = dk[c] - s_end * (eG1_c @ carry[0].mT)
        extra = final_part(4, c)  # the returned sums of this chunk
        if c == 0:  # chunk 0's g includes the open sums S
            ds_end -= sum((d * x).flatten(1).sum(1) for d, x in zip(carry, S)).view(-1, 1, 1)
            dS = [a - s_end * d for a, d in zip(dS, carry)]
            if extra is not None:
                dS = [a + x for a, x in zip(dS, extra)]
        if extra is not None:
            deG1_c += torch.baddbmm(extra[1], k_c, extra[0])
            deG2_c += torch.baddbmm(extra[3], X2_c, extra[2])
            dX2_c += eG2_c @ extra[2].mT
            dk_c += eG1_c @ extra[0].mT

        # eG1 = eta gelu'(Z1k) (G2 W2^T), eG2 = eta G2
        esl = e_c * sl
        dD = deG1_c * esl
        de[c] = (deG1_c * sl * D).sum(-1, keepdim=True) + (deG2_c * G2).sum(-1, keepdim=True)
        dsl = deG1_c.mul_(e_c).mul_(D)
        dG2 = torch.baddbmm(deG2_c.mul_(e_c), dD, W2)
        dW2 = torch.baddbmm(carry[2], dD.mT, G2)
        if use_ln:
            dZ2 = torch.empty_like(Z2)
            ln_l2_grad_vjp(dG2, f, G2, gamma_sq, dZ2, dtt[c])
            dgamma_sq += (dtt[c] * f.x).sum(1, keepdim=True)
        else:
            dZ2 = dG2
            dtt[c] = -dG2
        # Z2 = X2 W2 + b2, X2 = gelu(Z1k); the queries' parts of the weight gradients
        dX2_c = torch.baddbmm(dX2_c, dZ2, W2.mT)
        dW2.baddbmm_(X2_c.mT, dZ2).baddbmm_(X2q[c].mT, dZ2q[c])
        db2 = carry[3] + dZ2.sum(1, keepdim=True) + db2q[c]
        dZ1k = dX2_c.mul_(sl).addcmul_(dsl, sl2)
        dW1 = torch.baddbmm(carry[0], k_c.mT, dZ1k).baddbmm_(qc[c].mT, dZ1q[c])
        db1 = carry[1] + dZ1k.sum(1, keepdim=True) + db1q[c]
        dk[c] = torch.baddbmm(dk_c, dZ1k, W1.mT)
        carry = [dW1, db1, dW2, db2]
        extra = final_part(0, c)
        if extra is not None:
            carry = [a + b for a, b in zip(carry, extra)]

    ds[:, -1:] += ds_end
    # the target term (gamma (beta - target) with LN, else the target); target = v - k (residual) or v
    if use_ln:
        dbeta += (dtt * gamma).sum((0, 2))
        dgamma += (dtt * (beta - target)).sum((0, 2)) + 2 * gamma[:, 0] * dgamma_sq[:, 0]
        dtarget = dtt.mul_(-gamma)
    else:
        dtarget = dtt
    if use_residual:
        dk -= dtarget
    dq, dk, dv, deta = (ungrid(x, N) for x in (dq, dk, dtarget, de))
    per_head = lambda x: None if x is None else x.reshape(N, H, *x.shape[1:]).sum(0)  # noqa: E731
    out = [dq, dk, dv, deta[..., 0], per_head(dgamma), per_head(dbeta), ds[..., 0].reshape(N, H, C).sum(0)]
    for parts in (carry, dS):  # [NH, ...] -> [N, H, ...]; the biases' row dim [NH, 1, *] goes
        out += [x.reshape(N, H, *x.shape[1 + i % 2:]) for i, x in enumerate(parts)]
    return [None if d is None or g is None else g.to(d) for g, d in zip(out, dtypes)]


def chunk_major(x: torch.Tensor, C: int, dt) -> torch.Tensor:
    """[N, Tp, H, K] -> [NC, NH, C, K] in dt (the forward's chunk-major layout)."""
    N, Tp, H, K = x.shape
    return x.to(dt).reshape(N, Tp // C, C, H, K).permute(1, 0, 3, 2, 4).reshape(Tp // C, N * H, C, K)
