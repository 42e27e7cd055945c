"""The C++ CPU extension's delta-rule decoding step against float64 torch and the op's reference, its input
checks, and the op's dispatch to it (one token, no autograd, on CPU)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_rms

from ipl_layers import _ext
from ipl_layers.ops import delta_rule
from ipl_layers.ops.delta_rule import delta_rule_reference

# fp32 state and accumulation over K <= 20 terms (twice: k^T S, then q S'), against float64 on the same inputs;
# measured <= 1.5e-7.
BOUND = 1e-6
B, H, K, V = 2, 3, 20, 37  # V not a multiple of the 16-column tile: the last tile is partial
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(gated, dtype=torch.float32):
    q, k = torch.randn(B, H, K, dtype=dtype), F.normalize(torch.randn(B, H, K), dim=-1).to(dtype)  # [B, H, K]
    v = torch.randn(B, H, V, dtype=dtype)  # [B, H, V]
    beta = torch.rand(B, H, dtype=dtype)  # [B, H]
    g = F.logsigmoid(torch.randn(B, H)).to(dtype) if gated else None  # [B, H]
    return q, k, v, beta, g, torch.randn(B, H, K, V)  # state fp32


def step_reference(q, k, v, beta, g, state, scale):
    """a = exp(g), S' = a S + beta k^T (v - k a S), o = scale q S', in float64."""
    q, k, v, beta, S = q.double(), k.double(), v.double(), beta.double(), state.double()
    if g is not None:
        S = S * g.double().exp()[..., None, None]
    error = v - torch.einsum("bhk,bhkv->bhv", k, S)  # [B, H, V]
    S = S + beta[..., None, None] * k[..., :, None] * error[..., None, :]
    return scale * torch.einsum("bhk,bhkv->bhv", q, S), S


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_step_matches_float64(gated, dtype):
    q, k, v, beta, g, state = make_inputs(gated, dtype)
    before = state.clone()
    o, new_state = _ext.delta_rule_step(q, k, v, beta, g, state, 0.3)
    o_ref, state_ref = step_reference(q, k, v, beta, g, state, 0.3)
    assert o.dtype == torch.float32 and new_state.dtype == torch.float32
    assert_rel_rms("o", o, o_ref, BOUND)
    assert_rel_rms("new_state", new_state, state_ref, BOUND)
    assert torch.equal(state, before), "the input state was modified"


def test_default_scale_and_strided_inputs():
    q, k, v, beta, g, state = make_inputs(True)
    # strided views of the same values: the extension must honour strides, not assume contiguity
    kt = k.transpose(0, 1).contiguous().transpose(0, 1)
    st = state.transpose(2, 3).contiguous().transpose(2, 3)
    bt = beta.t().contiguous().t()
    assert not kt.is_contiguous() and not st.is_contiguous() and not bt.is_contiguous()
    o, new_state = _ext.delta_rule_step(q, kt, v, bt, g, st)
    o_ref, state_ref = step_reference(q, k, v, beta, g, state, K**-0.5)
    assert_rel_rms("o", o, o_ref, BOUND)
    assert_rel_rms("new_state", new_state, state_ref, BOUND)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_op_decodes_through_the_step_and_follows_its_reference(gated, monkeypatch):
    # T tokens decoded one call at a time by the op (which dispatches to the C++ step) equal the op's
    # token-by-token reference over the whole sequence, with the in-op L2 norm of q and k
    T = 5
    q, k, v = torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V)  # [B, T, H, *]
    beta = torch.rand(B, T, H)
    g = F.logsigmoid(torch.randn(B, T, H)) if gated else None
    h0 = torch.randn(B, H, K, V)
    o_ref, final_ref = delta_rule_reference(
        q.double(), k.double(), v.double(), beta.double(), None if g is None else g.double(), scale=0.5,
        initial_state=h0.double(), output_final_state=True, use_qk_l2norm=True,
    )
    calls = []
    step = _ext.delta_rule_step
    monkeypatch.setattr(_ext, "delta_rule_step", lambda *a, **kw: calls.append(1) or step(*a, **kw))
    state, outs = h0, []
    for t in range(T):
        o, state = delta_rule(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], beta[:, t:t + 1],
                              None if g is None else g[:, t:t + 1], scale=0.5, initial_state=state,
                              output_final_state=True, use_qk_l2norm=True)
        outs.append(o)
    assert len(calls) == T, "the op did not decode through the C++ step"
    assert_rel_rms("o", torch.cat(outs, dim=1), o_ref, BOUND)
    assert_rel_rms("final_state", state, final_ref, BOUND)


def test_op_keeps_the_differentiable_path_under_autograd(monkeypatch):
    q, k, v, beta, g, state = make_inputs(True)
    monkeypatch.setattr(_ext, "delta_rule_step", lambda *a, **kw: pytest.fail("autograd call reached the step"))
    v = v[:, None].requires_grad_()
    o, _ = delta_rule(q[:, None], k[:, None], v, beta[:, None], g[:, None], initial_state=state)
    assert o.requires_grad


def _bad(**change):
    q, k, v, beta, g, state = make_inputs(True)
    args = dict(q=q, k=k, v=v, beta=beta, g=g, state=state)
    args.update(change)
    return args


@pytest.mark.parametrize(
    "args, error, match",
    [
        (_bad(q=torch.randn(B, H * K)), ValueError, r"q: expected 3-D \[B, H, K\], got 2-D"),
        (_bad(k=torch.randn(B, H, K + 1)), ValueError,
         r"k: expected shape \[B, H, K\] = \[2, 3, 20\], got \[2, 3, 21\]"),
        (_bad(v=torch.randn(B + 1, H, V)), ValueError, r"v: expected shape \[B, H, V\]"),
        (_bad(beta=torch.rand(B, H, 1)), ValueError, r"beta: expected 2-D \[B, H\], got 3-D"),
        (_bad(beta=torch.rand(B, H + 1)), ValueError, r"beta: expected shape \[B, H\] = \[2, 3\], got \[2, 4\]"),
        (_bad(state=torch.randn(B, H, V, K)), ValueError, r"state: expected shape \[B, H, K, V\] = \[2, 3, 20, 37\]"),
        (_bad(state=torch.randn(B, H, K, V, dtype=torch.float64)), TypeError, "state: expected float32, got Double"),
        (_bad(g=torch.randn(B, H, K)), ValueError, r"g: expected 2-D \[B, H\], got 3-D"),
        (_bad(q=torch.ones(B, H, K, dtype=torch.int64)), TypeError, "q: expected a floating dtype"),
    ],
    ids=["q-rank", "k-shape", "v-batch", "beta-rank", "beta-shape", "state-shape", "state-dtype", "g-rank",
         "q-dtype"],
)
def test_bad_inputs_raise_naming_the_argument(args, error, match):
    with pytest.raises(error, match=match):
        _ext.delta_rule_step(**args, scale=1.0)
