"""Triton kernels of ipl-layers, one folder per op family (installed as `ipl_layers.kernels`)."""
