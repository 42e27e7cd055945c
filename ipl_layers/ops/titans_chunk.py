"""Torch path of `titans_memory`: the chunked form of the Titans memory update, the CPU path (torch autograd
differentiates it; it saves per chunk only the keys' activations, their loss gradients and the weights at
chunk starts, not titans-pytorch's per-token gradients of every parameter).

Sequences come padded to [N, Tp, H, *] so that the chunks of C tokens line up with the op's chunks; padding
rows have theta = 0, eta = 1, alpha = 0 and a zero mask m, which leaves S and M untouched. Per (sequence,
head) and chunk, with G the weights where the chunk takes its gradients, (M0, S0) the weights and momentum the
recurrence starts from (G == M0 except in a chunk a call resumes mid-way) and u_j the per-token gradient of
||M(k_j) - v_j||^2 at G, unrolling S_i = eta_i S_i-1 - theta_i u_i and M_t = (1 - alpha_t) M_t-1 + m_t S_t:

    M_t = f_t M0 + b_t S0 - sum_{j<=t} c_tj u_j,      S_C = e_C S0 - sum_j E_Cj theta_j u_j

with E_ij = prod_{j<l<=i} eta_l, e_i = prod_{l<=i} eta_l, F_ti = prod_{i<l<=t} (1 - alpha_l), f_t = prod_{l<=t}
(1 - alpha_l), b = F (m e) and c = F diag(m) E diag(theta) (all [C, C] lower-triangular products of gates in
[0, 1]: built by cumprod over a masked grid, exact with zero gates and without overflow; across chunks only
the states are carried). Each u_j of layer l is an outer product x_j^T d_j (x_j the layer's input, d_j the
loss gradient at its output), so the queries read layer l as

    Z = f * (H M0) + b * (H S0) - (c * (H X^T)) D      (rows are tokens; H the query's input to the layer)

exactly, with no [C, d_in, d_out] per-token weights. Only the keys' side (forward and backward through the
MLP at G) and the state update run chunk after chunk; the queries of a run of chunks run at once.
"""

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ipl_layers.ops.ttt_linear_chunk import LN_EPS, grid, per_row, ungrid

SEGMENT_CHUNKS = 16  # chunks per run: the query side holds the weights of one run's chunks at a time


def coefficients(theta: torch.Tensor, eta: torch.Tensor, alpha: torch.Tensor, m: torch.Tensor):
    """Gates [.., C] -> f, b [.., C] and c [.., C, C] of the queries, and the chunk end's f_C, b_C, c_C, e_C
    and the momentum's E_Cj theta_j (see the module docstring)."""
    C = theta.shape[-1]
    below = torch.ones(C, C, dtype=torch.bool, device=theta.device).tril_(-1)  # i > j

    def products(g):  # P[i, j] = prod_{j<l<=i} g_l (lower-triangular), p_i = prod_{l<=i} g_l
        return torch.where(below, g[..., :, None], 1.0).cumprod(-2).tril(), g.cumprod(-1)

    E, e = products(eta)  # [.., C, C], [.., C]
    Fm, f = products(1 - alpha)
    Fm = Fm * m[..., None, :]  # F_ti m_i
    b = (Fm @ e[..., None]).squeeze(-1)  # [.., C]
    c = (Fm @ E) * theta[..., None, :]  # [.., C, C]
    ends = (f[..., -1:], b[..., -1:], c[..., -1, :], e[..., -1:], E[..., -1, :] * theta)
    return (f, b, c), ends


def ln_sq_grad(z: torch.Tensor, target: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """d/dz ||LN(z) - t||^2 per row in closed form: with x = (z - mean z) r, r = 1 / sqrt(var z + eps) and
    gx = gamma (gamma x + beta - t), it is 2 r (gx - mean(gx) - x mean(gx x)). Written in plain ops (not
    `native_layer_norm`, whose autograd ignores gradients that reach r) so that autograd differentiates it."""
    zc = z - z.mean(-1, keepdim=True)
    r = torch.rsqrt((zc * zc).mean(-1, keepdim=True) + LN_EPS)
    x = zc * r
    gx = gamma * (gamma * x + beta - target)
    return 2 * r * (gx - gx.mean(-1, keepdim=True) - x * (gx * x).mean(-1, keepdim=True))


def step_scales(inputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """1 / (1 + 2 rho) per token [.., C], rho = sum_l |x_l|^2 |d_l|^2 / |d_L|^2 (the `normalize_step` scaling of
    theta; `titans_memory` module docstring). rho is 0 where the token's loss gradient is (a zero row)."""
    last = grads[-1]
    rho = sum((x * x).sum(-1) * (d * d).sum(-1) for x, d in zip(inputs, grads))
    return 1 / (1 + 2 * rho / (last * last).sum(-1).clamp_min(torch.finfo(last.dtype).tiny))


def mlp_grads(x: torch.Tensor, G: Sequence[torch.Tensor], target: torch.Tensor, ln, use_ln: bool,
              normalize_step: bool):
    """The keys' forward through the MLP at G and the per-token loss gradients at each layer's output.
    x [NH, C, K] -> (inputs [x_1..x_L], grads [d_1..d_L]) with u_j of layer l = inputs[l][j]^T grads[l][j];
    with `normalize_step` each token's grads carry its step scale (`step_scales`), so theta_j u_j is its step."""
    inputs, pre = [x], []
    for l, W in enumerate(G):
        z = inputs[-1] @ W  # [NH, C, d_out]
        pre.append(z)
        if l < len(G) - 1:
            inputs.append(F.gelu(z))
    if use_ln:
        d = ln_sq_grad(pre[-1], target, *ln)
    else:
        d = 2 * (pre[-1] - target)
    grads = [d]
    for l in range(len(G) - 1, 0, -1):
        d = torch.ops.aten.gelu_backward(d @ G[l].mT, pre[l - 1])  # (d W^T) gelu'(z): one op, differentiable
        grads.insert(0, d)
    if normalize_step:
        scale = step_scales(inputs, grads)[..., None]  # [NH, C, 1]
        grads = [d * scale for d in grads]
    return inputs, grads


def _run(qc, kc, tc, gates, G, M0, S0, ln, use_ln, normalize_step):
    """One run of chunks [NR, NH, C, *] from (G, M0, S0) (lists of L [NH, d_in, d_out]): the keys' side and the
    update chunk after chunk, then the queries of all the run's chunks. Returns the last layer's query
    pre-activations [NR, NH, C, V], the states after each chunk (lists of L [NR, NH, ..]) and the chunks' G."""
    (f, b, c), (fC, bC, cC, eC, sC) = gates
    Gs, Ms, Ss, Xs, Ds = [], [], [], [], []
    for r in range(qc.shape[0]):
        X, D = mlp_grads(kc[r], G, tc[r], ln, use_ln, normalize_step)
        Gs.append(G)
        Ms.append(M0)
        Ss.append(S0)
        Xs.append(X)
        Ds.append(D)
        # u summed with the chunk end's coefficients: x^T (coef * d) per layer
        M0 = [torch.baddbmm(torch.addcmul(fC[r][..., None] * M, bC[r][..., None], S), x.mT, cC[r][..., None] * d,
                            alpha=-1) for M, S, x, d in zip(M0, S0, X, D)]
        S0 = [torch.baddbmm(eC[r][..., None] * S, x.mT, sC[r][..., None] * d, alpha=-1) for S, x, d in zip(S0, X, D)]
        G = M0
    stack = lambda xs, l: torch.stack([x[l] for x in xs])  # noqa: E731
    h = qc
    for l in range(len(G)):
        X, D = stack(Xs, l), stack(Ds, l)  # [NR, NH, C, d_in], [NR, NH, C, d_out]
        z = f[..., None] * (h @ stack(Ms, l)) + b[..., None] * (h @ stack(Ss, l)) - (c * (h @ X.mT)) @ D
        if l < len(G) - 1:
            h = F.gelu(z)
    return z, (M0, S0), Gs


def chunk_forward(q, k, v, theta, eta, alpha, m, ln_weight, ln_bias, state, ends, C, use_ln, use_residual,
                  normalize_step):
    """Padded inputs -> (o [N, Tp, H, V] in v.dtype, the final (start, momentum, weights) as lists of L tensors
    [N, H, d_in, d_out]).

    q, k [N, Tp, H, K], v [N, Tp, H, V]; theta, eta, alpha, m [N, Tp, H] (padding: 0, 1, 0, 0); ln_weight,
    ln_bias [H, V]; state (start, momentum, weights) lists of L [N, H, d_in, d_out] before chunk 0; ends [N]
    int64: each sequence's end in the padded grid (its final state starts mid-chunk when ends % C != 0)."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    N, Tp, H, K = q.shape
    V = v.shape[-1]
    NC = Tp // C

    def chunked(x):  # [N, Tp, H, *] -> [NC, NH, C, *] in dt
        return grid(x.to(dt), C).flatten(1, 2)

    qc, kc, vc = chunked(q), chunked(k), chunked(v)
    tc = vc - kc if use_residual else vc
    gamma, beta = (per_row(x, N, dt)[:, None] for x in (ln_weight, ln_bias))  # [NH, 1, V]
    gates = coefficients(*(chunked(x[..., None])[..., 0] for x in (theta, eta, alpha, m)))  # [NC, NH, ...]
    flat = lambda xs: [x.to(dt).flatten(0, 1) for x in xs]  # noqa: E731  [N, H, ..] -> [NH, ..]
    G, M0, S0 = flat(state[0]), flat(state[2]), flat(state[1])
    last = (ends // C).tolist()
    mid = (ends % C != 0).tolist()
    wanted = {c for c, m in zip(last, mid) if m}  # chunks some sequence's final state starts in
    outs: List[torch.Tensor] = []
    starts = {}  # G of the wanted chunks
    for r in range(0, NC, SEGMENT_CHUNKS):
        part = slice(r, r + SEGMENT_CHUNKS)
        run_gates = tuple(tuple(x[part] for x in group) for group in gates)
        args = (qc[part], kc[part], tc[part], run_gates, G, M0, S0, (gamma, beta), use_ln, normalize_step)
        if torch.is_grad_enabled():  # autograd keeps one run's intermediates at a time: the backward recomputes
            z, (M0, S0), Gs = checkpoint(_run, *args, use_reentrant=False)
        else:
            z, (M0, S0), Gs = _run(*args)
        outs.append(z)
        starts.update({r + i: g for i, g in enumerate(Gs) if r + i in wanted})
        G = M0
    out = torch.cat(outs)  # [NC, NH, C, V]
    if use_ln:
        out = F.layer_norm(out, (V,), eps=LN_EPS) * gamma + beta
    o = ungrid(out + qc if use_residual else out, N).to(v.dtype)  # [N, Tp, H, V]

    # each sequence's final start weights: those of the chunk it ends in (mid-chunk), else its final weights
    unflat = lambda x: x.unflatten(0, (N, H))  # noqa: E731
    start = [torch.stack([unflat(starts[c][l] if mid[n] else M0[l])[n] for n, c in enumerate(last)])
             if N else unflat(M0[l]) for l in range(len(M0))]
    return o, (start, [unflat(x) for x in S0], [unflat(x) for x in M0])


def step(q, k, v, theta, eta, alpha, ln_weight, ln_bias, state, C, use_ln, use_residual, normalize_step):
    """One token per sequence (decoding): q, k [N, H, K], v [N, H, V], gates [N, H], state (start, momentum,
    weights, position) -> (o [N, H, V] in v.dtype, the next (start, momentum, weights, position)). The token's
    gradient at the start weights, S = eta S - theta u, M = (1 - alpha) M + S, y = M(q); a chunk that fills
    commits M as the next start. The same arithmetic as one row of the chunked form, without its [C, C] grids."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    N, H, K = q.shape
    flat = lambda xs: [x.to(dt).flatten(0, 1) for x in xs]  # noqa: E731  [N, H, ..] -> [NH, ..]
    G, S, M = (flat(x) for x in state[:3])
    rows = lambda x: x.to(dt).flatten(0, 1)[:, None]  # noqa: E731  [N, H, D] -> [NH, 1, D]
    qr, kr, vr = rows(q), rows(k), rows(v)
    gamma, beta = (per_row(x, N, dt)[:, None] for x in (ln_weight, ln_bias))  # [NH, 1, V]
    X, D = mlp_grads(kr, G, vr - kr if use_residual else vr, (gamma, beta), use_ln, normalize_step)
    th, et, al = (x.to(dt).reshape(-1, 1, 1) for x in (theta, eta, alpha))  # [NH, 1, 1]
    S = [et * s - th * (x.mT @ d) for s, x, d in zip(S, X, D)]  # u = x^T d: the token's gradient per layer
    M = [(1 - al) * m + s for m, s in zip(M, S)]
    h = qr
    for l, W in enumerate(M):
        h = (h if l == 0 else F.gelu(h)) @ W
    if use_ln:
        h = F.layer_norm(h, (h.shape[-1],), eps=LN_EPS) * gamma + beta
    o = (h + qr if use_residual else h)[:, 0].unflatten(0, (N, H)).to(v.dtype)  # [N, H, V]
    position = state[3] + 1
    full = (position == C).view(N, 1, 1, 1)
    unflat = lambda x: x.unflatten(0, (N, H))  # noqa: E731
    start = [torch.where(full, unflat(m), unflat(g)) for g, m in zip(G, M)]
    return o, (start, [unflat(x) for x in S], [unflat(x) for x in M], position % C)
