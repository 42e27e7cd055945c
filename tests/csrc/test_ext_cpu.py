"""The C++ CPU extension's linear-attention decoding step against float64 torch, and its input checks.

Nothing here skips: a missing extension fails every test with the reason (the Makefile always builds it).
"""

import pytest
import torch
from helpers import assert_rel_rms

from ipl_layers import _ext
from ipl_layers.ops.linear_attention import linear_attention_reference

# fp32 state and accumulation over K <= 32 terms, against float64 on the same (rounded) inputs.
BOUND = 1e-6
B, H, K, V = 2, 3, 20, 37  # V not a multiple of the 16-column tile: the last tile is partial
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
G_FORMS = ("none", "scalar", "per_key")


def make_inputs(g_form, dtype=torch.float32):
    q, k = torch.randn(B, H, K, dtype=dtype), torch.randn(B, H, K, dtype=dtype)  # [B, H, K]
    v = torch.randn(B, H, V, dtype=dtype)  # [B, H, V]
    shapes = {"none": None, "scalar": (B, H), "per_key": (B, H, K)}
    g = None if shapes[g_form] is None else torch.nn.functional.logsigmoid(torch.randn(shapes[g_form])).to(dtype)
    state = torch.randn(B, H, K, V)  # [B, H, K, V] fp32
    return q, k, v, g, state


def step_reference(q, k, v, g, state, scale):
    """S' = D S + k^T v, o = scale * q S', in float64."""
    q, k, v, S = q.double(), k.double(), v.double(), state.double()
    if g is not None:
        decay = g.double().exp()  # [B, H] or [B, H, K]
        S = S * (decay[..., None, None] if g.dim() == 2 else decay[..., None])
    S = S + k[..., :, None] * v[..., None, :]  # [B, H, K, V]
    return scale * torch.einsum("bhk,bhkv->bhv", q, S), S


def test_extension_is_built():
    assert _ext.available(), (
        f"ipl_layers._C was not built ({_ext._IMPORT_ERROR}); run `python setup.py build_ext --inplace`"
    )


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("g_form", G_FORMS)
def test_step_matches_float64(g_form, dtype):
    q, k, v, g, state = make_inputs(g_form, dtype)
    before = state.clone()
    o, new_state = _ext.linear_attention_step(q, k, v, g, state, 0.3)
    o_ref, state_ref = step_reference(q, k, v, g, state, 0.3)
    assert o.dtype == torch.float32 and new_state.dtype == torch.float32
    assert_rel_rms("o", o, o_ref, BOUND)
    assert_rel_rms("new_state", new_state, state_ref, BOUND)
    assert torch.equal(state, before), "the input state was modified"


def test_default_scale_and_strided_inputs():
    q, k, v, g, state = make_inputs("per_key")
    # Strided views of the same values: the extension must honour strides, not assume contiguity.
    qt = q.transpose(0, 1).contiguous().transpose(0, 1)
    st = state.transpose(2, 3).contiguous().transpose(2, 3)
    assert not qt.is_contiguous() and not st.is_contiguous()
    o, new_state = _ext.linear_attention_step(qt, k, v, g, st)
    o_ref, state_ref = step_reference(q, k, v, g, state, K**-0.5)
    assert_rel_rms("o", o, o_ref, BOUND)
    assert_rel_rms("new_state", new_state, state_ref, BOUND)


@pytest.mark.parametrize("g_form", G_FORMS)
def test_steps_follow_the_op_reference(g_form):
    # Decoding T tokens one step at a time equals the op's token-by-token reference over the sequence.
    T = 4
    q, k, v = torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V)  # [B, T, H, *]
    shapes = {"none": None, "scalar": (B, T, H), "per_key": (B, T, H, K)}
    g = None if shapes[g_form] is None else torch.nn.functional.logsigmoid(torch.randn(shapes[g_form]))
    h0 = torch.randn(B, H, K, V)
    o_ref, final_ref = linear_attention_reference(
        q.double(), k.double(), v.double(), None if g is None else g.double(), scale=0.5,
        initial_state=h0.double(), output_final_state=True,
    )
    state, outs = h0, []
    for t in range(T):
        o, state = _ext.linear_attention_step(q[:, t], k[:, t], v[:, t], None if g is None else g[:, t], state, 0.5)
        outs.append(o)
    assert_rel_rms("o", torch.stack(outs, dim=1), o_ref, BOUND)
    assert_rel_rms("final_state", state, final_ref, BOUND)


def _bad(**change):
    q, k, v, g, state = make_inputs("scalar")
    args = dict(q=q, k=k, v=v, g=g, state=state)
    args.update(change)
    return args


@pytest.mark.parametrize(
    "args, error, match",
    [
        (_bad(q=torch.randn(B, H * K)), ValueError, r"q: expected 3-D \[B, H, K\], got 2-D"),
        (_bad(k=torch.randn(B, H, K + 1)), ValueError,
         r"k: expected shape \[B, H, K\] = \[2, 3, 20\], got \[2, 3, 21\]"),
        (_bad(v=torch.randn(B + 1, H, V)), ValueError, r"v: expected shape \[B, H, V\]"),
        (_bad(v=torch.randn(B, H)), ValueError, r"v: expected 3-D \[B, H, V\]"),
        (_bad(state=torch.randn(B, H, V, K)), ValueError, r"state: expected shape \[B, H, K, V\] = \[2, 3, 20, 37\]"),
        (_bad(state=torch.randn(B, H, K, V, dtype=torch.float64)), TypeError, "state: expected float32, got Double"),
        (_bad(g=torch.randn(B, H + 1)), ValueError, r"g: expected shape \[B, H\] = \[2, 3\], got \[2, 4\]"),
        (_bad(g=torch.randn(B, H, K - 1)), ValueError, r"g: expected shape \[B, H, K\]"),
        (_bad(g=torch.randn(B, 1, H, K)), ValueError, r"g: expected \[B, H\] \(scalar decay\) or \[B, H, K\]"),
        (_bad(q=torch.ones(B, H, K, dtype=torch.int64)), TypeError, "q: expected a floating dtype"),
    ],
    ids=["q-rank", "k-shape", "v-batch", "v-rank", "state-shape", "state-dtype", "g-scalar-shape",
         "g-key-shape", "g-rank", "q-dtype"],
)
def test_bad_inputs_raise_naming_the_argument(args, error, match):
    with pytest.raises(error, match=match):
        _ext.linear_attention_step(**args, scale=1.0)
