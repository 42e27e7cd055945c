"""Backward of the `ttt_linear` torch path (forward and notation: `ttt_linear_chunk.py`).

Per (sequence, head) and chunk c, with dW_c the gradient of the start weights W_c (all chunk-major):

    output:  dX = LN backward of do;   dQ = dX W_c^T + dP K;   dK = dP^T Q + ..;   dW_c += Q^T dX
             d(eta G) += -P^T (s dX) with P = tril(Q K^T), dP = -tril((s dX) (eta G)^T)
    update:  W_{c+1} = W_c - s_C acc_c:  d acc_c = -s_C dW_{c+1} (+ the sum_W cotangent at a returned chunk)
             d(eta G) += K d acc_c,   dK += (eta G) d acc_c^T,   ds_C -= <acc_c, dW_{c+1}>
    gradient: dZ = eta (the VJP of `ln_l2_grad`)(d(eta G)),   dW_c += K^T dZ,   dK += dZ W_c^T

Only d(eta G) -> dZ -> dW_c depends on the next chunk's dW_{c+1}: a reverse loop over chunks. It also
recomputes each chunk's inner gradient from Z = K W_c (cheaper in memory than keeping its intermediates)
and does what needs them (d eta, the target/gamma parts), and adds [dX; dZ] W_c^T while W_c is in cache.
The output's LN and intra-chunk products and their gradients run for all chunks at once, before the loop.

The VJP of `ln_l2_grad` (G = r g, x = (z - mean z) r, gx = gamma^2 x + gamma (beta - t)) for a cotangent u
of G:

    gxbar = r (u - mean(u) - x mean(u x))
    xbar  = gamma^2 gxbar - r (mean(gx x) u + mean(u x) gx)
    dz    = r (xbar - mean(xbar) - x (mean(xbar x) + mean(u G)))       (the last term: G's own factor r)
    dt = -gamma gxbar,   dgamma = gxbar (2 gamma x + beta - t),   dbeta = gamma gxbar
"""

import torch

from ipl_layers.ops.ttt_linear_chunk import LNGrad, augmented, grid, ln_l2_grad, ungrid


def _centered(x: torch.Tensor, y: torch.Tensor, y_sum: torch.Tensor) -> torch.Tensor:
    """x - mean(x) - y sum(...) / K per row: the projection every LN backward ends in (y_sum [.., C, 1])."""
    K = x.shape[-1]
    return torch.sub(x, x.sum(-1, keepdim=True), alpha=1 / K).addcmul_(y, y_sum, value=-1 / K)


def ln_l2_grad_vjp(u: torch.Tensor, f: LNGrad, G: torch.Tensor, gamma_sq: torch.Tensor, dz: torch.Tensor,
                   gxbar: torch.Tensor):
    """For the cotangent u of G = `ln_l2_grad`(z) (module docstring), writes dz and gxbar ([.., C, K] each)."""
    K = u.shape[-1]
    ux = torch.linalg.vecdot(u, f.x).unsqueeze_(-1)  # K mean(u x)
    torch.mul(_centered(u, f.x, ux), f.r, out=gxbar)
    xbar = torch.addcmul(gamma_sq * gxbar, torch.mul(u, f.gxx).addcmul_(f.gx, ux), f.r, value=-1 / K)
    w = torch.linalg.vecdot(xbar, f.x).add_(torch.linalg.vecdot(u, G)).unsqueeze_(-1)  # K (mean(xbar x) + mean(u G))
    torch.mul(_centered(xbar, f.x, w), f.r, out=dz)


def _output_backward(do, qk, eG, xo, ro, S0, gamma, s, use_ln, use_residual):
    """The output's gradients, all chunks at once (X = Q W_c - s (P eG) - [c == 0] s Q S0, o = LN(X) (+ q)).

    Returns dXZ [NC, NH, 2C, K] (rows dX, then room for the loop's dZ), dq, dk [NC, NH, C, K] (P's and the
    residual's parts), deG (the outputs' part), ds [NH, C], dS0 [NH, Ka, K], dgamma, dbeta [NH, K] or None."""
    NC, NH, C2, Ka = qk.shape
    C, K, N = C2 // 2, do.shape[-1], do.shape[0]
    qa, ka = qk[:, :, :C], qk[:, :, C:]  # [NC, NH, C, Ka]
    doc = do.new_empty(NC, NH, C, K, dtype=qk.dtype)
    doc.unflatten(1, (N, NH // N)).copy_(grid(do, C))
    dXZ = doc.new_empty(NC, NH, C2, K)
    dX = dXZ[:, :, :C]
    dgamma = dbeta = None
    if use_ln:
        dgamma, dbeta = (doc * xo).sum((0, 2)), doc.sum((0, 2))  # [NH, K]
        dxo = doc * gamma if use_residual else doc.mul_(gamma)
        dX.copy_(_centered(dxo, xo, torch.linalg.vecdot(dxo, xo).unsqueeze_(-1))).mul_(ro)
        del dxo
    else:
        dX.copy_(doc)
    sdX = dX * s  # [NC, NH, C, K]
    M = torch.matmul(dX, eG.mT)  # [NC, NH, C, C]
    P = torch.matmul(qa, ka.mT).tril_()
    ds = (M * P).sum(-1).sum(0).neg_()  # [NH, C]
    ds -= (dX[0] * (qa[0] @ S0)).sum(-1)
    dP = M.mul_(s).tril_().neg_()  # the gradient of P
    deG = torch.matmul(P.mT, sdX).neg_()  # [NC, NH, C, K]
    del P
    dS0 = -(qa[0].mT @ sdX[0])  # [NH, Ka, K]
    dq = torch.matmul(dP, ka[..., :K])  # [NC, NH, C, K]
    dk = torch.matmul(dP.mT, qa[..., :K])
    dq[0] -= sdX[0] @ S0[:, :K].mT
    if use_residual:
        dq += doc
    return dXZ, dq, dk, deG, ds, dS0, dgamma, dbeta


def _reverse_scan(qk, Ws, eG, e, target, S0, gamma, beta, s, last, dWo, dSo,
                  dXZ, dq, dk, deG, ds, dS0, dgamma, dbeta, use_ln):
    """The loop over chunks, last to first (module docstring). Fills dZ (in dXZ); adds the update's and the
    inner gradient's parts to dq, dk, deG, ds, dS0, dgamma, dbeta; returns the gradient of W_0 [NH, Ka, K],
    d eta [NC, NH, C] and d target [NC, NH, C, K]."""
    NC, NH, C2, Ka = qk.shape
    C, K, H = C2 // 2, target.shape[-1], NH // last.shape[0]
    s_end = s[:, -1:]  # [NH, 1, 1]
    last_nh = last.repeat_interleave(H)  # [NH]
    returned = set(last.tolist())
    dW = dWo * (last_nh == NC)[:, None, None]  # the gradient of W_{c+1} while chunk c runs
    d_end = torch.zeros_like(eG[0])  # sum over chunks of eG_c * (K_c dW_{c+1}): -ds_C's rows
    deta = qk.new_empty(NC, NH, C)
    gxbar = torch.empty_like(target)  # with LN the cotangent of gx (then -gamma gxbar = dt), else dt
    if use_ln:
        gamma_sq = gamma * gamma
        inner_target = (beta - target).mul_(gamma)  # gamma (beta - t)
        gxbar_x = torch.zeros_like(target[0])  # sum over chunks of gxbar x: dgamma's 2 gamma x term
    else:
        inner_target = target
    chunks = (qk, Ws[:NC], dXZ, dq, dk, eG, deG, e, inner_target, deta, gxbar)
    for c, qk_c, W_c, dXZ_c, dq_c, dk_c, eG_c, deG_c, e_c, t_c, deta_c, gxbar_c in zip(
            range(NC - 1, -1, -1), *(reversed(x.unbind(0)) for x in chunks)):
        ka_c, dX_c, dZ_c = qk_c[:, C:], dXZ_c[:, :C], dXZ_c[:, C:]  # [NH, C, Ka], [NH, C, K] x2
        kdW = torch.bmm(ka_c, dW)
        d_end.addcmul_(eG_c, kdW)
        deG_c.addcmul_(kdW, s_end, value=-1)  # K d acc_c, d acc_c = -s_C dW_{c+1}
        dk_c.addcmul_(torch.bmm(eG_c, dW[:, :K].mT), s_end, value=-1)  # eG d acc_c^T
        if c in returned:  # the returned sum_W is acc_c for these sequences: its cotangent joins d acc_c
            dacc = dSo * (last_nh == c)[:, None, None]
            deG_c.baddbmm_(ka_c, dacc)
            dk_c.baddbmm_(eG_c, dacc[:, :K].mT)
        Z = torch.bmm(ka_c, W_c)  # [NH, C, K]: the inner gradient, recomputed
        if use_ln:
            f = ln_l2_grad(Z, t_c, gamma_sq)
            G = f.g.mul_(f.r)
            torch.linalg.vecdot(G, deG_c, out=deta_c)
            ln_l2_grad_vjp(deG_c * e_c, f, G, gamma_sq, dZ_c, gxbar_c)  # eta d(eta G) is G's cotangent
            gxbar_x.addcmul_(gxbar_c, f.x)
        else:
            torch.linalg.vecdot(Z.sub_(t_c), deG_c, out=deta_c)
            torch.mul(deG_c, e_c, out=dZ_c)
            torch.neg(dZ_c, out=gxbar_c)
        Wt = W_c[:, :K].mT  # [NH, K, K]
        dq_c.baddbmm_(dX_c, Wt)
        dk_c.baddbmm_(dZ_c, Wt)
        if c == 0:
            dW1 = dW
        dW = torch.baddbmm(dW, qk_c.mT, dXZ_c)
        if c in returned:
            dW += dWo * (last_nh == c)[:, None, None]
    dS0 += dSo * (last_nh == 0)[:, None, None] - s_end * dW1
    ds[:, -1] -= d_end.sum((1, 2)).add_((S0 * dW1).sum((1, 2)))  # -sum_c <acc_c, dW_{c+1}>; acc_0 holds S0
    if not use_ln:
        return dW, deta, gxbar
    sum_gxbar = gxbar.sum((0, 2))  # [NH, K]
    g_row, b_row = gamma[:, 0], beta[:, 0]
    dgamma += (gxbar_x.sum(1) * 2 * g_row).add_(b_row * sum_gxbar).sub_((gxbar * target).sum((0, 2)))
    dbeta += g_row * sum_gxbar
    return dW, deta, gxbar.mul_(gamma).neg_()


def chunk_backward(saved, do, dW_out, db_out, dsum_W, dsum_b, last, use_ln, use_residual, dtypes):
    """Gradients of (q, k, v, eta, ln_weight, ln_bias, scale, W0, b0, sum_W0, sum_b0), cast to `dtypes`
    (None: no gradient), for the cotangents of the forward's (o, W, b, sum_W, sum_b).

    saved: a one-item list holding the forward's `Saved`; it is emptied so that each saved tensor is freed
    after its last use (else all of them live to the end, where the gradients are allocated)."""
    qk, target, e, Ws, eG, xo, ro, S0, gamma, beta, s = saved.pop()
    NC, NH, C2, Ka = qk.shape
    K, N, dt = target.shape[-1], do.shape[0], qk.dtype
    H, bias = NH // N, Ka > K
    dXZ, dq, dk, deG, ds, dS0, dgamma, dbeta = _output_backward(do, qk, eG, xo, ro, S0, gamma, s, use_ln,
                                                             use_residual)
    del xo, ro
    dWo = augmented(dW_out, db_out, dt, dW_out.new_empty(NH, Ka, K, dtype=dt))
    dSo = augmented(dsum_W, dsum_b, dt, dsum_W.new_empty(NH, Ka, K, dtype=dt))
    dW, deta, dtarget = _reverse_scan(qk, Ws, eG, e, target, S0, gamma, beta, s, last, dWo, dSo,
                                      dXZ, dq, dk, deG, ds, dS0, dgamma, dbeta, use_ln)
    del qk, Ws, eG, e, target, dXZ, deG
    if use_residual:
        dk -= dtarget

    def heads(x):  # [NH, *] -> [H, *] summed over sequences
        return None if x is None else x.unflatten(0, (N, H)).sum(0)

    grads = [ungrid(dq, N), ungrid(dk, N), ungrid(dtarget, N), ungrid(deta[..., None], N)[..., 0], heads(dgamma),
             heads(dbeta), heads(ds), dW[:, :K].unflatten(0, (N, H)), dW[:, K].unflatten(0, (N, H)) if bias else None,
             dS0[:, :K].unflatten(0, (N, H)), dS0[:, K].unflatten(0, (N, H)) if bias else None]
    return [None if d is None or t is None else d.to(t) for d, t in zip(grads, dtypes)]
