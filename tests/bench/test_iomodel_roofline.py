"""Roofline arithmetic on numbers worked by hand."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))  # as the bench scripts see it
from iomodel.roofline import A100, H100_SXM, roofline  # noqa: E402


def test_memory_bound_time_is_bytes_over_bandwidth():
    # 3.35 GB at 3.35 TB/s: 1 ms; 1 GFLOP at 989 TFLOP/s is ~1 us, far below
    assert roofline(3.35e9, 1e9, H100_SXM) == (pytest.approx(1e-3), "memory")
    assert roofline(2.0e9, 1e9, A100) == (pytest.approx(1e-3), "memory")


def test_compute_bound_time_is_flops_over_peak():
    # 312 TFLOP at 312 TFLOP/s: 1 s; 1 GB at 2 TB/s is 0.5 ms
    assert roofline(1e9, 312e12, A100) == (pytest.approx(1.0), "compute")
    assert roofline(1e9, 989e12, H100_SXM) == (pytest.approx(1.0), "compute")


def test_ridge_points():
    # the arithmetic intensity where both roofs meet: 989e12 / 3.35e12 and 312e12 / 2e12 FLOP per byte
    assert H100_SXM.ridge == pytest.approx(295.2, abs=0.1)
    assert A100.ridge == pytest.approx(156.0)
    t_mem, bound = roofline(1e9, H100_SXM.ridge * 1e9, H100_SXM)
    assert t_mem == pytest.approx(1e9 / 3.35e12)
