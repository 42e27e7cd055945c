"""A model's fast-weight state as a first-class object: carried across documents, snapshotted and restored
(bit-identical continuations), reset (as a fresh state), saved and loaded alone next to the model, and audited
with per-layer update norms since a snapshot."""

import pytest
import torch

from ipl_layers.cache import FastWeightCache
from ipl_layers.models import IPLConfig, IPLForCausalLM

MIXERS = ["attn", "swa", "ttt_linear", "gated_deltanet", "titans"]


@pytest.fixture
def model():
    config = IPLConfig(vocab_size=64, hidden_size=32, num_hidden_layers=len(MIXERS), num_heads=2, window_size=4,
                       mixers=MIXERS, mixer_kwargs={"ttt_linear": {"mini_batch_size": 4}, "titans": {"chunk_size": 4}})
    return IPLForCausalLM(config).eval()


def read(model, ids, cache):
    """Feeds ids [B, T] through the model, learning into `cache`; returns the logits [B, T, V]."""
    return model(ids, cache=cache, use_cache=True).logits


@torch.no_grad()
def test_snapshot_restore_gives_bit_identical_continuation(model):
    doc_a, doc_b, doc_c = (torch.randint(0, 64, (2, n)) for n in (9, 6, 11))
    cache = FastWeightCache()
    read(model, doc_a, cache)
    snap = cache.snapshot()
    after_b = read(model, doc_b, cache)
    cache.restore(snap)
    read(model, doc_c, cache)  # learns something else, then is rolled back again
    cache.restore(snap)
    assert torch.equal(read(model, doc_b, cache), after_b)


@torch.no_grad()
def test_reset_equals_a_fresh_state(model):
    doc_a, doc_b = torch.randint(0, 64, (2, 9)), torch.randint(0, 64, (2, 5))
    cache = FastWeightCache()
    read(model, doc_a, cache)
    cache.reset()
    assert torch.equal(read(model, doc_b, cache), read(model, doc_b, FastWeightCache()))
    assert cache.get_seq_length() == 5


@torch.no_grad()
def test_state_saved_alone_next_to_the_model(model, tmp_path):
    """The weights (save_pretrained) and the learned state (cache.save) reload into the same continuation."""
    doc_a, doc_b = torch.randint(0, 64, (2, 9)), torch.randint(0, 64, (2, 5))
    cache = FastWeightCache()
    read(model, doc_a, cache)
    model.save_pretrained(tmp_path / "model")
    cache.save(str(tmp_path / "state.safetensors"))
    expected = read(model, doc_b, cache)
    loaded = IPLForCausalLM.from_pretrained(tmp_path / "model").eval()
    state = FastWeightCache().load(str(tmp_path / "state.safetensors"))
    assert torch.equal(read(loaded, doc_b, state), expected)


@torch.no_grad()
def test_update_norms_since_a_snapshot(model):
    cache = FastWeightCache()
    read(model, torch.randint(0, 64, (2, 9)), cache)
    snap = cache.snapshot()
    norms = cache.update_norms(snap)
    assert sorted(norms) == list(range(len(MIXERS)))
    assert all(n == 0.0 for layer in norms.values() for n in layer.values())
    read(model, torch.randint(0, 64, (2, 3)), cache)
    norms = cache.update_norms(snap)
    assert norms[0]["kv_state"] is None  # full attention: the KV cache grew, nothing to subtract
    assert norms[1]["kv_state"] > 0  # sliding window: the same window - 1 slots, new contents
    for i in (2, 3, 4):  # the fast weights learned from the 3 new tokens
        assert norms[i]["recurrent_state"] > 0
    assert norms[3]["conv_state"] > 0
    with pytest.raises(TypeError, match="expected a FastWeightCache"):
        cache.update_norms({})
