"""Torch chunked path of `delta_rule`: the WY (UT transform) form, the CPU path, with a hand-written backward.

Sequences are padded to [N, Tp, H, *] with Tp a multiple of the chunk size C (zero q/k/v, beta and
log-decay in the padding: beta = 0 and g = 0 leave the state untouched). Inside chunk n, with b_i the
inclusive cumsum of g within the chunk, Gamma_ij = exp(b_i - b_j) masked to j <= i and S0 the chunk's
start state, unrolling S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t gives

    v_new_i = beta_i (v_i - (k_i exp(b_i)) S0 - sum_{j<i} Gamma_ij (k_i k_j^T) v_new_j)

(v_new_i is the chunk's own update of row i: S_i = exp(b_i) S0 + sum_{j<=i} Gamma_ij k_j^T v_new_j), a unit
lower triangular system L v_new = diag(beta) (V - K exp(b) S0) with L = I + M:

    M = StrictTril(diag(beta) (K K^T * Gamma)),   [W, U] = L^-1 diag(beta) [K * exp(b), V]
    v_new = U - W S0
    o     = scale [ (Q * exp(b)) S0 + P v_new ],   P = tril(Q K^T * Gamma)
    S_end = exp(b_C) S0 + (K * exp(b_C - b))^T v_new

W and U depend on no state, so they come for every chunk at once from one triangular solve; only the
state matmuls run chunk after chunk. Every exponent is <= 0: nothing overflows however strong the decay.

Backward (d* the gradients, dS_n that of the state where chunk n ends): a reverse scan
    dv_new = P^T do + K_d dS_n,   dS_{n-1} = Q_d^T do + exp(b_C) dS_n - W^T dv_new
(do scaled; Q_d = Q exp(b), K_d = K exp(b_C - b)), then per chunk at once: d[W, U] = [-dv_new S0^T, dv_new],
the solve's gradient dR = L^-T d[W, U] (an upper unit triangular solve) and dM = -StrictTril(dR [W, U]^T),
and the products' gradients into q, k, v, beta and the log-decays b (dg is b's gradient reverse-summed).
"""

import torch

from ipl_layers.ops.chunking import from_chunks, to_chunks

# Chunks per segment of the forward that saves nothing (inference): 8 chunks of 64 tokens keep its
# working set at about that of 512 tokens whatever T is (17 MiB at T = 4096, H = 4, K = V = 64, against
# 56 MiB all at once), while the matmuls stay batched.
SEGMENT_CHUNKS = 8


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-1, -2)


class _Chunks:
    """One call's chunked operands and the state-free part of the forward (all chunks at once)."""

    def __init__(self, q, k, v, beta, g, C):
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        self.qc, self.kc, self.vc = (to_chunks(x, C, dt) for x in (q, k, v))  # [N, H, NC, C, K|V]
        self.beta = to_chunks(beta, C, dt)[..., None]  # [N, H, NC, C, 1]
        self.K = self.qc.shape[-1]
        if g is None:
            self.b = self.gamma = self.decay = None
            self.qd, self.kw, self.kd = self.qc, self.kc, self.kc
        else:
            self.b = to_chunks(g, C, dt).cumsum(3)[..., None]  # [N, H, NC, C, 1]
            causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
            diff = self.b - _t(self.b)
            self.gamma = torch.where(causal, diff, float("-inf")).exp()  # [N, H, NC, C, C]
            eb, last = self.b.exp(), self.b[..., -1:, :]  # exp(b) [N, H, NC, C, 1]; b_C [N, H, NC, 1, 1]
            # q exp(b), k exp(b), k exp(b_C - b): [N, H, NC, C, K]
            self.qd, self.kw, self.kd = self.qc * eb, self.kc * eb, self.kc * (last - self.b).exp()
            self.decay = last.exp()  # exp(b_C): [N, H, NC, 1, 1]
        self.kkg = self.gated(self.kc @ _t(self.kc))  # K K^T * Gamma: [N, H, NC, C, C]
        self.M = (self.beta * self.kkg).tril_(-1)
        self.P = self.gated(self.qc @ _t(self.kc)).tril_()
        self.rhs = torch.cat([self.kw, self.vc], -1)  # [N, H, NC, C, K + V]
        self.WU = torch.linalg.solve_triangular(self.M, self.beta * self.rhs, upper=False, unitriangular=True)

    def gated(self, x):
        """x * Gamma (x [.., C, C]); without decay Gamma is the causal mask, applied by the callers' tril."""
        return x if self.gamma is None else x * self.gamma


def chunk_forward(q, k, v, beta, g, initial_state, scale, C):
    """Padded inputs -> (o [N, Tp, H, V] in v.dtype, saved for `chunk_backward`, final state [N, H, K, V]).

    Saved: the `_Chunks`, the chunk start states [N, H, NC, K, V] and v_new [N, H, NC, C, V].
    """
    ch = _Chunks(q, k, v, beta, g, C)
    N, H, NC = ch.qc.shape[:3]
    K, V = ch.K, ch.vc.shape[-1]
    W, U = ch.WU[..., :K], ch.WU[..., K:]  # [N, H, NC, C, K], [N, H, NC, C, V]
    dt = ch.qc.dtype
    states = torch.empty(N, H, NC, K, V, dtype=dt, device=q.device)
    v_new = torch.empty_like(U)
    S = torch.zeros(N, H, K, V, dtype=dt, device=q.device) if initial_state is None else initial_state.to(dt)
    for n in range(NC):
        states[:, :, n] = S
        torch.sub(U[:, :, n], W[:, :, n] @ S, out=v_new[:, :, n])  # U - W S0
        upd = _t(ch.kd[:, :, n]) @ v_new[:, :, n]  # [N, H, K, V]
        S = upd.add_(S) if ch.decay is None else upd.addcmul_(ch.decay[:, :, n], S)
    o = (ch.qd @ states).add_(ch.P @ v_new).mul_(scale)  # [N, H, NC, C, V]
    return from_chunks(o).to(v.dtype), (ch, states, v_new), S


def chunk_forward_segmented(q, k, v, beta, g, initial_state, scale, C, segment_chunks=SEGMENT_CHUNKS):
    """`chunk_forward` without saving for a backward: the sequence runs in segments of `segment_chunks`
    chunks, each from the state the previous one ended with, so the all-chunks-at-once intermediates
    (W, U, the [C, C] products) exist for one segment at a time. Returns (o, final state)."""
    N, Tp, H = q.shape[:3]
    o = torch.empty(N, Tp, H, v.shape[-1], dtype=v.dtype, device=v.device)  # [N, Tp, H, V]
    S = initial_state
    step = segment_chunks * C
    for t in range(0, Tp, step):
        part = [None if x is None else x[:, t : t + step] for x in (q, k, v, beta, g)]
        o[:, t : t + step], _, S = chunk_forward(*part, S, scale, C)
    return o, S  # Tp >= C: at least one segment ran


def chunk_backward(saved, do, dht, scale, C, dtypes):
    """Gradients of the padded q, k, v, beta, g and of initial_state (derivation in the module docstring).

    `dtypes`: the dtypes of (q, k, v, beta, g, initial_state) to return the gradients in (None: no gradient).
    """
    ch, states, v_new = saved
    K = ch.K
    doc = to_chunks(do, C, ch.qc.dtype).mul_(scale)  # [N, H, NC, C, V]
    NC = doc.shape[2]
    W = ch.WU[..., :K]
    pdo = _t(ch.P) @ doc  # [N, H, NC, C, V]: P^T do
    qdo = _t(ch.qd) @ doc  # [N, H, NC, K, V]: Q_d^T do
    d_end = torch.empty_like(states)  # gradient of the state where each chunk ends
    dv_new = torch.empty_like(v_new)
    dS = torch.zeros_like(states[:, :, 0]) if dht is None else dht.to(states.dtype)
    for n in range(NC - 1, -1, -1):
        d_end[:, :, n] = dS
        torch.add(pdo[:, :, n], ch.kd[:, :, n] @ dS, out=dv_new[:, :, n])
        nxt = qdo[:, :, n] - _t(W[:, :, n]) @ dv_new[:, :, n]
        dS = nxt.add_(dS) if ch.decay is None else nxt.addcmul_(ch.decay[:, :, n], dS)
    dqd = doc @ _t(states)  # [N, H, NC, C, K]
    dP = (doc @ _t(v_new)).tril_()  # [N, H, NC, C, C]
    dkd = v_new @ _t(d_end)  # [N, H, NC, C, K]
    dWU = torch.cat([-(dv_new @ _t(states)), dv_new], -1)  # [N, H, NC, C, K + V]
    dR = torch.linalg.solve_triangular(_t(ch.M), dWU, upper=True, unitriangular=True)  # L^-T d[W, U]
    dM = (dR @ _t(ch.WU)).tril_(-1).neg_()  # [N, H, NC, C, C], strictly lower
    dbeta = (dR * ch.rhs).sum(-1) + (dM * ch.kkg).sum(-1)  # [N, H, NC, C]
    dkw, dv = (ch.beta * dR).split([K, dR.shape[-1] - K], -1)
    hm, hp = ch.gated(ch.beta * dM), ch.gated(dP)  # through M = beta (K K^T Gamma), P = Q K^T Gamma
    dq = hp @ ch.kc
    dk = hm @ ch.kc + _t(hm) @ ch.kc + _t(hp) @ ch.qc
    dg = None
    if ch.b is None:
        dq += dqd
        dk += dkd + dkw
    else:
        eb = ch.b.exp()
        dq += dqd * eb
        dk += dkd * (ch.b[..., -1:, :] - ch.b).exp() + dkw * eb
        # b_i enters Gamma_ij with + and Gamma_ji with - (Gamma_ii = 1 does not depend on b: its terms are
        # left out rather than cancelled, which would leave O(1) rounding in a dg that strong decay makes
        # tiny); exp(b) in q_d and k_w; exp(b_C) on the state. k_d = k exp(b_C - b_j) gives db_j -= y_j,
        # db_C += y_j: summed into dg_t = sum_{i >= t} db_i that is + sum_{j < t} y_j, taken directly.
        E = (dM * ch.M).add_((dP * ch.P).tril_(-1))  # [N, H, NC, C, C]: dGamma * Gamma of both products
        y = (dkd * ch.kd).sum(-1)  # [N, H, NC, C]
        db = E.sum(-1) - E.sum(-2) + (dqd * ch.qd).sum(-1) + (dkw * ch.kw).sum(-1)
        db[..., -1] += (states * d_end).sum((-1, -2)) * ch.decay[..., 0, 0]
        dgc = db.flip(-1).cumsum(-1).flip(-1)
        dgc[..., 1:] += y[..., :-1].cumsum(-1)  # exclusive cumsum: keys strictly before t
        dg = from_chunks(dgc[..., None])[..., 0]  # [N, Tp, H]
    grads = [from_chunks(dq), from_chunks(dk), from_chunks(dv),
             from_chunks(dbeta[..., None])[..., 0], dg, dS]
    return [None if d is None or t is None else d.to(t) for d, t in zip(grads, dtypes)]
