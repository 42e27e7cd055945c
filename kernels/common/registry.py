"""Registry of every Triton kernel's default compile cases, for the ahead-of-time compile check.

Each kernel module registers, next to its kernel, the argument signature and constexprs of the
configurations it launches by default. `aot.py` compiles them for sm_80 and sm_90 without a GPU.
"""

from dataclasses import dataclass, field
from typing import Dict, List


@dataclass(frozen=True)
class CompileCase:
    name: str  # "<kernel name>[<variant>]", e.g. "linear_attn_chunk_fwd_kernel[bf16,BT=64]"
    fn: object  # the @triton.jit function (not the autotuner)
    signature: Dict[str, str]  # argument -> Triton type: "*fp32", "*bf16", "i32", "fp32", "constexpr"
    constexprs: Dict[str, object] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2


CASES: List[CompileCase] = []


def register(case: CompileCase) -> CompileCase:
    if any(c.name == case.name for c in CASES):
        raise ValueError(f"compile case {case.name!r} registered twice")
    CASES.append(case)
    return case


def load_all() -> List[CompileCase]:
    """Imports every kernel module (which registers its cases) and returns all cases."""
    import importlib
    import pkgutil

    import ipl_layers.kernels as root

    for mod in pkgutil.walk_packages(root.__path__, root.__name__ + "."):
        importlib.import_module(mod.name)
    return list(CASES)
