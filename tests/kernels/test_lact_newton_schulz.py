"""The batched Newton-Schulz kernel of `lact` (Muon) under the Triton interpreter, fp32, against the torch
path's `newton_schulz` in float64: square, wide, tall and non-power-of-two matrices."""

import pytest
import torch

from helpers import assert_rel_rms
from ipl_layers.kernels.lact import lact_newton_schulz
from ipl_layers.ops.lact_chunk import newton_schulz

# fp32 in the interpreter (true fp32 tl.dot) against float64: measured <= 1.2e-6 over these shapes.
BOUND = 1e-5


@pytest.mark.parametrize("shape", [(3, 64, 64), (2, 32, 64), (2, 64, 32), (2, 20, 37), (4, 8, 8), (0, 16, 16)])
def test_matches_torch_newton_schulz(shape):
    G = torch.randn(*shape)
    X = lact_newton_schulz(G)
    assert X.dtype == torch.float32
    assert_rel_rms("newton_schulz", X, newton_schulz(G.double()), BOUND)


def test_rejects_matrices_past_its_tile():
    with pytest.raises(ValueError, match=r"lact_newton_schulz: G: expected R, S <= 64, got shape \[2, 16, 65\]"):
        lact_newton_schulz(torch.randn(2, 16, 65))
    with pytest.raises(ValueError, match=r"lact_newton_schulz: G: expected 3-D \[P, R, S\], got 2-D"):
        lact_newton_schulz(torch.randn(16, 16))
