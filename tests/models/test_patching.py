"""patch_attention on tiny random Llama, Qwen2 and Qwen3 decoders: patching with "attn" reproduces Llama exactly;
patched hybrids run forward and backward, and greedy generate() (left-padded batch, the host's own cache) equals
the argmax of full forwards."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from ipl_layers.cache import FastWeightCache
from ipl_layers.models import patch_attention
from ipl_layers.models.patching import PatchedAttention

TOL = 1e-5  # relative RMS error of fp32 logits computed two ways
VOCAB = 64
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0)
HOSTS = [(LlamaConfig, LlamaForCausalLM), (Qwen2Config, Qwen2ForCausalLM), (Qwen3Config, Qwen3ForCausalLM)]


def rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def left_padded_batch():
    ids = torch.randint(1, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


@torch.no_grad()
def greedy_by_full_forwards(model, ids, mask, steps):
    for _ in range(steps):
        next_token = model(ids, attention_mask=mask, use_cache=False).logits[:, -1:].argmax(-1)
        ids, mask = torch.cat([ids, next_token], 1), torch.cat([mask, torch.ones_like(next_token)], 1)
    return ids


@torch.no_grad()
def test_attn_patch_reproduces_llama():
    model = LlamaForCausalLM(LlamaConfig(**SIZES)).eval()
    ids, mask = left_padded_batch()
    logits = model(ids, attention_mask=mask).logits
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    reused = patch_attention(model, [0, 2], "attn")
    assert reused == {0: ["q_proj", "k_proj", "v_proj", "o_proj"], 2: ["q_proj", "k_proj", "v_proj", "o_proj"]}
    assert isinstance(model.model.layers[0].self_attn, PatchedAttention)
    real = mask.bool()
    assert rel(model(ids, attention_mask=mask).logits[real], logits[real]) < TOL
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False), generated)


@pytest.mark.parametrize("config_cls, model_cls", HOSTS)
@pytest.mark.parametrize("mixer, kwargs", [("gated_deltanet", {}), ("ttt_linear", {"mini_batch_size": 4}),
                                           ("swa", {"window_size": 4})])
def test_patched_host_trains_and_generates(config_cls, model_cls, mixer, kwargs):
    model = model_cls(config_cls(**SIZES))
    patch_attention(model, [0, 2], mixer, **kwargs)
    ids, mask = left_padded_batch()
    model.train()
    labels = ids.masked_fill(mask == 0, -100)
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    for name, p in model.named_parameters():
        if ".self_attn.mixer." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient"
    model.eval()
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(generated, greedy_by_full_forwards(model, ids, mask, 5))


def test_patch_errors():
    model = LlamaForCausalLM(LlamaConfig(**SIZES))
    with pytest.raises(ValueError, match=r"mixer: expected one of \[.*\], got 'mamba9'"):
        patch_attention(model, [0], "mamba9")
    with pytest.raises(ValueError, match=r"layers: expected indices in \[0, 3\), got 3"):
        patch_attention(model, [3], "attn")
    with pytest.raises(ValueError, match="'swa' needs window_size"):
        patch_attention(model, [0], "swa")
    patch_attention(model, [1], "gla")
    with pytest.raises(ValueError, match="layer 1 is already patched"):
        patch_attention(model, [1], "attn")
    with pytest.raises(ValueError, match=r"expected a decoder with model.layers\[i\].self_attn"):
        patch_attention(torch.nn.Linear(2, 2), [0], "attn")


@pytest.mark.parametrize("config_cls, model_cls", HOSTS)
@torch.no_grad()
def test_patched_host_with_one_fast_weight_cache(config_cls, model_cls):
    """Given a FastWeightCache, the host's attention layers keep keys/values and the patched layers fast weights in
    it: greedy and beam generate() equal generate() without a cache, and a snapshot restores exactly."""
    model = model_cls(config_cls(**SIZES)).eval()
    patch_attention(model, [0, 2], "gated_deltanet")
    ids, mask = left_padded_batch()
    cache = FastWeightCache()
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, cache=cache)
    assert torch.equal(generated, greedy_by_full_forwards(model, ids, mask, 5))
    assert sorted(cache[1]) == ["keys", "seen_tokens", "values"], "the host's attention layer keeps keys/values"
    assert "recurrent_state" in cache[0] and "recurrent_state" in cache[2]
    assert [cache.get_seq_length(i) for i in range(3)] == [ids.shape[1] + 4] * 3  # the last token is not fed back
    assert not hasattr(cache, "ipl_state")

    beams = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, num_beams=3)
    assert torch.equal(model.generate(ids, cache=FastWeightCache(), **beams), model.generate(ids, use_cache=False,
                                                                                          **beams))

    prompt = model(ids, attention_mask=mask, cache=FastWeightCache(), use_cache=True)
    before = prompt.cache.snapshot()
    step = torch.randint(1, VOCAB, (2, 1))
    step_mask = torch.cat([mask, torch.ones_like(step)], 1)
    first = model(step, attention_mask=step_mask, cache=prompt.cache, use_cache=True).logits
    again = model(step, attention_mask=step_mask, cache=prompt.cache.restore(before), use_cache=True).logits
    assert torch.equal(first, again)
