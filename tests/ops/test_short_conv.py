"""`short_conv` on every path (torch; Triton in fp32 under the interpreter) against the float64 reference:
outputs, final states and the gradients of x, weight, bias and initial_state."""

import pytest
import torch
from helpers import assert_rel_rms
from hypothesis import given, settings
from hypothesis import strategies as st

from ipl_layers.ops import short_conv, short_conv_reference

FP32_BOUND = 1e-5  # fp32 paths vs the float64 reference (observed ~1e-7)
BF16_BOUND = 1e-2  # bf16 inputs and outputs (rounding ~4e-3 each), fp32 math
FP16_BOUND = 2e-3  # fp16 inputs and outputs (rounding ~5e-4 each), fp32 math
PATHS = ["torch", "triton"]


def _inputs(B, T, D, W, *, N=None, bias=True, state=True):
    """float64 leaves: x [B, T, D], weight [D, W], bias [D], initial_state [N, D, W-1]."""
    N = B if N is None else N
    return {
        "x": torch.randn(B, T, D, dtype=torch.float64),
        "weight": torch.randn(D, W, dtype=torch.float64) / W**0.5,
        "bias": torch.randn(D, dtype=torch.float64) if bias else None,
        "initial_state": torch.randn(N, D, W - 1, dtype=torch.float64) if state else None,
    }


def _run(fn, inputs, dtype, **kwargs):
    """Forward, then backward of a fixed random projection of y and the final state.
    Returns y, the final state and the gradient of every given input."""
    leaves = {k: v.detach().to(dtype).requires_grad_() for k, v in inputs.items() if v is not None}
    y, final = fn(
        leaves["x"], leaves["weight"], leaves.get("bias"), initial_state=leaves.get("initial_state"), **kwargs
    )
    gen = torch.Generator().manual_seed(1)
    loss = (y.double() * torch.randn(y.shape, generator=gen, dtype=torch.float64)).sum()
    if final is not None:
        loss = loss + (final.double() * torch.randn(final.shape, generator=gen, dtype=torch.float64)).sum()
    loss.backward()
    out = {"y": y, "final_state": final}
    out.update({"d" + k: v.grad for k, v in leaves.items()})
    return out


def _check(backend, inputs, *, dtype=torch.float32, bound=FP32_BOUND, **kwargs):
    ref = _run(short_conv_reference, inputs, torch.float64, **kwargs)
    got = _run(short_conv, inputs, dtype, backend=backend, **kwargs)
    assert got["y"].dtype == dtype, f"y: dtype {got['y'].dtype}, expected the dtype of x ({dtype})"
    if kwargs.get("output_final_state"):
        assert got["final_state"].dtype == torch.float32, f"final_state: dtype {got['final_state'].dtype}"
    else:
        assert got["final_state"] is None
    for name, value in ref.items():
        if value is None:
            continue
        if value.numel() == 0:  # e.g. dx without tokens, a W = 1 state: nothing to compare
            assert got[name] is None or got[name].shape == value.shape, f"{backend} {name}: shape"
            continue
        assert_rel_rms(f"{backend} {name}", got[name], value, bound)


CASES = {
    # name: (B, T, D, W, bias, state, activation)
    "T=1": (2, 1, 24, 4, True, True, "silu"),
    "T<W-1": (2, 2, 24, 4, True, True, "silu"),
    "T=W-1 no state": (1, 3, 24, 4, False, False, None),
    "blocks, silu": (2, 70, 24, 4, True, True, "silu"),
    "blocks, plain": (1, 70, 24, 4, False, True, None),
    "no state, several D blocks": (2, 40, 136, 4, True, False, "silu"),
    "W=1": (2, 9, 24, 1, True, True, "silu"),
    "W=2": (1, 9, 24, 2, True, True, None),
}


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("case", list(CASES))
def test_batched(backend, case):
    B, T, D, W, bias, state, activation = CASES[case]
    _check(backend, _inputs(B, T, D, W, bias=bias, state=state), activation=activation, output_final_state=True)


@pytest.mark.parametrize("backend", PATHS)
def test_long_sequence_spans_backward_programs(backend):
    # T > 256: several backward programs per sequence and several sequences, each program with its own
    # row of dweight/dbias partial sums.
    _check(backend, _inputs(2, 300, 16, 4), activation="silu", output_final_state=True)


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("state", [True, False], ids=["state", "no_state"])
def test_varlen(backend, state):
    # Empty sequences, sequences shorter than W-1, and one spanning several forward blocks.
    offsets = [0, 0, 2, 3, 3, 70, 71]
    cu = torch.tensor(offsets, dtype=torch.int32)
    inputs = _inputs(1, offsets[-1], 24, 4, N=len(offsets) - 1, state=state)
    _check(backend, inputs, activation="silu", output_final_state=True, cu_seqlens=cu)


@pytest.mark.parametrize("backend", PATHS)
def test_varlen_matches_separate_sequences(backend):
    offsets = [0, 5, 5, 37]
    inputs = _inputs(1, offsets[-1], 24, 4, N=3)
    x, w, b, h = (inputs[k].float() for k in ("x", "weight", "bias", "initial_state"))
    y, final = short_conv(
        x, w, b, initial_state=h, output_final_state=True, cu_seqlens=torch.tensor(offsets), backend=backend
    )
    for n in range(3):
        start, end = offsets[n], offsets[n + 1]
        y_n, final_n = short_conv(
            x[:, start:end], w, b, initial_state=h[n : n + 1], output_final_state=True, backend=backend
        )
        assert_rel_rms(f"y of sequence {n}", y[:, start:end], y_n, FP32_BOUND)
        assert_rel_rms(f"final state of sequence {n}", final[n : n + 1], final_n, FP32_BOUND)


@pytest.mark.parametrize("backend", PATHS)
def test_only_empty_sequences(backend):
    # No tokens at all: the final state is the initial state, and so is its gradient.
    inputs = _inputs(1, 0, 24, 4, N=2)
    h = inputs["initial_state"].float().requires_grad_()
    y, final = short_conv(
        inputs["x"].float(), inputs["weight"].float(), inputs["bias"].float(), initial_state=h,
        output_final_state=True, cu_seqlens=torch.tensor([0, 0, 0]), backend=backend,
    )
    assert y.shape == (1, 0, 24)
    assert_rel_rms("final_state", final, inputs["initial_state"], FP32_BOUND)
    g = torch.randn_like(final)
    final.backward(g)
    assert_rel_rms("dinitial_state", h.grad, g, FP32_BOUND)


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_decode_steps_match_full_forward(backend, bias):
    # Prefill, then one token at a time from the carried state (the Triton decode kernel), equals one call.
    B, T, D, W, prefill = 2, 7, 40, 4, 3
    inputs = _inputs(B, T, D, W, bias=bias)
    x, w, h = inputs["x"].float(), inputs["weight"].float(), inputs["initial_state"].float()
    b = inputs["bias"].float() if bias else None
    kwargs = dict(activation="silu", output_final_state=True, backend=backend)
    y_full, final_full = short_conv(x, w, b, initial_state=h, **kwargs)
    y, state = short_conv(x[:, :prefill], w, b, initial_state=h, **kwargs)
    ys = [y]
    for t in range(prefill, T):
        y, state = short_conv(x[:, t : t + 1], w, b, initial_state=state, **kwargs)
        ys.append(y)
    assert_rel_rms("y", torch.cat(ys, 1), y_full, FP32_BOUND)
    assert_rel_rms("final_state", state, final_full, FP32_BOUND)


@pytest.mark.parametrize("backend", PATHS)
def test_decode_step_without_final_state(backend):
    _check(backend, _inputs(3, 1, 24, 4), activation=None, output_final_state=False)


# bf16 math is broken under the Triton interpreter, so Triton runs half precision in fp16 only here.
@pytest.mark.parametrize(
    "backend, dtype, bound",
    [
        ("torch", torch.bfloat16, BF16_BOUND),
        ("torch", torch.float16, FP16_BOUND),
        ("triton", torch.float16, FP16_BOUND),
    ],
)
def test_half_precision(backend, dtype, bound):
    _check(backend, _inputs(2, 33, 24, 4), dtype=dtype, bound=bound, activation="silu", output_final_state=True)


def test_reference_backend_and_default(monkeypatch):
    monkeypatch.delenv("IPL_BACKEND", raising=False)
    inputs = _inputs(1, 5, 8, 4)
    x, w = inputs["x"], inputs["weight"]
    y_ref, _ = short_conv(x, w, backend="reference")
    y_default, _ = short_conv(x, w)  # CPU without IPL_BACKEND: the torch path
    assert_rel_rms("default backend y", y_default, y_ref, 1e-12)


@settings(max_examples=25)
@given(
    B=st.integers(1, 2),
    T=st.integers(1, 300),
    D=st.integers(1, 40),
    W=st.integers(1, 5),
    bias=st.booleans(),
    state=st.booleans(),
    silu=st.booleans(),
    final=st.booleans(),
)
def test_torch_path_shapes(B, T, D, W, bias, state, silu, final):
    _check("torch", _inputs(B, T, D, W, bias=bias, state=state),
           activation="silu" if silu else None, output_final_state=final)


@settings(max_examples=6)
@given(
    lengths=st.lists(st.integers(0, 80), min_size=1, max_size=4),
    D=st.integers(1, 40),
    W=st.integers(1, 5),
    state=st.booleans(),
    silu=st.booleans(),
)
def test_triton_varlen_shapes(lengths, D, W, state, silu):
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    inputs = _inputs(1, offsets[-1], D, W, N=len(lengths), state=state)
    _check("triton", inputs, activation="silu" if silu else None, output_final_state=True,
           cu_seqlens=torch.tensor(offsets))


def _error(match, **overrides):
    args = dict(x=torch.randn(2, 5, 8), weight=torch.randn(8, 4))
    args.update(overrides)
    with pytest.raises((ValueError, TypeError), match=match):
        short_conv(args.pop("x"), args.pop("weight"), **args)


def test_errors():
    _error(r"x: expected 3-D \[B, T, D\], got 2-D", x=torch.randn(5, 8))
    _error(r"weight: expected shape \[D, W\] with D = 8 .* got \[6, 4\]", weight=torch.randn(6, 4))
    _error(r"weight: expected 2-D \[D, W\], got 1-D", weight=torch.randn(8))
    _error(r"bias: expected shape \[D\] = \[8\], got \[4\]", bias=torch.randn(4))
    _error(r"activation: expected one of \(None, 'silu'\), got 'gelu'", activation="gelu")
    _error(r"initial_state: expected shape \[N, D, W-1\] = \[2, 8, 3\], got \[2, 8, 4\]",
           initial_state=torch.randn(2, 8, 4))
    _error(r"cu_seqlens: requires batch size B == 1", cu_seqlens=torch.tensor([0, 5]))
    _error(r"x: expected a floating dtype", x=torch.ones(2, 5, 8, dtype=torch.int64))
    _error(r"short_conv: backend = 'cuda' is not one of", backend="cuda")
