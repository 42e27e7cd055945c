"""Which implementation an op call runs: `backend=` argument, else `IPL_BACKEND`, else the device."""

import os
from typing import Optional, Sequence

import torch

ENV_VAR = "IPL_BACKEND"


def triton_available() -> bool:
    """Triton kernels run on CUDA, or anywhere under the interpreter (`TRITON_INTERPRET=1`, tests only)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(op: str, backend: Optional[str], device: torch.device, choices: Sequence[str]) -> str:
    name = backend if backend is not None else os.environ.get(ENV_VAR) or None
    if name is None:
        name = "triton" if device.type == "cuda" and triton_available() else "torch"
        if name not in choices:  # an op whose Triton kernels do not exist yet
            raise RuntimeError(
                f"{op}: no Triton kernels yet for CUDA tensors; pass backend= one of {tuple(choices)} "
                f"(or set {ENV_VAR})"
            )
    if name not in choices:
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{op}: {source} = {name!r} is not one of {tuple(choices)}")
    if name.startswith("triton"):
        if not triton_available():
            raise RuntimeError(f"{op}: backend {name!r} needs triton, which is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"{op}: backend {name!r} needs CUDA tensors (got device {device}); "
                "on CPU use backend='torch', or set TRITON_INTERPRET=1 to run the kernels in the interpreter"
            )
    return name
