"""Shared kernel machinery: the autotune wrapper, the compile registry, launch helpers."""
