"""The single-state C++ decoding steps (linear attention, delta rule, short conv) with `in_place`: the new state
written over the input equals the out-of-place step's, a state the step cannot write over is refused by name,
and the ops write over a state only when asked and when it can be written (fp32, contiguous)."""

import pytest
import torch
import torch.nn.functional as F

from ipl_layers import _ext
from ipl_layers.ops import delta_rule, linear_attention, short_conv

B, H, K, V, D, W = 3, 2, 5, 7, 11, 4


def cases():
    """(name, ext step(state, in_place), op(state, update_state_in_place), state [.., fp32])."""
    q, k, v = torch.randn(B, 1, H, K), F.normalize(torch.randn(B, 1, H, K), dim=-1), torch.randn(B, 1, H, V)
    beta, g = torch.rand(B, 1, H), F.logsigmoid(torch.randn(B, 1, H))  # [B, 1, H]
    x, weight, bias = torch.randn(B, 1, D), torch.randn(D, W), torch.randn(D)
    return [
        ("linear_attention",
         lambda s, ip: _ext.linear_attention_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], s, 0.5, in_place=ip),
         lambda s, ip: linear_attention(q, k, v, g, scale=0.5, initial_state=s, output_final_state=True,
                                        update_state_in_place=ip, backend="torch"),
         torch.randn(B, H, K, V)),
        ("delta_rule",
         lambda s, ip: _ext.delta_rule_step(q[:, 0], k[:, 0], v[:, 0], beta[:, 0], g[:, 0], s, 0.5, in_place=ip),
         lambda s, ip: delta_rule(q, k, v, beta, g, scale=0.5, initial_state=s, output_final_state=True,
                                  update_state_in_place=ip, backend="torch"),
         torch.randn(B, H, K, V)),
        ("short_conv",
         lambda s, ip: _ext.short_conv_step(x[:, 0], weight, bias, s, True, in_place=ip),
         lambda s, ip: short_conv(x, weight, bias, activation="silu", initial_state=s, output_final_state=True,
                                  update_state_in_place=ip, backend="torch"),
         torch.randn(B, D, W - 1)),
    ]


CASES = cases()


@pytest.mark.parametrize("name, step, op, state", CASES, ids=[c[0] for c in CASES])
def test_in_place_step_equals_the_new_state_step(name, step, op, state):
    out_ref, new_ref = step(state, False)
    own = state.clone()
    out, new = step(own, True)
    assert new.data_ptr() == own.data_ptr(), "not written in place"
    assert torch.equal(out, out_ref) and torch.equal(own, new_ref)
    with pytest.raises(ValueError, match="state: in_place needs a contiguous float32 tensor, got Float "
                                         r"\(non-contiguous\)"):
        step(state.transpose(0, 1).contiguous().transpose(0, 1), True)


@pytest.mark.parametrize("name, step, op, state", CASES, ids=[c[0] for c in CASES])
def test_op_writes_over_a_state_only_when_asked_and_it_can(name, step, op, state):
    with torch.no_grad():
        out_ref, new_ref = op(state, False)
        own = state.clone()
        out, new = op(own, True)
        assert new.data_ptr() == own.data_ptr() and torch.equal(own, new_ref) and torch.equal(out, out_ref)
        shared = state[:1].expand_as(state)  # one state for the whole batch: never written over
        before = shared.clone()
        op(shared, True)
        assert torch.equal(shared, before)
        kept = state.clone()
        op(kept, False)
        assert torch.equal(kept, state)
