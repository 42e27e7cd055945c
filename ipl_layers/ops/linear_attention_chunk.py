"""Torch chunked path of `linear_attention`: the CPU path, matmul-bound, with a hand-written backward.

Sequences are padded to [N, Tp, H, *] with Tp a multiple of the chunk size C (zero q/k/v and zero
log-decay in the padding, which leaves the state untouched). Inside chunk n, with b_i the inclusive
cumsum of g within the chunk (b <= 0, decreasing) and S0 the chunk's start state:

    o_i   = scale * [ (q_i * exp(b_i)) S0 + sum_{j<=i} A_ij v_j ],   A_ij = sum_k q_ik k_jk exp(b_ik - b_jk)
    S_end = exp(b_C) * S0 + sum_j (k_j * exp(b_C - b_j))^T v_j

No exponent that can be large is ever positive, so nothing overflows however strong the decay. When
the log-decay spans at most SPAN_MAX inside every chunk (the usual case: gates of about 1 per token
or less at C = 64), everything is factored around the chunk's mid log-decay m:

    q~ = q exp(b - m),  k~ = k exp(m - b)         (factors within exp(+-SPAN_MAX / 2))
    A  = tril(q~ k~^T),  o = scale [q~ (exp(m) S0) + A v],  S_end = exp(b_C) S0 + exp(b_C - m) k~^T v

so A is one matmul and the decays cost two passes over q and k. Otherwise the decays are explicit:
exp(b_i - b_j) masked to j <= i for scalar g, sub-chunks for per-key g (`linear_attention_subchunk`).
"""

from typing import Optional

import torch

from ipl_layers.ops import linear_attention_subchunk as subchunk
from ipl_layers.ops.chunking import from_chunks, to_chunks

# Largest in-chunk log-decay span of the factored form. Its factors stay within exp(+-40), inside fp32's
# normal range (exp(+-87)), and every kept entry of A is <= |q||k|; entries above the diagonal can reach
# exp(80) |q||k| K and overflow, but tril_ overwrites them (it writes zeros, it does not multiply).
SPAN_MAX = 80.0


class _Decays:
    """Log-decay bookkeeping of one call, in the chunked layout (g None, scalar or per key)."""

    def __init__(self, g: Optional[torch.Tensor], C: int, dtype):
        self.kind = "none" if g is None else ("scalar" if g.dim() == 3 else "key")
        b = None if g is None else to_chunks(g, C, dtype).cumsum(3)  # [N, H, NC, C(, K)]
        self.b = None if b is None else (b[..., None] if self.kind == "scalar" else b)  # [N, H, NC, C, 1|K]

    def q_factor(self):  # exp(b_i): [N, H, NC, C, 1|K]
        return self.b.exp()

    def k_factor(self):  # exp(b_C - b_j): [N, H, NC, C, 1|K]
        return (self.b[..., -1:, :] - self.b).exp()

    def chunk_decay(self):  # exp(b_C) on the state's rows: [N, H, NC, 1|K, 1]
        return self.b[..., -1:, :].exp().transpose(-1, -2)

    def pair_decay(self, C: int):  # scalar g: exp(b_i - b_j) masked to j <= i, [N, H, NC, C, C]
        causal = torch.ones(C, C, dtype=torch.bool, device=self.b.device).tril()
        diff = self.b - self.b.transpose(-1, -2)
        return torch.where(causal, diff, float("-inf")).exp()

    def span_ok(self) -> bool:
        first, last = self.b[..., :1, :], self.b[..., -1:, :]
        return self.b.numel() == 0 or float((first - last).max()) <= SPAN_MAX


class _Form:
    """The operands of one call's chunked math (module docstring): qs, ks feed the chunk states
    (q exp(b) and k exp(b_C - b): exponents <= 0), qi, ki the intra-chunk scores A. In the factored form
    qi = q exp(b - m) = qs / em and ki = k exp(m - b) = ks / el (em = exp(m), el = exp(b_C - m), per
    chunk and key channel); with explicit decays A is built from q, k themselves."""

    def __init__(self, qc, kc, dec: _Decays, C: int):
        self.dec, self.C = dec, C
        self.factored = dec.kind == "none" or dec.span_ok()
        self.em = self.el = self.e1 = self.e2 = self.M = None
        if dec.kind == "none":
            self.qs = self.qi = qc
            self.ks = self.ki = kc
        elif self.factored:
            first, last = dec.b[..., :1, :], dec.b[..., -1:, :]  # [N, H, NC, 1, 1|K]
            mid = 0.5 * (first + last)
            self.e1 = (dec.b - mid).exp()  # [N, H, NC, C, 1|K]
            self.e2 = self.e1.reciprocal()
            self.qi, self.ki = qc * self.e1, kc * self.e2
            self.em, self.el = mid.exp(), (last - mid).exp()  # [N, H, NC, 1, 1|K]: scale columns, fast
            self.qs, self.ks = self.qi * self.em, self.ki * self.el
        else:
            self.qs = self.qi = qc * dec.q_factor()
            self.ks = self.ki = kc * dec.k_factor()
            if dec.kind == "scalar":
                self.M = dec.pair_decay(C)

    def intra(self, qc, kc):
        """A [N, H, NC, C, C], lower triangular incl. the diagonal, unscaled."""
        if self.factored:
            return (self.qi @ self.ki.transpose(-1, -2)).tril_()
        if self.M is not None:
            return (qc @ kc.transpose(-1, -2)).mul_(self.M)
        return subchunk.intra(qc, kc, self.dec.b, self.C)

    def intra_grads(self, qc, kc, strict):
        """Gradients through the strictly lower part of A, in the operands' space (factored) or of q, k."""
        if self.factored:
            return strict @ self.ki, strict.transpose(-1, -2) @ self.qi
        if self.M is not None:
            strict = strict * self.M
            return strict @ kc, strict.transpose(-1, -2) @ qc
        return subchunk.intra_grads(qc, kc, self.dec.b, self.C, strict)


def _compute_dtype(x: torch.Tensor):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[N, H, NC, a, b] -> [N*H*NC, a, b] for bmm."""
    return x.reshape(-1, *x.shape[-2:])


def _scan(U, decay, start, reverse=False):
    """The chunk recurrence x_{n+1} = decay_n x_n + U_n over n (U [N, H, NC, K, V], decay [N, H, NC, 1|K, 1]
    or None). Forward, from x_0 = start: returns ([x_0 .. x_{NC-1}], x_NC), the states where chunks start
    and the final one. Reverse (x_n = decay_n x_{n+1} + U_n from x_NC = start): ([x_1 .. x_NC], x_0)."""
    NC = U.shape[2]
    seq = torch.empty_like(U)
    first, steps = (NC - 1, range(NC - 1, 0, -1)) if reverse else (0, range(NC - 1))
    seq[:, :, first] = 0 if start is None else start
    nxt = -1 if reverse else 1
    for n in steps:
        if decay is None:
            torch.add(U[:, :, n], seq[:, :, n], out=seq[:, :, n + nxt])
        else:
            torch.addcmul(U[:, :, n], decay[:, :, n], seq[:, :, n], out=seq[:, :, n + nxt])
    n = 0 if reverse else NC - 1
    last = U[:, :, n] + (seq[:, :, n] if decay is None else decay[:, :, n] * seq[:, :, n])
    return seq, last


def chunk_forward(q, k, v, g, initial_state, scale, C):
    """Padded inputs -> (o [N, Tp, H, V] in v.dtype, saved for `chunk_backward`, final state [N, H, K, V]).

    Saved: the chunk start states [N, H, NC, K, V], A [N, H, NC, C, C], the call's `_Form` and v chunked.
    """
    dt = _compute_dtype(q)
    qc, kc, vc = to_chunks(q, C, dt), to_chunks(k, C, dt), to_chunks(v, C, dt)  # [N, H, NC, C, *]
    dec = _Decays(g, C, dt)
    form = _Form(qc, kc, dec, C)
    N, H, NC = qc.shape[:3]
    V = vc.shape[-1]
    U = form.ks.transpose(-1, -2) @ vc  # [N, H, NC, K, V]: each chunk's own part
    decay = None if dec.kind == "none" else dec.chunk_decay()  # [N, H, NC, 1|K, 1]
    states, S = _scan(U, decay, None if initial_state is None else initial_state.to(dt))
    A = form.intra(qc, kc)  # [N, H, NC, C, C]
    o = torch.baddbmm(_flat(A @ vc), _flat(form.qs), _flat(states)).mul_(scale)
    return from_chunks(o.view(N, H, NC, C, V)).to(v.dtype), (states, A, form, vc), S


def _log_decay_grad(x, y, states, dU, decay, kind):
    """d g [N, Tp, H(, K)] from the gradients' parts, chunk by chunk, with no cancelling terms.

    x = q dq (state and strict intra parts) - k dk (strict intra part), y = k dk (state part), each
    product taken in any operand space (the factors cancel). b_i =
    sum_{t <= i} g_t inside a chunk, so dg_t = sum_{i >= t} db_i. By term of the chunk's math:
    q_i exp(b_i) S0 gives db_i += q_i dq_i (state part); A_ij for j < i gives db_i += w_ij, db_j -= w_ij
    (summed: q dq - k dk over the strict intra parts; A_ii does not depend on b); k_j exp(b_C - b_j)
    gives db_j -= y_j, db_C += y_j with y = k dk (state part), which sum to +sum_{j < t} y_j in dg_t; and
    exp(b_C) S0 gives db_C += sum_v exp(b_C) S0 dS_end. Nothing O(1) cancels, so dg keeps its relative
    accuracy under strong decay, where it is ~exp(g) times the terms of the global identity.
    """
    dgc = x.flip(-2).cumsum(-2).flip(-2)
    dgc[..., 1:, :] += y[..., :-1, :].cumsum(-2)  # exclusive cumsum: only keys strictly before t
    dgc += (decay * states * dU).sum(-1)[..., None, :]  # [N, H, NC, 1, K]: through the chunk's decay
    dg = from_chunks(dgc)  # [N, Tp, H, K]
    return dg.sum(-1) if kind == "scalar" else dg


def chunk_backward(q, k, v, g, initial_state, saved, do, dht, scale, C):
    """Gradients of q, k, v, g, initial_state for `chunk_forward` (derivation in the module docstring).

    The diagonal of A is kept apart: its terms cancel exactly in the log-decay gradient.
    """
    states, A, form, vc = saved
    dt = _compute_dtype(q)
    doc = to_chunks(do, C, dt)  # [N, H, NC, C, V]
    # q, k themselves only where the decays are explicit; the factored form works on its operands
    qc, kc = (None, None) if form.factored else (to_chunks(q, C, dt), to_chunks(k, C, dt))
    dec = form.dec
    decay = None if dec.kind == "none" else dec.chunk_decay()
    # Reverse scan: dU[n] is the gradient of the state at the end of chunk n, G that of the initial state.
    P = (form.qs.transpose(-1, -2) @ doc).mul_(scale)  # [N, H, NC, K, V]: to the chunk's start state
    dU, G = _scan(P, decay, None if dht is None else dht.to(dt), reverse=True)
    dv = torch.baddbmm(_flat(form.ks @ dU), _flat(A.transpose(-1, -2)), _flat(doc), alpha=scale).view_as(vc)
    dA = (doc @ vc.transpose(-1, -2)).mul_(scale)  # [N, H, NC, C, C]
    dqs = (doc @ states.transpose(-1, -2)).mul_(scale)  # [N, H, NC, C, K] w.r.t. qs
    dks = vc @ dU.transpose(-1, -2)  # w.r.t. ks
    diag = torch.diagonal(dA, dim1=-2, dim2=-1)[..., None].clone()  # [.., C, 1]: A_ii = q_i k_i, no decay
    dqa, dka = form.intra_grads(qc, kc, dA.tril_(-1))  # w.r.t. qi, ki (factored) or q, k
    xq, xk = (form.qi, form.ki) if form.factored else (qc, kc)
    dg = None
    if g is not None:
        x = (form.qs * dqs).addcmul_(xq, dqa).sub_(xk * dka)  # [N, H, NC, C, K]
        dg = _log_decay_grad(x, form.ks * dks, states, dU, decay, dec.kind).to(g.dtype)
    if dec.kind == "none":
        dq, dk = dqs.add_(dqa).addcmul_(diag, xk), dks.add_(dka).addcmul_(diag, xq)
    elif form.factored:  # qs = qi em, qi = q e1 (and ks = ki el, ki = k e2)
        dq = dqs.mul_(form.em).add_(dqa).addcmul_(diag, form.ki).mul_(form.e1)
        dk = dks.mul_(form.el).add_(dka).addcmul_(diag, form.qi).mul_(form.e2)
    else:
        dq = dqs.mul_(dec.q_factor()).add_(dqa).addcmul_(diag, kc)
        dk = dks.mul_(dec.k_factor()).add_(dka).addcmul_(diag, qc)
    dh0 = None if initial_state is None else G.to(initial_state.dtype)
    return from_chunks(dq).to(q.dtype), from_chunks(dk).to(k.dtype), from_chunks(dv).to(v.dtype), dg, dh0
