"""IPLForCausalLM end to end on tiny configs: every mixer's prefill + decode equals the full forward, greedy
generate() equals the argmax of full forwards (also on a left-padded batch), padding masks and packed sequences
equal each sequence alone, save/load and the Auto classes give
bit-identical logits, gradient checkpointing gives the same gradients, tied and untied heads."""

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import ipl_layers  # noqa: F401  (registers the Auto classes)
from ipl_layers.cache import FastWeightCache
from ipl_layers.models import MIXERS, IPLConfig, IPLForCausalLM, IPLModel, register_mixer

TOL = 1e-5  # relative RMS error between fp32 logits computed two ways (same weights)
VOCAB = 64
# small chunks and windows, so that the prompts below cross chunk, mini-batch and window boundaries
MIXER_KWARGS = {"ttt_linear": {"mini_batch_size": 4}, "ttt_mlp": {"mini_batch_size": 4},
                "titans": {"chunk_size": 4}, "lact": {"chunk_size": 4, "window_size": 3}, "mamba2": {"state_size": 8}}
MEMORY = {"memory_layers": [1], "kwargs": {"memory_plus": {"num_heads": 2, "num_keys": 8, "topk": 2, "key_dim": 8},
                                           "product_key": {"num_heads": 2, "num_keys": 8, "topk": 2, "key_dim": 8}}}


def rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def tiny(mixers, **kwargs):
    config = IPLConfig(**{"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": len(mixers), "num_heads": 2,
                          "num_kv_heads": 1, "mixers": mixers, "window_size": 5, "mixer_kwargs": MIXER_KWARGS,
                          "ffn": MEMORY if len(mixers) > 1 else "swiglu", **kwargs})
    return IPLForCausalLM(config).eval()


def test_every_registered_mixer_is_covered():
    """The per-mixer tests below run each registered name: a layer registered later joins them (kwargs here)."""
    assert set(MIXERS) == {"attn", "swa", "linear_attn", "gla", "deltanet", "gated_deltanet", "ttt_linear", "ttt_mlp",
                           "titans", "lact", "mamba2", "memory_attention"}


def prefill_then_decode(model, x, prompt):
    """The logits [B, T, V] of a prefill of `prompt` tokens then one token at a time, and the final cache."""
    out = model(x[:, :prompt], use_cache=True)
    steps, cache = [out.logits], out.cache
    for t in range(prompt, x.shape[1]):
        out = model(x[:, t : t + 1], cache=cache, use_cache=True)
        steps.append(out.logits)
        cache = out.cache
    return torch.cat(steps, 1), cache


@pytest.mark.parametrize("mixer", sorted(MIXERS))
@torch.no_grad()
def test_prefill_decode_equals_full_forward(mixer):
    """Layer 0 is the mixer under test, layer 1 sliding-window attention with a Memory+ feed-forward."""
    model = tiny([mixer, "swa"])
    x = torch.randint(0, VOCAB, (2, 13))
    full = model(x, use_cache=False).logits  # [B, T, V]
    logits, cache = prefill_then_decode(model, x, 7)
    assert isinstance(cache, FastWeightCache) and cache.get_seq_length() == 13
    assert rel(logits, full) < TOL


@pytest.mark.parametrize("memory", ["ttt_linear", "titans"])
@torch.no_grad()
def test_memory_attention_options_through_mixer_kwargs(memory):
    """The memory_attention mixer takes the layer's options from the config: a TTT / Titans memory, sinks and
    adapters; prefill + decode equals the full forward, and a packed batch equals each sequence alone."""
    kwargs = {"memory": memory, "mini_batch_size": 4, "num_sink_tokens": 2, "adapter_rank": 2}
    model = tiny(["memory_attention", "swa"], mixer_kwargs={"memory_attention": kwargs})
    layer = model.model.layers[0].mixer
    assert (layer.memory, layer.num_sink_tokens, layer.adapter_rank, layer.window_size) == (memory, 2, 2, 5)
    x = torch.randint(0, VOCAB, (2, 13))
    full = model(x, use_cache=False).logits
    assert rel(prefill_then_decode(model, x, 7)[0], full) < TOL
    cu = torch.tensor([0, 13, 26], dtype=torch.int32)
    assert rel(model(x.reshape(1, 26), cu_seqlens=cu, use_cache=False).logits[0], full.flatten(0, 1)) < TOL


@pytest.mark.parametrize("mixer", sorted(MIXERS))
@torch.no_grad()
def test_greedy_generate_equals_full_forward_argmax(mixer):
    model = tiny([mixer, "swa"])
    prompt = torch.randint(1, VOCAB, (1, 6))  # no pad token (0): generate() would mask it
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = prompt
    for _ in range(6):
        logits = model(expected, use_cache=False).logits
        expected = torch.cat([expected, logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(generated, expected)


@pytest.mark.parametrize("mixer", sorted(MIXERS))
@torch.no_grad()
def test_padding_mask_equals_varlen_equals_per_sample(mixer):
    """Right- and left-padded rows, packed sequences (`cu_seqlens`, an empty one included) and each sequence alone
    give the same logits at the real tokens."""
    model = tiny([mixer, "swa"])
    lengths = (7, 0, 5, 9)
    seqs = [torch.randint(0, VOCAB, (1, n)) for n in lengths]
    alone = [model(s, use_cache=False).logits[0] for s in seqs if s.shape[1]]
    cu = torch.tensor([0, 7, 7, 12, 21], dtype=torch.int32)
    packed = model(torch.cat(seqs, 1), cu_seqlens=cu, use_cache=False).logits[0]
    assert rel(packed, torch.cat(alone)) < TOL
    T = max(lengths)
    ids, mask = torch.zeros(4, T, dtype=torch.long), torch.zeros(4, T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : s.shape[1]], mask[b, : s.shape[1]] = s[0], 1  # right padding on even rows, left on odd ones
        if b % 2:
            ids[b], mask[b] = ids[b].roll(T - s.shape[1]), mask[b].roll(T - s.shape[1])
    logits = model(ids, attention_mask=mask, use_cache=False).logits
    assert rel(logits[mask.bool()], torch.cat(alone)) < TOL


@torch.no_grad()
def test_left_padded_batch_generate_equals_each_alone():
    model = tiny(["swa", "gated_deltanet", "ttt_linear", "attn"])
    prompts = [torch.randint(1, VOCAB, (1, n)) for n in (7, 4)]
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, 7 - p.shape[1] :], mask[b, 7 - p.shape[1] :] = p[0], 1
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for b, p in enumerate(prompts):
        alone = model.generate(p, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(batch[b, 7:], alone[0, p.shape[1] :])


@torch.no_grad()
def test_sampling_and_beam_search_use_the_cache_right():
    """Sampling with top_k=1 is greedy; beam search, which reorders the cache rows (`reorder_cache`), equals beam
    search recomputing every step without a cache."""
    model = tiny(["swa", "ttt_linear", "gated_deltanet"])
    ids = torch.randint(1, VOCAB, (2, 6))
    greedy = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=True, top_k=1, pad_token_id=0), greedy)
    beams = {use_cache: model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0,
                                       use_cache=use_cache) for use_cache in (True, False)}
    assert torch.equal(beams[True], beams[False])


@torch.no_grad()
def test_save_load_and_auto_classes_bit_identical(tmp_path):
    model = tiny(["swa", "ttt_mlp", "lact"], tie_word_embeddings=False)
    x = torch.randint(0, VOCAB, (2, 9))
    logits = model(x).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), IPLConfig)
    for cls in (IPLForCausalLM, AutoModelForCausalLM):
        loaded = cls.from_pretrained(tmp_path).eval()
        assert type(loaded) is IPLForCausalLM
        assert torch.equal(loaded(x).logits, logits)
    base = AutoModel.from_pretrained(tmp_path).eval()
    assert type(base) is IPLModel
    assert torch.equal(base(x).last_hidden_state, model.model(x).last_hidden_state)


def test_tied_and_untied_heads():
    tied, untied = tiny(["attn"]), tiny(["attn"], tie_word_embeddings=False)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)


def test_layer_init_is_kept():
    """The model's init leaves the layers' own (Titans' forgetting-gate bias starts at -5)."""
    model = tiny(["titans"])
    bias = model.model.layers[0].mixer.gate_proj.bias
    assert torch.all(bias[-2:] == -5.0)


def test_gradient_checkpointing_same_gradients():
    x = torch.randint(0, VOCAB, (2, 10))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = tiny(["swa", "gated_deltanet", "ttt_linear"]).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert all(block.gradient_checkpointing for block in model.model.layers)
        model(x, labels=x).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].numel() == grads[1].numel() and rel(grads[1], grads[0]) < TOL


def test_register_mixer():
    """A later layer registers a name; configs can then use it (and a taken name is refused)."""
    register_mixer("swa_wide", MIXERS["swa"])
    try:
        model = tiny(["swa_wide"], mixer_kwargs={"swa_wide": {"window_size": 2}})
        assert model.model.layers[0].mixer.window_size == 2
        with pytest.raises(ValueError, match="'attn' is already registered"):
            register_mixer("attn", MIXERS["swa"])
    finally:
        del MIXERS["swa_wide"]


def test_model_input_errors():
    model = tiny(["attn"])
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        model()
    with pytest.raises(TypeError, match="cache: expected a FastWeightCache"):
        model(torch.zeros(1, 2, dtype=torch.long), cache={}, use_cache=True)
    with pytest.raises(ValueError, match="labels need the logits of every position"):
        model(torch.zeros(1, 2, dtype=torch.long), labels=torch.zeros(1, 2, dtype=torch.long), logits_to_keep=1)
