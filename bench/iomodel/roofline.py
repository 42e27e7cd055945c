"""Roofline projection: a kernel takes at least max(bytes / bandwidth, FLOPs / peak) on a device.

Every figure it produces is *modeled*: it assumes full bandwidth and full tensor-core peak, no launch latency,
no tail effects and perfect overlap of memory and math. It is a lower bound on time, not a prediction.
"""

from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class Device:
    name: str
    bytes_per_s: float  # HBM bandwidth
    flops_per_s: float  # dense bf16 tensor-core peak (no sparsity)

    @property
    def ridge(self) -> float:
        """FLOP per byte above which a kernel is compute-bound."""
        return self.flops_per_s / self.bytes_per_s


H100_SXM = Device("H100 SXM", 3.35e12, 989e12)  # NVIDIA H100 datasheet: 3.35 TB/s HBM3, 989 TFLOP/s bf16 dense
A100 = Device("A100 SXM 80GB", 2.0e12, 312e12)  # NVIDIA A100 datasheet: 2.0 TB/s HBM2e, 312 TFLOP/s bf16 dense
DEVICES = (H100_SXM, A100)


def roofline(bytes_moved: float, flops: float, device: Device) -> Tuple[float, str]:
    """(modeled seconds, "memory" or "compute": which roof binds)."""
    memory, compute = bytes_moved / device.bytes_per_s, flops / device.flops_per_s
    return (memory, "memory") if memory >= compute else (compute, "compute")
