"""The compiled C++ extension `ipl_layers._C`, when it was built at install (setup.py, csrc/cpu).

Without a C++ compiler at install time the package has no `_C`; `available()` says so and the ops
raise an error naming the fix instead of an ImportError from deep inside a call.
"""

from typing import Optional, Tuple

import torch  # loads libtorch, whose symbols _C links against

try:
    from ipl_layers import _C
except ImportError as e:
    _C = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"
else:
    _IMPORT_ERROR = ""


def available() -> bool:
    return _C is not None


def _require():
    if _C is None:
        raise RuntimeError(
            "ipl_layers._C (the C++ extension) was not built or does not load "
            f"({_IMPORT_ERROR}); build it with `python setup.py build_ext --inplace` (or `make test`) on a machine "
            "with a C++ compiler"
        )
    return _C


def step_applies(q: torch.Tensor, initial_state, cu_seqlens, *others) -> bool:
    """Whether a recurrent op's call is one decoding step for the C++ extension: one token per sequence
    ([B, 1, ...], no cu_seqlens) from a state, on CPU, not float64, without autograd through any input."""
    tensors = [x for x in (q, initial_state, *others) if x is not None]
    return (
        q.shape[1] == 1
        and cu_seqlens is None
        and initial_state is not None
        and q.device.type == "cpu"
        and q.dtype != torch.float64
        and available()
        and not (torch.is_grad_enabled() and any(x.requires_grad for x in tensors))
    )


def in_place_applies(state) -> bool:
    """Whether a fused step may write a new state over these tensors (`in_place`): each float32 and contiguous
    (written where it is, not staged; a state expanded across the batch is not), none sharing memory with
    another (start weights that are the weights' own tensor would take the weights' update)."""
    if not all(t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu" for t in state):
        return False
    if len(state) == 1:  # one tensor overlaps nothing: the common decode case, kept cheap
        return True
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in state)
    return all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))


def linear_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor],
    state: torch.Tensor,
    scale: Optional[float] = None,
    in_place: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One linear-attention decoding step on CPU (csrc/common/linear_attn_step.h).

    q, k [B, H, K]; v [B, H, V]; g None, [B, H] (scalar) or [B, H, K] (per-key) log-decay;
    state [B, H, K, V] fp32. `scale` defaults to K ** -0.5.
    Returns (o [B, H, V] fp32, new_state [B, H, K, V] fp32) with new_state = D state + k^T v and
    o = scale * q new_state; `state` is left unchanged, or with `in_place` (state fp32, contiguous) overwritten by
    new_state, which is then `state` itself.
    """
    ext = _require()
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return ext.linear_attention_step(q, k, v, g, state, scale, in_place)


def delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: Optional[torch.Tensor],
    state: torch.Tensor,
    scale: Optional[float] = None,
    in_place: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One (gated) delta-rule decoding step on CPU (csrc/common/delta_rule_step.h).

    q, k [B, H, K]; v [B, H, V]; beta [B, H]; g None or [B, H] log-decay; state [B, H, K, V] fp32. `scale`
    defaults to K ** -0.5. Returns (o [B, H, V] fp32, new_state [B, H, K, V] fp32) with a = exp(g),
    new_state = a state + beta k^T (v - a k state) and o = scale * q new_state; `state` is left unchanged, or with
    `in_place` (state fp32, contiguous) overwritten by new_state, which is then `state` itself.
    """
    ext = _require()
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return ext.delta_rule_step(q, k, v, beta, g, state, scale, in_place)


def short_conv_step(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    state: torch.Tensor,
    silu: bool,
    in_place: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One short-conv decoding step on CPU (csrc/common/short_conv_step.h).

    x [B, D]; weight [D, W]; bias None or [D]; state [B, D, W-1] (the last W-1 inputs, oldest first).
    Returns (y [B, D] fp32, new_state [B, D, W-1] fp32) with y = act(bias + sum_w weight[:, w] [state, x][w])
    and new_state the last W-1 inputs after x; `state` is left unchanged, or with `in_place` (state fp32,
    contiguous) overwritten by new_state, which is then `state` itself.
    """
    return _require().short_conv_step(x, weight, bias, state, silu, in_place)


def ttt_linear_step(q, k, v, eta, ln_weight, ln_bias, scale, state, use_ln=True, use_residual=True, use_bias=True,
                    in_place=False):
    """One TTT-Linear decoding step on CPU (csrc/common/ttt_linear_step.h).

    q, k, v [N, H, K]; eta [N, H]; ln_weight, ln_bias [H, K]; scale [H, C] the position scales; state a
    `TTTLinearState` (W, sum_W [N, H, K, K], b, sum_b [N, H, K] (zeros without bias), position [N] int64).
    Returns (o [N, H, K] fp32, the new `TTTLinearState` in fp32): the token's gradient joins the open mini-batch's
    sums, committed into W, b at its end; the input state is left unchanged, or with `in_place` (W, b, sum_W,
    sum_b fp32, contiguous, apart: `in_place_applies`) overwritten and returned.
    """
    from ipl_layers.state import TTTLinearState

    outs = _require().ttt_linear_step(q, k, v, eta, ln_weight, ln_bias, scale, *state, use_ln, use_residual,
                                      use_bias, in_place)
    return outs[0], TTTLinearState(*outs[1:])


def ttt_mlp_step(q, k, v, eta, ln_weight, ln_bias, scale, state, use_ln=True, use_residual=True, in_place=False):
    """One TTT-MLP decoding step on CPU (csrc/common/ttt_mlp_step.h).

    q, k, v [N, H, K]; eta [N, H]; ln_weight, ln_bias [H, K]; scale [H, C] the position scales; state a
    `TTTMLPState` (W1, sum_W1 [N, H, K, F], b1, sum_b1 [N, H, F], W2, sum_W2 [N, H, F, K], b2, sum_b2 [N, H, K],
    position [N] int64). Returns (o [N, H, K] fp32, the new `TTTMLPState` in fp32): the token's gradients join the
    open mini-batch's sums, committed into the weights at its end; the input state is left unchanged, or with
    `in_place` (state tensors fp32, contiguous, apart: `in_place_applies`) overwritten and returned.
    """
    from ipl_layers.state import TTTMLPState

    outs = _require().ttt_mlp_step(q, k, v, eta, ln_weight, ln_bias, scale, *state, use_ln, use_residual, in_place)
    return outs[0], TTTMLPState(*outs[1:])


def titans_step(q, k, v, theta, eta, alpha, ln_weight, ln_bias, state, C, use_ln=True, use_residual=True,
                normalize_step=False, in_place=False):
    """One Titans-memory decoding step on CPU (csrc/common/titans_step.h).

    q, k [N, H, K]; v [N, H, V]; theta, eta, alpha [N, H]; ln_weight, ln_bias [H, V]; state (start, momentum,
    weights, position): three lists of L matrices [N, H, d_l, d_{l+1}] and position [N] int64 in [0, C);
    normalize_step: theta scaled by 1 / (1 + 2 rho) (`titans_memory`).
    Returns (o [N, H, V] fp32, the next (start, momentum, weights, position), fp32); the state is left unchanged,
    or with `in_place` (its tensors fp32, contiguous, apart: `in_place_applies`) overwritten and returned.
    """
    start, momentum, weights, position = state
    outs = _require().titans_step(q, k, v, theta, eta, alpha, ln_weight, ln_bias, list(start), list(momentum),
                                  list(weights), position, C, use_ln, use_residual, normalize_step, in_place)
    L = len(start)
    return outs[0], (outs[1:1 + L], outs[1 + L:1 + 2 * L], outs[1 + 2 * L:1 + 3 * L], outs[-1])


def topk_rows(x: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row of x [R, n] float32 on CPU, sorted descending (ties: earlier index
    first): (values [R, k], indices [R, k] int64). A scan with a sorted buffer, for small k (csrc/cpu/topk.cpp)."""
    return _require().topk_rows(x, k)


def embedding_bag_forward(indices: torch.Tensor, weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The weighted bag on CPU (csrc/common/embedding_bag.h): indices [M, n] int64, weights [M, n], values
    [N, D] -> out [M, D] fp32."""
    return _require().embedding_bag_forward(indices, weights, values)


def embedding_bag_backward(indices, weights, values, dout, order, offsets) -> Tuple[torch.Tensor, torch.Tensor]:
    """Its backward on CPU from the reverse index (order [M * n], offsets [U]): (dweights [M, n] fp32, drows
    [U, D] fp32, the gradients of the touched rows in ascending row order)."""
    return _require().embedding_bag_backward(indices, weights, values, dout, order, offsets)
