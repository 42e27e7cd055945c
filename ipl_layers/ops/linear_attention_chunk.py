"""Torch chunked path of `linear_attention`: the CPU path, matmul-bound, with a hand-written backward.

Sequences are padded to [N, Tp, H, *] with Tp a multiple of the chunk size C (zero q/k/v and zero
log-decay in the padding, which leaves the state untouched). Inside chunk n, with b_i the inclusive
cumsum of g within the chunk (b <= 0, decreasing) and S0 the chunk's start state:

    o_i   = scale * [ (q_i * exp(b_i)) S0 + sum_{j<=i} A_ij v_j ],   A_ij = sum_k q_ik k_jk exp(b_ik - b_jk)
    S_end = exp(b_C) * S0 + sum_j (k_j * exp(b_C - b_j))^T v_j

Every exponent is <= 0, so nothing overflows however strong the decay. The per-key form (GLA) has two
intra-chunk forms. When the log-decay spans at most SPAN_MAX inside every chunk (GLA's gates: about
0.5 per token or less), A = (q exp(b - m)) (k exp(m - b))^T with m the chunk's mid log-decay, one
matmul whose factors stay within exp(+-SPAN_MAX / 2). Otherwise the chunk splits into sub-chunks of SUB
positions: between sub-chunks both factors are taken against a reference point (the log-decay at the
end of the previous sub-chunk), inside one the [SUB, SUB, K] decays are explicit.
"""

from typing import Optional, Tuple

import math

import torch
import torch.nn.functional as F

SUB = 8  # sub-chunk length of the per-key (GLA) intra-chunk form
SPAN_MAX = 30.0  # largest in-chunk log-decay span of the one-matmul per-key form: factors <= e^15


def pad_sequences(q, k, v, g, cu_seqlens, chunk_size) -> Tuple:
    """[B, T, H, *] (or packed [1, T, H, *] with cu_seqlens) -> [N, Tp, H, *] and the inverse for o."""
    B, T = q.shape[:2]
    if cu_seqlens is None:
        Tp = -(-T // chunk_size) * chunk_size
        pad = lambda x: x if x is None or Tp == T else F.pad(x, (0, 0) * (x.dim() - 2) + (0, Tp - T))  # noqa: E731
        return pad(q), pad(k), pad(v), pad(g), lambda o: o[:, :T]
    offsets = cu_seqlens.to(torch.long)
    lengths = offsets[1:] - offsets[:-1]  # [N]
    Tp = max(-(-int(lengths.max()) // chunk_size) * chunk_size, chunk_size) if lengths.numel() else chunk_size
    pos = torch.arange(Tp, device=q.device)  # [Tp]
    valid = pos[None, :] < lengths[:, None]  # [N, Tp]
    index = torch.where(valid, offsets[:-1, None] + pos[None, :], T)  # [N, Tp]; T points at a zero row

    def gather(x):
        if x is None:
            return None
        rows = torch.cat([x[0], x.new_zeros((1,) + x.shape[2:])])  # [T + 1, H, *]
        return rows[index]  # [N, Tp, H, *]

    def unpad(o):  # [N, Tp, H, V] -> [1, T, H, V]
        return o[valid][None]

    return gather(q), gather(k), gather(v), gather(g), unpad


def _chunked(x: torch.Tensor, C: int, dtype) -> torch.Tensor:
    """[N, Tp, H, *] -> [N, H, NC, C, *] in the compute dtype."""
    N, Tp, H = x.shape[:3]
    return x.to(dtype).reshape(N, Tp // C, C, H, *x.shape[3:]).movedim(3, 1).contiguous()


def _unchunked(x: torch.Tensor) -> torch.Tensor:
    """[N, H, NC, C, *] -> [N, Tp, H, *]."""
    N, H, NC, C = x.shape[:4]
    return x.movedim(1, 3).reshape(N, NC * C, H, *x.shape[4:])


class _Decays:
    """Log-decay bookkeeping of one call, in the chunked layout (g None, scalar or per key)."""

    def __init__(self, g: Optional[torch.Tensor], C: int, dtype):
        self.kind = "none" if g is None else ("scalar" if g.dim() == 3 else "key")
        self.b = None if g is None else _chunked(g, C, dtype).cumsum(3)  # [N, H, NC, C(, K)]

    def _col(self, x):  # scalar decays broadcast over the key dim
        return x[..., None] if self.kind == "scalar" else x

    def q_factor(self):  # exp(b_i): [N, H, NC, C, 1|K]
        return self._col(self.b.exp())

    def k_factor(self):  # exp(b_C - b_j): [N, H, NC, C, 1|K]
        return self._col((self.b[:, :, :, -1:] - self.b).exp())

    def chunk_decay(self):  # exp(b_C) on the state's rows: [N, H, NC, 1|K, 1]
        return self._col(self.b[:, :, :, -1].exp())[..., None]

    def pair_decay(self, C: int):  # scalar form: exp(b_i - b_j) masked to j <= i, [N, H, NC, C, C]
        causal = torch.ones(C, C, dtype=torch.bool, device=self.b.device).tril()
        diff = self.b[..., :, None] - self.b[..., None, :]
        return torch.where(causal, diff, float("-inf")).exp()


def _subchunk_factors(b: torch.Tensor, C: int):
    """Per-key form: the factors of A between and within sub-chunks, every exponent <= 0.

    Returns qf [.., n, s, K] = exp(b_i - r_I), kf [.., n, C, K] = exp(r_I - b_j) for j before sub-chunk I
    (0 elsewhere), and ef [.., n, s, s, K] = exp(b_i - b_j) for j <= i inside sub-chunk I (0 elsewhere).
    """
    s = math.gcd(SUB, C)
    n = C // s
    K = b.shape[-1]
    bs = b.reshape(*b.shape[:-2], n, s, K)  # [.., n, s, K]
    ref = torch.cat([torch.zeros_like(b[..., :1, :]), b[..., s - 1 : C - 1 : s, :]], dim=-2)  # [.., n, K]
    qf = (bs - ref[..., :, None, :]).exp()
    before = torch.arange(C, device=b.device)[None, :] < (torch.arange(n, device=b.device) * s)[:, None]  # [n, C]
    kexp = ref[..., :, None, :] - b[..., None, :, :]  # [.., n, C, K]
    kf = torch.where(before[:, :, None], kexp, float("-inf")).exp()
    causal = torch.ones(s, s, dtype=torch.bool, device=b.device).tril()[:, :, None]  # [s, s, 1]
    ef = torch.where(causal, bs[..., :, None, :] - bs[..., None, :, :], float("-inf")).exp()
    return qf, kf, ef, s, n


def _blocks(x: torch.Tensor, n: int, s: int) -> torch.Tensor:
    """[.., C, *] -> [.., n, s, *]."""
    return x.reshape(*x.shape[:-2], n, s, x.shape[-1])


def _midpoint_factors(b: torch.Tensor):
    """exp(b - m), exp(m - b) [N, H, NC, C, K] with m the chunk's mid log-decay, or None when some chunk's
    log-decay spans more than SPAN_MAX (the factors could then overflow)."""
    first, last = b[..., :1, :], b[..., -1:, :]  # [N, H, NC, 1, K]
    if b.numel() == 0 or float((first - last).max()) > SPAN_MAX:
        return None
    rel = b - 0.5 * (first + last)
    return rel.exp(), rel.neg().exp()


def _intra_key(q, k, b, C):
    """Per-key A [N, H, NC, C, C] (lower triangular, unscaled)."""
    mid = _midpoint_factors(b)
    if mid is not None:
        return ((q * mid[0]) @ (k * mid[1]).transpose(-1, -2)).tril_()
    qf, kf, ef, s, n = _subchunk_factors(b, C)
    qs = _blocks(q, n, s) * qf  # [.., n, s, K]
    ks = k[..., None, :, :] * kf  # [.., n, C, K]
    A = (qs @ ks.transpose(-1, -2)).reshape(*q.shape[:-2], C, C)  # [.., C, C]: blocks before the diagonal
    qb, kb = _blocks(q, n, s), _blocks(k, n, s)
    diag = (qb[..., :, None, :] * kb[..., None, :, :] * ef).sum(-1)  # [.., n, s, s]
    Ablk = A.view(*A.shape[:-2], n, s, n, s)
    torch.diagonal(Ablk, dim1=-4, dim2=-2).copy_(diag.movedim(-3, -1))
    return A


def _intra_key_grads(q, k, b, C, dA):
    """Per-key: gradients of q and k through A = intra(q, k, b), given dA [.., C, C] (lower triangular)."""
    mid = _midpoint_factors(b)
    if mid is not None:
        qf, kf = mid
        return (dA @ (k * kf)).mul_(qf), (dA.transpose(-1, -2) @ (q * qf)).mul_(kf)
    qf, kf, ef, s, n = _subchunk_factors(b, C)
    qb, kb = _blocks(q, n, s), _blocks(k, n, s)
    dAb = dA.reshape(*dA.shape[:-2], n, s, C)  # [.., n, s, C]; kf is 0 on the diagonal blocks
    ks = k[..., None, :, :] * kf  # [.., n, C, K]
    dq = (dAb @ ks) * qf  # [.., n, s, K]
    dk = ((dAb.transpose(-1, -2) @ (qb * qf)) * kf).sum(-3)  # [.., C, K]
    ddiag = torch.diagonal(dA.reshape(*dA.shape[:-2], n, s, n, s), dim1=-4, dim2=-2).movedim(-1, -3)  # [.., n, s, s]
    w = ddiag[..., None] * ef  # [.., n, s, s, K]
    dq = dq + (w * kb[..., None, :, :]).sum(-2)
    dk = dk + _unblock((w * qb[..., :, None, :]).sum(-3))
    return _unblock(dq), dk


def _unblock(x: torch.Tensor) -> torch.Tensor:
    """[.., n, s, K] -> [.., C, K]."""
    return x.reshape(*x.shape[:-3], x.shape[-3] * x.shape[-2], x.shape[-1])


def _intra(q, k, dec: _Decays, C):
    """A [N, H, NC, C, C] (lower triangular incl. the diagonal, unscaled) and, for scalar g, its decays."""
    if dec.kind == "key":
        return _intra_key(q, k, dec.b, C), None
    A = q @ k.transpose(-1, -2)
    if dec.kind == "scalar":
        M = dec.pair_decay(C)
        return A.mul_(M), M
    return A.tril_(), None


def _compute_dtype(x: torch.Tensor):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def chunk_forward(q, k, v, g, initial_state, scale, C):
    """Padded inputs -> (o [N, Tp, H, V] in v.dtype, saved tensors for `chunk_backward`, final [N, H, K, V]).

    Saved: the chunk start states [N, H, NC, K, V], A and (scalar g) its decay matrix [N, H, NC, C, C].
    """
    dt = _compute_dtype(q)
    qc, kc, vc = _chunked(q, C, dt), _chunked(k, C, dt), _chunked(v, C, dt)  # [N, H, NC, C, *]
    dec = _Decays(g, C, dt)
    N, H, NC = qc.shape[:3]
    K, V = qc.shape[-1], vc.shape[-1]
    kd = kc if dec.kind == "none" else kc * dec.k_factor()  # keys decayed to the chunk end
    U = kd.transpose(-1, -2) @ vc  # [N, H, NC, K, V]: each chunk's own contribution to its end state
    decay = None if dec.kind == "none" else dec.chunk_decay()  # [N, H, NC, 1|K, 1]
    S = torch.zeros(N, H, K, V, dtype=dt, device=q.device) if initial_state is None else initial_state.to(dt)
    states = torch.empty(N, H, NC, K, V, dtype=dt, device=q.device)
    for n in range(NC):
        states[:, :, n] = S
        S = U[:, :, n] + (S if decay is None else decay[:, :, n] * S)
    qd = qc if dec.kind == "none" else qc * dec.q_factor()
    A, M = _intra(qc, kc, dec, C)  # [N, H, NC, C, C]
    o = torch.baddbmm(_flat(A @ vc), _flat(qd), _flat(states)).mul_(scale)  # [N*H*NC, C, V]
    return _unchunked(o.view(N, H, NC, C, V)).to(v.dtype), (states, A, M), S


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[N, H, NC, a, b] -> [N*H*NC, a, b] for bmm."""
    return x.reshape(-1, *x.shape[-2:])


def _log_decay_grad(qc, kc, dq_state, dq_intra, dk_state, dk_intra, states, dU, decay, kind):
    """d g [N, Tp, H(, K)] from the gradients' parts, chunk by chunk, with no cancelling terms.

    b_i = sum_{t <= i} g_t inside a chunk, so dg_t = sum_{i >= t} db_i. By term of the chunk's math:
    q_i exp(b_i) S0 gives db_i += q_i dq_i (state part); A_ij for j < i gives db_i += w_ij, db_j -= w_ij
    (summed: q dq - k dk over the strict intra parts; A_ii does not depend on b); k_j exp(b_C - b_j)
    gives db_j -= y_j, db_C += y_j with y = k dk (state part), which sum to +sum_{j < t} y_j in dg_t; and
    exp(b_C) S0 gives db_C += sum_v exp(b_C) S0 dS_end. Nothing O(1) cancels, so dg keeps its relative
    accuracy under strong decay, where it is ~exp(g) times the terms of the global identity.
    """
    x = qc * (dq_state + dq_intra) - kc * dk_intra  # [N, H, NC, C, K]
    y = kc * dk_state
    dgc = x.flip(-2).cumsum(-2).flip(-2)
    dgc[..., 1:, :] += y[..., :-1, :].cumsum(-2)  # exclusive cumsum: only keys strictly before t
    dgc += (decay * states * dU).sum(-1)[..., None, :]  # [N, H, NC, 1, K]: through the chunk's decay
    dg = _unchunked(dgc)  # [N, Tp, H, K]
    return dg.sum(-1) if kind == "scalar" else dg


def chunk_backward(q, k, v, g, initial_state, saved, do, dht, scale, C):
    """Gradients of q, k, v, g, initial_state for `chunk_forward` (derivation in the module docstring).

    The diagonal of A is kept apart: its terms cancel exactly in the log-decay gradient.
    """
    states, A, M = saved
    dt = _compute_dtype(q)
    qc, kc, vc, doc = (_chunked(x, C, dt) for x in (q, k, v, do))  # [N, H, NC, C, *]
    dec = _Decays(g, C, dt)
    NC = qc.shape[2]
    qd = qc if dec.kind == "none" else qc * dec.q_factor()
    kf = None if dec.kind == "none" else dec.k_factor()
    kd = kc if kf is None else kc * kf
    decay = None if dec.kind == "none" else dec.chunk_decay()
    # Reverse scan: dU[n] is the gradient of the state at the end of chunk n.
    P = (qd.transpose(-1, -2) @ doc).mul_(scale)  # [N, H, NC, K, V]: chunk n's outputs -> its start state
    G = torch.zeros_like(states[:, :, 0]) if dht is None else dht.to(dt)
    dU = torch.empty_like(states)
    for n in reversed(range(NC)):
        dU[:, :, n] = G
        G = P[:, :, n] + (G if decay is None else decay[:, :, n] * G)
    dv = torch.baddbmm(_flat(kd @ dU), _flat(A.transpose(-1, -2)), _flat(doc), alpha=scale).view_as(vc)
    dA = (doc @ vc.transpose(-1, -2)).mul_(scale)  # [N, H, NC, C, C]
    dq = (doc @ states.transpose(-1, -2)).mul_(scale)  # [N, H, NC, C, K]: through the start state
    dk = vc @ dU.transpose(-1, -2)  # through the end state
    if dec.kind != "none":
        dq, dk = dq.mul_(dec.q_factor()), dk.mul_(kf)
    diag = torch.diagonal(dA, dim1=-2, dim2=-1)[..., None]  # [.., C, 1]: A_ii = q_i k_i, free of decay
    strict = dA.tril(-1)
    if dec.kind == "key":
        dqi, dki = _intra_key_grads(qc, kc, dec.b, C, strict)
    else:
        strict = strict.mul_(M) if dec.kind == "scalar" else strict
        dqi, dki = strict @ kc, strict.transpose(-1, -2) @ qc
    dg = None
    if g is not None:
        dg = _log_decay_grad(qc, kc, dq, dqi, dk, dki, states, dU, decay, dec.kind).to(g.dtype)
    dq = dq.add_(dqi).addcmul_(diag, kc)
    dk = dk.add_(dki).addcmul_(diag, qc)
    dh0 = None if initial_state is None else G.to(initial_state.dtype)
    return _unchunked(dq).to(q.dtype), _unchunked(dk).to(k.dtype), _unchunked(dv).to(v.dtype), dg, dh0
