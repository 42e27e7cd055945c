"""Triton kernels of the LaCT family: the batched Newton-Schulz orthogonalisation of its Muon updates."""

from ipl_layers.kernels.lact.newton_schulz import lact_newton_schulz

__all__ = ["lact_newton_schulz"]
