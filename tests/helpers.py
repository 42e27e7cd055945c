"""Shared assertions: relative RMS error against a float64 reference."""

import torch


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 (0 when both are exactly zero)."""
    x, ref = x.detach().double(), ref.detach().double()
    num = (x - ref).norm().item()
    den = ref.norm().item()
    if den == 0.0:
        return num
    return num / den


def assert_rel_rms(name: str, x: torch.Tensor, ref: torch.Tensor, bound: float):
    """Fails when `x` has non-finite entries, a shape other than `ref`, or rel. RMS error above `bound`."""
    assert x is not None, f"{name}: got None, expected a tensor of shape {tuple(ref.shape)}"
    assert tuple(x.shape) == tuple(ref.shape), f"{name}: shape {tuple(x.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(x).all(), f"{name}: {int((~torch.isfinite(x)).sum())} non-finite entries"
    err = rel_rms(x, ref)
    assert err <= bound, f"{name}: relative RMS error {err:.3e} > bound {bound:.1e}"


def compare(got: dict, ref: dict, bound: float):
    """Every named result of a path against the reference's: integer ones (positions) exactly, the others by
    relative RMS error."""
    assert got.keys() == ref.keys()
    for name in ref:
        if ref[name].is_floating_point():
            assert_rel_rms(name, got[name], ref[name], bound)
        else:
            assert torch.equal(got[name], ref[name]), f"{name}: {got[name].tolist()} != {ref[name].tolist()}"
