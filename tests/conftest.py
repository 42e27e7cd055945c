"""Test-wide set-up: the Triton interpreter, NaN-filled fresh allocations, fixed seeds, markers."""

import os

# Before any Triton kernel is imported: kernels run on CPU in the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# Every torch.empty/empty_like inside op code comes back NaN-filled, so a kernel or a torch path that
# reads memory it never wrote produces NaN and fails its test instead of passing on lucky zeros.
torch.use_deterministic_algorithms(True, warn_only=True)
torch.utils.deterministic.fill_uninitialized_memory = True

# 2-core machines: a few dozen drawn shapes per property keep the suite within minutes.
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True, max_examples=25)
settings.load_profile("ci")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped only where CUDA is absent")
    config.addinivalue_line("markers", "slow: long-sequence numerics checks (in `make test`; `make test-fast` skips them)")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA (none on this machine)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
