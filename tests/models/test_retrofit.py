"""ipl-retrofit on a tiny random Llama saved to a temporary folder (no downloads): the retrofitted layers start as
the original attention inside the window, only the new memory parameters train, checkpoints hold them alone and
resume exactly, and after distillation the KL to the teacher beyond the window is below the sliding-window-only
model's."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from ipl_layers.models.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from ipl_layers.models.retrofit import RetrofitConfig, load_retrofitted, main, retrofit, train

WINDOW = 16


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 2-layer Llama with GQA, initialised wide enough (std 0.1) that its attention is far from uniform, so the
    tokens beyond the window matter to it."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)
    path = tmp_path_factory.mktemp("base")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def options(base, out_dir, **overrides):
    return RetrofitConfig(**{**dict(base=base, layers=[0, 1], window_size=WINDOW, seq_len=96, batch_size=4,
                                    steps=120, lr=1e-2, warmup_steps=5, eval_every=1000, eval_sequences=8,
                                    save_every=50, log_every=10, out_dir=str(out_dir)), **overrides})


def test_retrofit_freezes_all_but_the_memory(base):
    model = LlamaForCausalLM.from_pretrained(base)
    trainable = retrofit(model, [1], WINDOW)
    assert trainable and all(name.startswith("model.layers.1.self_attn.mixer.") for name in trainable)
    assert not any(name.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj") for name in trainable)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(trainable)


def test_distillation_beats_the_window_alone(base, tmp_path):
    result = train(options(base, tmp_path))
    # inside the window the layers are the original attention (the memory is still empty): only rounding differs
    assert abs(result["retrofit_kl_inside"]) < 1e-6 and abs(result["window_only_kl_inside"]) < 1e-6
    # measured: 0.62x with the default rank-8 adapters (0.99x without: the memory then has only the attention's keys)
    assert result["retrofit_kl_beyond"] < 0.8 * result["window_only_kl_beyond"], result
    assert json.load(open(tmp_path / "retrofit.json"))["step"] == 120


def test_checkpoints_hold_the_memory_and_resume_exactly(base, tmp_path):
    short = dict(steps=6, save_every=2, eval_sequences=2)
    full = train(options(base, tmp_path / "full", **short))
    stopped = train(options(base, tmp_path / "resumed", **short), stop_at=3)
    resumed = train(options(base, tmp_path / "resumed", **short), resume=True)
    assert stopped["losses"] + resumed["losses"] == full["losses"]

    checkpoint = latest_checkpoint(str(tmp_path / "full"))
    model = load_retrofitted(str(tmp_path / "full"))
    trained = dict(model.named_parameters())
    stored = load_file(f"{checkpoint}/model.safetensors")
    assert stored.keys() == {n for n, p in trained.items() if ".self_attn.mixer." in n and p.requires_grad}
    assert all(torch.equal(trained[name], value) for name, value in stored.items())
    with pytest.raises(ValueError, match="holds a checkpoint"):
        train(options(base, tmp_path / "full", **short))
    with pytest.raises(ValueError, match="--resume: window_size = 8 differs"):
        train(options(base, tmp_path / "full", window_size=8, **short), resume=True)
    other = LlamaForCausalLM.from_pretrained(base)
    retrofit(other, [1], WINDOW, memory="linear_attention")
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_checkpoint(checkpoint, other, partial=True)


def test_command_line(base, tmp_path, capsys):
    main([base, "--layers=1", f"--window_size={WINDOW}", "--seq_len=48", "--batch_size=2", "--steps=3",
          "--eval_sequences=2", "--memory_kwargs={\"gate_init\": -1.0}", f"--out_dir={tmp_path}"])
    assert "KL to the teacher beyond the window" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--layers: expected comma-separated ints"):
        main([base, "--layers=a", f"--out_dir={tmp_path}"])
    with pytest.raises(ValueError, match="seq_len: expected more than window_size"):
        main([base, "--layers=0", "--window_size=64", "--seq_len=64", f"--out_dir={tmp_path / 'x'}"])


def test_the_base_folders_tokenizer_encodes_the_text(tiny_tokenizer, tmp_path):
    """A base model saved with its tokenizer trains on text encoded by that tokenizer (token files refused)."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_tokenizer, base)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(base)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"f{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x * {j}\n" for j in range(30)))
    run = options(str(base), tmp_path / "run", layers=[0], window_size=8, seq_len=24, batch_size=2, steps=2,
                  eval_sequences=2, data=str(corpus), val_fraction=0.25)
    result = train(run)
    assert result["step"] == 2 and list((tmp_path / "run").glob("tokens-*-train.npy"))
    with pytest.raises(ValueError, match="expected text for the tokenizer"):
        train(options(str(base), tmp_path / "other", layers=[0], data=str(tmp_path / "t.npy")))
