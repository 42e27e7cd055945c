"""ProductKeyMemory and MemoryPlus: the layer formula against the ops composed by hand (float64 reference
backend), gradients to every parameter, shared value tables, the BatchNorm warning, parameter groups and
argument errors."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_rms
from layer_checks import with_backend

from ipl_layers.layers import MemoryPlus, ProductKeyMemory, memory_parameter_groups
from ipl_layers.ops import embedding_bag_reference, product_key_topk_reference

FP32_BOUND = 1e-5  # fp32 torch path vs the float64 reference: measured < 1e-6 on outputs and gradients
HIDDEN = 24


def read_by_hand(layer, x):
    """The bag of the layer in float64 from the reference ops: normalised queries, brute-force top-k, softmax,
    weighted rows."""
    q = F.layer_norm(layer.query_proj(x).unflatten(-1, (layer.num_heads, layer.key_dim)), (layer.key_dim,),
                     layer.query_norm.weight, layer.query_norm.bias)
    scores, slots = product_key_topk_reference(q, layer.keys, layer.topk)
    return embedding_bag_reference(slots.flatten(-2), torch.softmax(scores, -1).flatten(-2), layer.values)


@pytest.mark.parametrize("cls", [ProductKeyMemory, MemoryPlus])
@pytest.mark.parametrize("value_dim", [None, 16])
def test_layer_matches_formula_and_gradients_match(cls, value_dim):
    torch.manual_seed(0)
    layer = cls(HIDDEN, num_heads=2, num_keys=6, topk=3, key_dim=8, value_dim=value_dim)
    ref = with_backend(layer, "reference", torch.float64)
    x = torch.randn(2, 5, HIDDEN, requires_grad=True)
    x_ref = x.detach().double().requires_grad_()
    bag = read_by_hand(ref, x_ref)
    want = ref.out_proj(bag * F.silu(ref.gate_proj(x_ref))) if cls is MemoryPlus else \
        (bag if ref.out_proj is None else ref.out_proj(bag))
    assert_rel_rms("formula", ref(x_ref), want, 1e-12)
    out = layer(x)
    assert out.shape == (2, 5, HIDDEN)
    assert_rel_rms("out", out, want, FP32_BOUND)
    w = torch.randn(out.shape)
    (out * w).sum().backward()
    (want * w.double()).sum().backward()
    assert_rel_rms("dx", x.grad, x_ref.grad, FP32_BOUND)
    for (name, p), p_ref in zip(layer.named_parameters(), ref.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient"
        assert_rel_rms(f"d{name}", p.grad, p_ref.grad, FP32_BOUND)


def test_shared_value_table_and_parameter_groups():
    first = ProductKeyMemory(HIDDEN, num_heads=2, num_keys=4, topk=2, key_dim=8)
    second = MemoryPlus(HIDDEN, num_heads=2, num_keys=4, topk=2, key_dim=8, values=first.values)
    model = torch.nn.Sequential(first, second)
    assert second.values is first.values
    model(torch.randn(3, HIDDEN)).sum().backward()  # both layers' reads add into the one table's gradient
    assert first.values.grad is not None
    groups = memory_parameter_groups(model, lr=1e-3, values_lr=1e-2, weight_decay=0.1)
    assert [len(g["params"]) for g in groups] == [len(list(model.parameters())) - 1, 1]
    assert groups[1]["params"][0] is first.values and groups[1]["weight_decay"] == 0.0 and groups[1]["lr"] == 1e-2
    torch.optim.AdamW(groups)  # every parameter exactly once


def test_sparse_gradient_with_a_sparse_optimizer_touches_only_read_rows():
    layer = ProductKeyMemory(HIDDEN, num_heads=2, num_keys=32, topk=2, key_dim=8, sparse_grad=True)
    before = layer.values.detach().clone()
    layer(torch.randn(4, HIDDEN)).sum().backward()
    assert layer.values.grad.is_sparse
    torch.optim.SparseAdam([layer.values], lr=0.1).step()
    changed = (layer.values.detach() != before).any(-1).nonzero().flatten()
    touched = layer.values.grad.coalesce().indices()[0]
    assert set(changed.tolist()) == set(touched.tolist()) and len(changed) <= 4 * 2 * 2


def test_batchnorm_warns_that_it_breaks_causality():
    with pytest.warns(UserWarning, match="breaks causality"):
        layer = ProductKeyMemory(HIDDEN, num_heads=2, num_keys=4, topk=2, key_dim=8, query_norm="batchnorm")
    assert layer(torch.randn(2, 3, HIDDEN)).shape == (2, 3, HIDDEN)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(key_dim=7), r"ProductKeyMemory: key_dim: expected an even dim"),
        (dict(topk=5, num_keys=4), r"ProductKeyMemory: topk: expected at most num_keys = 4, got 5"),
        (dict(query_norm="rms"), r"ProductKeyMemory: query_norm: expected one of"),
        (dict(num_keys=4, values=torch.nn.Parameter(torch.zeros(15, HIDDEN))),
         r"values: expected an nn.Parameter \[num_keys\^2, value_dim\] = \[16, 24\] to share, got \(15, 24\)"),
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        ProductKeyMemory(HIDDEN, **{"num_heads": 2, "key_dim": 8, "topk": 2, **kw})


def test_bad_input_names_the_argument():
    layer = ProductKeyMemory(HIDDEN, num_heads=2, num_keys=4, topk=2, key_dim=8)
    with pytest.raises(ValueError, match=r"hidden_states: expected \[\*, hidden_size = 24\], got \[2, 5, 23\]"):
        layer(torch.randn(2, 5, 23))
