"""Backward of `ttt_linear` on Triton: three kernels, so that only the weights' gradients run mini-batch after
mini-batch and each kernel's tiles fit one program's registers.

1. `linear_bwd_dq.py`, parallel over mini-batches: dX (the outputs' pre-LN gradient) and dq, the output
   LN's parameter gradients and the scales' per-position share.
2. `linear_bwd_dw.py`, one program per (sequence, head), in reverse: dL/dW at every mini-batch's end,
   and dL/dW0.
3. `linear_bwd_dk.py`, parallel over mini-batches: dk, dv, deta, the inner LN's parameter gradients, the
   scales' share through commits, and the open initial mini-batch's sums' gradients.
"""

import torch
import triton

from ipl_layers.kernels.ttt import linear_common as common
from ipl_layers.kernels.ttt.linear_bwd_dk import ttt_linear_bwd_dk_kernel
from ipl_layers.kernels.ttt.linear_bwd_dq import ttt_linear_bwd_dq_kernel
from ipl_layers.kernels.ttt.linear_bwd_dw import ttt_linear_bwd_dw_kernel


def ttt_linear_bwd(q, k, v, eta, ln_weight, ln_bias, scale, W0, b0, sum_W0, sum_b0, position0, cu_seqlens,
                   mini_batch_size, use_ln, use_residual, use_bias, saved, do, dW, db, dsum_W, dsum_b):
    """Gradients of `ttt_linear_fwd`'s outputs (o, W, b, sum_W, sum_b) with cotangents do, dW, db, dsum_W,
    dsum_b (the final-state ones may be None: zero). Arguments as for the forward, `saved` its
    `TTTLinearSaved`. Returns dq, dk, dv, deta (input dtypes), dln_weight, dln_bias [H, K], dscale [H, b],
    dW0, db0, dsum_W0, dsum_b0 (fp32; zeros where the input is unused: LN parameters without LN, biases
    without bias, sums without an open mini-batch).
    """
    B, T, H, K = q.shape
    L = common.prepare(q, ln_weight, ln_bias, scale, sum_W0, position0, cu_seqlens, mini_batch_size, use_ln,
                       use_residual, use_bias)
    q, k, v, eta, do, sum_W0, position0 = common.contiguous(q, k, v, eta, do, sum_W0, position0)
    _, sum_b0 = common.bias_states(use_bias, W0, b0, sum_W0, sum_b0)
    # the final-state cotangents in pairs: one given, the other zero
    dW, db = _pair(dW, db, use_bias)
    dsum_W, dsum_b = _pair(dsum_W, dsum_b, use_bias)
    f32 = dict(device=q.device, dtype=torch.float32)
    NS = saved.Ws.shape[0]
    shared = (q, k, v, eta, L.ln_weight, L.ln_bias, L.scale)

    # per-slot partials (slots no mini-batch uses stay zero): [output LN, inner LN] x [weight, bias]
    dln = torch.zeros(2, 2, NS, H, K, **f32)
    dscale = torch.zeros(NS, H, L.C, **f32)
    dscale_C = torch.zeros(NS, H, **f32)
    dx = torch.empty(B, T, H, K, **f32)
    dq, dk, dv, deta = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(eta)
    # the parallel kernels' grid covers the longest sequence: cdiv(position + length, b) <= cdiv(length + b - 1, b)
    longest = T if cu_seqlens is None else int(torch.diff(cu_seqlens).max())
    grid = (L.N * H, triton.cdiv(longest + L.C - 1, L.C))
    ttt_linear_bwd_dq_kernel[grid](
        *shared, sum_W0, sum_b0, position0, saved.Ws, saved.bs, do, dq, dx, dln[0, 0], dln[0, 1], dscale,
        cu_seqlens, T, **L.flags,
    )

    dWs = torch.empty_like(saved.Ws)
    dbs = torch.empty_like(saved.bs) if use_bias else None
    dW0 = torch.empty(L.N, H, K, K, **f32)
    db0 = (torch.empty if use_bias else torch.zeros)(L.N, H, K, **f32)
    dsum_W0 = (torch.empty if sum_W0 is not None else torch.zeros)(L.N, H, K, K, **f32)
    dsum_b0 = (torch.empty if sum_W0 is not None and use_bias else torch.zeros)(L.N, H, K, **f32)
    ttt_linear_bwd_dw_kernel[(L.N * H,)](
        *shared, position0, saved.Ws, saved.bs, dx, dW, db, dsum_W, dsum_b, dWs, dbs, dW0, db0, dsum_W0, dsum_b0,
        cu_seqlens, T, USE_DW=dW is not None, USE_DSUMS=dsum_W is not None, **L.flags,
    )

    ttt_linear_bwd_dk_kernel[grid](
        *shared, sum_W0, sum_b0, position0, saved.Ws, saved.bs, dx, dWs, dbs, dsum_W, dsum_b, dk, dv, deta,
        dsum_W0, dsum_b0, dln[1, 0], dln[1, 1], dscale_C, cu_seqlens, T, USE_DSUMS=dsum_W is not None, **L.flags,
    )
    dln = dln.sum((0, 2))  # [2, H, K]: weight, bias
    dscale = dscale.sum(0)
    dscale[:, -1] += dscale_C.sum(0)
    return dq, dk, dv, deta, dln[0], dln[1], dscale, dW0, db0, dsum_W0, dsum_b0


def _pair(dW, db, use_bias):
    """A final-state cotangent pair (matrix [N, H, K, K], vector [N, H, K]) as the kernels read it: both
    None, or both tensors (a missing one zero; the vector None without bias)."""
    if dW is None and (db is None or not use_bias):
        return None, None
    if dW is None:
        dW = db.new_zeros(*db.shape, db.shape[-1])
    if not use_bias:
        return dW.contiguous(), None
    return dW.contiguous(), (dW.new_zeros(dW.shape[:-1]) if db is None else db.contiguous())
