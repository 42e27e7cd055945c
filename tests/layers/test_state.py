"""FastWeightCache: per-layer storage, sequence length, and the audit operations
(snapshot / restore / reset / save / load), alone and driven by a layer."""

import pytest
import torch
from helpers import assert_rel_rms

from ipl_layers.cache import FastWeightCache
from ipl_layers.layers import GatedLinearAttention

EXACT = 0.0  # copies, round trips and replays must be bit-identical

HIDDEN = 16


def filled_cache() -> FastWeightCache:
    """Layer 0 with a recurrent state and a (q, k, v) conv state, layer 2 with a recurrent state only."""
    cache = FastWeightCache()
    conv = tuple(torch.randn(2, 8, 3) for _ in range(3))
    cache.update_states(0, offset=5, recurrent_state=torch.randn(2, 2, 4, 8), conv_state=conv)
    cache.update_states(2, offset=5, recurrent_state=torch.randn(2, 2, 4, 8))
    return cache


def assert_same(a: FastWeightCache, b: FastWeightCache):
    assert len(a) == len(b)
    for i in range(len(a)):
        assert a[i].keys() == b[i].keys(), f"layer {i}: {sorted(a[i])} != {sorted(b[i])}"
        assert a.get_seq_length(i) == b.get_seq_length(i)
        for name, value in a[i].items():
            if name == "seen_tokens":
                continue
            pairs = zip(value, b[i][name]) if isinstance(value, tuple) else [(value, b[i][name])]
            for x, y in pairs:
                assert x.dtype == y.dtype, f"layer {i} {name}: {x.dtype} != {y.dtype}"
                assert_rel_rms(f"layer {i} {name}", x, y, EXACT)


def test_update_getitem_len_and_seq_length():
    cache = filled_cache()
    assert len(cache) == 3
    assert cache[1] == {}, "a skipped layer index holds no states"
    assert sorted(cache[0]) == ["conv_state", "recurrent_state", "seen_tokens"]
    assert cache.get_seq_length() == 5 and cache.get_seq_length(1) == 0 and cache.get_seq_length(7) == 0
    new_state = torch.zeros(2, 2, 4, 8)
    cache.update_states(0, offset=1, recurrent_state=new_state, conv_state=None)
    assert cache[0]["recurrent_state"] is new_state
    assert len(cache[0]["conv_state"]) == 3, "a None state leaves the stored one in place"
    assert cache.get_seq_length(0) == 6
    with pytest.raises(ValueError, match="layer_idx"):
        cache.update_states(-1, offset=1, recurrent_state=new_state)
    with pytest.raises(TypeError, match="tensor or a tuple of tensors"):
        cache.update_states(0, offset=1, recurrent_state=3.0)
    with pytest.raises(ValueError, match="seen_tokens"):
        cache.update_states(0, offset=1, seen_tokens=4)


def test_snapshot_is_a_detached_deep_copy_and_restore_puts_it_back():
    cache = filled_cache()
    cache[0]["recurrent_state"].requires_grad_(True)
    snap = cache.snapshot()
    assert not snap[0]["recurrent_state"].requires_grad
    before = snap.snapshot()
    cache[0]["conv_state"][1].add_(1.0)  # in-place change of the live cache
    cache.update_states(2, offset=3, recurrent_state=torch.ones(2, 2, 4, 8))
    assert_same(snap, before)
    cache.restore(snap)
    assert_same(cache, before)
    cache[0]["conv_state"][0].mul_(2.0)
    assert_same(snap, before)  # restore copies, so the snapshot can be restored again
    with pytest.raises(TypeError, match="FastWeightCache"):
        cache.restore({})


def test_reset_forgets_everything():
    cache = filled_cache().reset()
    assert len(cache) == 0 and cache.get_seq_length() == 0


def test_save_load_round_trip(tmp_path):
    cache = filled_cache()
    cache.update_states(3, offset=0, state64=torch.randn(2, 3, dtype=torch.float64))
    path = str(tmp_path / "cache.safetensors")
    cache.save(path)
    loaded = FastWeightCache().load(path)
    assert_same(loaded, cache)
    assert isinstance(loaded[0]["conv_state"], tuple)


def test_load_rejects_other_safetensors_files(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "weights.safetensors")
    save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not a saved FastWeightCache"):
        FastWeightCache().load(path)


def test_reorder_cache_selects_batch_rows():
    cache = filled_cache()
    expected = cache[0]["conv_state"][2][[1, 1]]
    cache.reorder_cache(torch.tensor([1, 1]))
    assert_rel_rms("reordered conv state", cache[0]["conv_state"][2], expected, EXACT)
    assert cache[2]["recurrent_state"].shape[0] == 2


def test_roll_back_learning_through_a_layer(tmp_path):
    """A layer learns from y; restoring the snapshot (or loading a saved copy) undoes it, so the next
    call gives exactly what it gave before the layer saw y."""
    layer = GatedLinearAttention(HIDDEN, num_heads=2, use_short_conv=True, layer_idx=0, backend="torch")
    x, y, probe = torch.randn(2, 6, HIDDEN), torch.randn(2, 4, HIDDEN), torch.randn(2, 1, HIDDEN)
    with torch.no_grad():
        _, _, cache = layer(x, use_cache=True)
        snap = cache.snapshot()
        cache.save(str(tmp_path / "memory.safetensors"))
        expected, _, _ = layer(probe, past_key_values=cache.snapshot(), use_cache=True)
        layer(y, past_key_values=cache, use_cache=True)
        learned, _, _ = layer(probe, past_key_values=cache.snapshot(), use_cache=True)
        assert (learned - expected).abs().max() > 1e-3, "the layer should have learned from y"
        assert cache.get_seq_length() == 10
        for restored in (cache.restore(snap), FastWeightCache().load(str(tmp_path / "memory.safetensors"))):
            assert restored.get_seq_length() == 6
            replay, _, _ = layer(probe, past_key_values=restored, use_cache=True)
            assert_rel_rms("replay after rollback", replay, expected, EXACT)
        fresh, _, _ = layer(probe, past_key_values=cache.reset(), use_cache=True)
        assert_rel_rms("after reset", fresh, layer(probe)[0], EXACT)


def test_titans_state_survives_copy_deepcopy_and_pickle():
    # a tuple subclass built from its tensors (__new__(*tensors)): the copies must rebuild it the same way
    import copy
    import pickle

    from ipl_layers.state import TitansState

    state = TitansState.of((torch.randn(2, 3),), (torch.randn(2, 3),), (torch.randn(2, 3),), torch.tensor([1, 2]))
    for twin in (copy.copy(state), copy.deepcopy(state), pickle.loads(pickle.dumps(state))):
        assert type(twin) is TitansState and twin.depth == 1
        assert all(torch.equal(a, b) for a, b in zip(twin, state))


def test_is_a_transformers_cache_that_takes_attention_keys_and_values():
    from transformers.cache_utils import Cache

    cache = FastWeightCache()
    assert isinstance(cache, Cache) and not cache.is_compileable
    k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8)  # [B, H, T, D]
    keys, values = cache.update(k, v, 1)
    assert keys is k and values is v and len(cache) == 2 and cache.get_seq_length(1) == 4
    keys, values = cache.update(k[:, :, :1], v[:, :, :1], 1)
    assert torch.equal(keys, torch.cat([k, k[:, :, :1]], 2)) and torch.equal(values, torch.cat([v, v[:, :, :1]], 2))
    assert cache.get_seq_length(1) == 5 and cache.get_mask_sizes(2, 1) == (7, 0)
    assert cache.layers[1].keys is cache[1]["keys"]
    cache.update_states(0, offset=5, recurrent_state=torch.randn(2, 2, 4, 8))
    assert not cache.is_croppable
    cache.crop(0)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(-1)


def test_batch_operations_apply_to_every_state():
    cache = filled_cache()
    cache.update(torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4), 1)
    before = cache.snapshot()
    cache.batch_repeat_interleave(3)
    for i, name in ((0, "recurrent_state"), (2, "recurrent_state"), (1, "keys")):
        assert torch.equal(cache[i][name], before[i][name].repeat_interleave(3, 0))
    assert torch.equal(cache[0]["conv_state"][2], before[0]["conv_state"][2].repeat_interleave(3, 0))
    cache.batch_select_indices(torch.tensor([0, 3]))
    assert_same(cache, before)
    cache.reorder_cache(torch.tensor([1, 1]))
    assert torch.equal(cache[1]["values"], before[1]["values"][[1, 1]])
    assert cache.get_seq_length(0) == 5 and cache.get_seq_length(1) == 3
