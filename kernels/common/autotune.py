"""Autotuning that also works without a GPU.

On CUDA the kernels get Triton's real autotuner over all their configs. Under the interpreter
(`TRITON_INTERPRET=1`) or without CUDA, the autotuner cannot benchmark (it needs a GPU), so the kernel is
tuned over its single named default config. The default config is also the one the ahead-of-time
compile check builds for sm_80 and sm_90 (see `registry.py`).
"""

import os
from typing import Sequence

import torch
import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotune(configs: Sequence[triton.Config], key: Sequence[str], default: int = 0, **kwargs):
    """`triton.autotune` over `configs` on CUDA; over `configs[default]` alone elsewhere.

    The wrapped kernel gets `.default_config` (the named default) for the compile registry.
    """
    configs = list(configs)
    chosen = configs if (torch.cuda.is_available() and not interpreting()) else [configs[default]]

    def wrap(fn):
        tuned = triton.autotune(configs=chosen, key=list(key), **kwargs)(fn)
        tuned.default_config = configs[default]
        return tuned

    return wrap
