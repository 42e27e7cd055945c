"""The C++ CPU extension's short-conv decoding step against float64 torch and the op's reference, its input
checks, and the op's dispatch to it (one token, no autograd, on CPU)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_rms

from ipl_layers import _ext
from ipl_layers.ops import short_conv
from ipl_layers.ops.short_conv import short_conv_reference

# fp32 accumulation over W <= 4 taps (then silu) against float64 on the same inputs; measured <= 8e-8.
BOUND = 1e-6
B, D, W = 3, 37, 4  # D not a multiple of anything: no tiling assumption
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(dtype=torch.float32, width=W):
    x = torch.randn(B, D, dtype=dtype)  # [B, D]
    weight = torch.randn(D, width, dtype=dtype)  # [D, W]
    bias = torch.randn(D, dtype=dtype)  # [D]
    return x, weight, bias, torch.randn(B, D, width - 1)  # state fp32 [B, D, W-1]


def step_reference(x, weight, bias, state, silu):
    """z = bias + sum_w weight[:, w] [state, x][w], y = act(z), new state = the last W-1 inputs, in float64."""
    xs = torch.cat([state.double(), x.double()[..., None]], -1)  # [B, D, W]
    z = (xs * weight.double()).sum(-1) + (0 if bias is None else bias.double())
    return (F.silu(z) if silu else z), xs[..., 1:]


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("silu", [False, True], ids=["linear", "silu"])
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
def test_step_matches_float64(has_bias, silu, dtype):
    x, weight, bias, state = make_inputs(dtype)
    bias = bias if has_bias else None
    before = state.clone()
    y, new_state = _ext.short_conv_step(x, weight, bias, state, silu)
    y_ref, state_ref = step_reference(x, weight, bias, state, silu)
    assert y.dtype == torch.float32 and new_state.dtype == torch.float32
    assert_rel_rms("y", y, y_ref, BOUND)
    assert torch.equal(new_state, state_ref.float()), "the state is a shift of the inputs: exact"
    assert torch.equal(state, before), "the input state was modified"


@pytest.mark.parametrize("width", [1, 2], ids=["W1", "W2"])
def test_narrow_widths(width):
    # W = 1 has an empty state [B, D, 0]; W = 2 a one-entry state (the shift writes only the new input)
    x, weight, bias, state = make_inputs(width=width)
    y, new_state = _ext.short_conv_step(x, weight, bias, state, True)
    y_ref, state_ref = step_reference(x, weight, bias, state, True)
    assert_rel_rms("y", y, y_ref, BOUND)
    assert torch.equal(new_state, state_ref.float())


def test_strided_inputs():
    x, weight, bias, state = make_inputs()
    # strided views of the same values: the extension must honour strides, not assume contiguity
    xt = x.t().contiguous().t()
    wt = weight.t().contiguous().t()
    st = state.transpose(0, 2).contiguous().transpose(0, 2)
    assert not xt.is_contiguous() and not wt.is_contiguous() and not st.is_contiguous()
    y, new_state = _ext.short_conv_step(xt, wt, bias, st, True)
    y_ref, state_ref = step_reference(x, weight, bias, state, True)
    assert_rel_rms("y", y, y_ref, BOUND)
    assert torch.equal(new_state, state_ref.float())


@pytest.mark.parametrize("activation", [None, "silu"])
def test_op_decodes_through_the_step_and_follows_its_reference(activation, monkeypatch):
    # T tokens decoded one call at a time by the op (which dispatches to the C++ step) from a state equal the
    # op's reference over the whole sequence; T > W so the state is replaced entirely several times
    T = 11
    x = torch.randn(B, T, D)  # [B, T, D]
    _, weight, bias, h0 = make_inputs()
    y_ref, final_ref = short_conv_reference(x.double(), weight.double(), bias.double(), activation=activation,
                                            initial_state=h0.double(), output_final_state=True)
    calls = []
    step = _ext.short_conv_step
    monkeypatch.setattr(_ext, "short_conv_step", lambda *a, **kw: calls.append(1) or step(*a, **kw))
    state, outs = h0, []
    for t in range(T):
        y, state = short_conv(x[:, t:t + 1], weight, bias, activation=activation, initial_state=state,
                              output_final_state=True, backend="torch")
        outs.append(y)
    assert len(calls) == T, "the op did not decode through the C++ step"
    assert_rel_rms("y", torch.cat(outs, dim=1), y_ref, BOUND)
    assert_rel_rms("final_state", state, final_ref, BOUND)


def test_op_keeps_the_differentiable_path_under_autograd(monkeypatch):
    x, weight, bias, state = make_inputs()
    monkeypatch.setattr(_ext, "short_conv_step", lambda *a, **kw: pytest.fail("autograd call reached the step"))
    weight.requires_grad_()
    y, _ = short_conv(x[:, None], weight, bias, activation="silu", initial_state=state, backend="torch")
    assert y.requires_grad


def _bad(**change):
    x, weight, bias, state = make_inputs()
    args = dict(x=x, weight=weight, bias=bias, state=state)
    args.update(change)
    return args


@pytest.mark.parametrize(
    "args, error, match",
    [
        (_bad(x=torch.randn(B, 1, D)), ValueError, r"x: expected 2-D \[B, D\], got 3-D"),
        (_bad(weight=torch.randn(D + 1, W)), ValueError, r"weight: expected shape \[D, W\] with D = 37"),
        (_bad(weight=torch.randn(D)), ValueError, r"weight: expected 2-D \[D, W\], got 1-D"),
        (_bad(bias=torch.randn(D - 1)), ValueError, r"bias: expected shape \[D\] = \[37\], got \[36\]"),
        (_bad(state=torch.randn(B, D, W)), ValueError, r"state: expected shape \[B, D, W-1\] = \[3, 37, 3\]"),
        (_bad(state=torch.randn(B, W - 1, D)), ValueError, r"state: expected shape \[B, D, W-1\]"),
        (_bad(x=torch.ones(B, D, dtype=torch.int64)), TypeError, "x: expected a floating dtype"),
    ],
    ids=["x-rank", "weight-dim", "weight-rank", "bias-shape", "state-width", "state-layout", "x-dtype"],
)
def test_bad_inputs_raise_naming_the_argument(args, error, match):
    with pytest.raises(error, match=match):
        _ext.short_conv_step(**args, silu=True)
