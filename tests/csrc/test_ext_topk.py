"""The C++ top-k scan of the product-key search against torch.topk, its tie order and its input checks."""

import pytest
import torch

from ipl_layers import _ext


@pytest.mark.parametrize("n,k", [(256, 32), (119, 32), (40, 40), (7, 1), (1, 1)])
def test_matches_torch_topk(n, k):
    x = torch.randperm(300 * n).view(300, n).float() / 7.0  # distinct values: the order is unique
    values, indices = _ext.topk_rows(x, k)
    ref_values, ref_indices = torch.topk(x, k, dim=-1)
    assert torch.equal(values, ref_values) and torch.equal(indices, ref_indices)


def test_ties_keep_the_earlier_index_first_and_strided_input():
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    values, indices = _ext.topk_rows(x, 3)
    assert indices.tolist() == [[1, 2, 4], [0, 1, 2]] and values[0].tolist() == [3.0, 3.0, 3.0]
    wide = torch.randn(6, 40)
    strided = wide[:, ::2]  # not contiguous
    assert torch.equal(_ext.topk_rows(strided, 5)[0], torch.topk(strided, 5, dim=-1)[0])


@pytest.mark.parametrize("x, k, error, match", [
    (torch.randn(3, 4, dtype=torch.float64), 2, TypeError, "x: expected float32"),
    (torch.randn(3), 2, ValueError, r"x: expected 2-D \[R, n\]"),
    (torch.randn(3, 4), 5, ValueError, "k: expected 1 <= k <= n = 4, got 5"),
    (torch.randn(3, 4), 0, ValueError, "k: expected 1 <= k <= n = 4, got 0"),
])
def test_bad_inputs(x, k, error, match):
    with pytest.raises(error, match=match):
        _ext.topk_rows(x, k)
