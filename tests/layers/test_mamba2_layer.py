"""The Mamba2 layer: its output against the SSD recurrence written token by token from the paper's equations
(float64), and every path (padding mask, packed cu_seqlens, prefill + decode, gradients) against the same layer
in float64 running the reference linear-attention op one sample at a time."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_rms
from layer_checks import (assert_gradients_match, assert_padding_mask_equals_varlen_equals_per_sample,
                          assert_prefill_decode_survives_reload, with_backend)

from ipl_layers.layers import Mamba2

# float32 torch path vs the float64 reference: the same op and bounds as the other linear-attention layers
FP32_BOUND = 5e-5
FP64_BOUND = 1e-10

HIDDEN = 16
LENGTHS = [11, 5, 1, 0]


def make_layer() -> Mamba2:
    return Mamba2(HIDDEN, num_heads=2, state_size=4, expand=2, layer_idx=0)


def test_layer_matches_ssd_recurrence():
    """h_t = exp(-exp(A_log) dt_t) h_{t-1} + dt_t B_t^T x_t, y_t = C_t h_t + D x_t, out = W_o norm(y * silu(z))."""
    layer = with_backend(make_layer(), "torch", torch.float64)
    u = torch.randn(2, 9, HIDDEN, dtype=torch.float64)
    H, N, P = layer.num_heads, layer.state_size, layer.head_v_dim
    convs = (layer.q_conv1d, layer.k_conv1d, layer.v_conv1d)
    C, B, x = (c(p(u))[0] for c, p in zip(convs, (layer.q_proj, layer.k_proj, layer.v_proj)))
    C, B, x = C.unflatten(-1, (H, N)), B.unflatten(-1, (H, N)), x.unflatten(-1, (H, P))
    dt = F.softplus(layer.dt_proj(u) + layer.dt_bias)  # [2, 9, H]
    h = torch.zeros(2, H, N, P, dtype=torch.float64)
    ys = []
    for t in range(u.shape[1]):
        decay = torch.exp(-layer.A_log.exp() * dt[:, t])[..., None, None]  # [2, H, 1, 1]
        h = decay * h + dt[:, t, :, None, None] * B[:, t, :, :, None] * x[:, t, :, None, :]
        ys.append(torch.einsum("bhn,bhnp->bhp", C[:, t], h) + layer.D[:, None] * x[:, t])
    y = torch.stack(ys, 1)  # [2, 9, H, P]
    z = layer.g_proj(u).unflatten(-1, (H, P))
    out = layer.o_proj(F.rms_norm(y * F.silu(z), (P,), layer.o_norm.weight, eps=1e-5).flatten(-2))
    assert_rel_rms("Mamba2 vs SSD recurrence", layer(u)[0], out, FP64_BOUND)


@pytest.mark.parametrize("dtype,bound", [(torch.float32, FP32_BOUND), (torch.float64, FP64_BOUND)])
def test_padding_mask_equals_varlen_equals_per_sample(dtype, bound):
    layer = with_backend(make_layer(), "torch", dtype)
    assert_padding_mask_equals_varlen_equals_per_sample(layer, LENGTHS, HIDDEN, dtype, bound, torch.Tensor)


def test_prefill_then_decode_equals_full_forward_and_survives_a_reload(tmp_path):
    layer = with_backend(make_layer(), "torch", torch.float64)
    assert_prefill_decode_survives_reload(layer, HIDDEN, tmp_path / "state.safetensors", FP64_BOUND)


def test_gradients_reach_every_parameter_and_match_reference():
    layer = with_backend(make_layer(), "torch", torch.float32)
    assert_gradients_match(layer, with_backend(layer, "reference", torch.float64), [9, 4], 9, HIDDEN, FP32_BOUND)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match=r"Mamba2: state_size: expected a positive int, got 0"):
        Mamba2(HIDDEN, num_heads=2, state_size=0)
    with pytest.raises(ValueError, match=r"Mamba2: expected 0 < dt_min <= dt_max, got dt_min = 0.1, dt_max = 0.01"):
        Mamba2(HIDDEN, num_heads=2, dt_min=0.1, dt_max=0.01)
