"""Launch configs of the chunked `linear_attention` kernels and the registration of their compile cases."""

from typing import Dict

import triton

from ipl_layers.kernels.common.registry import CompileCase, register

# The first config is the default: the one the interpreter runs and the compile registry checks.
CONFIGS = [
    triton.Config({}, num_warps=4, num_stages=2),
    triton.Config({}, num_warps=2, num_stages=2),
    triton.Config({}, num_warps=8, num_stages=2),
    triton.Config({}, num_warps=4, num_stages=3),
    triton.Config({}, num_warps=4, num_stages=1),
]

# Shapes of the registered compile cases: the head dim every benchmark uses.
CASE_HEADS, CASE_K, CASE_V = 4, 64, 64


def register_default(kernel, variant: str, types: Dict[str, str], constexprs: Dict[str, object]):
    """Registers `kernel`'s default config; every argument is typed in `types` or fixed in `constexprs`."""
    names = kernel.fn.arg_names
    missing = [a for a in names if a not in types and a not in constexprs]
    if missing:
        raise ValueError(f"{kernel.fn.__name__}: compile case {variant!r} leaves {missing} untyped")
    config = kernel.default_config
    register(CompileCase(
        name=f"{kernel.fn.__name__}[{variant}]",
        fn=kernel.fn,
        signature={a: "constexpr" if a in constexprs else types[a] for a in names},
        constexprs={a: constexprs[a] for a in names if a in constexprs},
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    ))
