"""Triton kernels of `short_conv`: forward, backward and the fused decode step."""

from ipl_layers.kernels.conv.short_conv import short_conv_bwd, short_conv_decode, short_conv_fwd

__all__ = ["short_conv_fwd", "short_conv_bwd", "short_conv_decode"]
