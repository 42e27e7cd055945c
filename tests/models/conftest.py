"""Imports ipl_layers before any test module here imports transformers: run from the checkout's root (`python -m
pytest` puts it on sys.path), our `kernels/` folder would otherwise shadow Hugging Face's `kernels` package that
transformers imports; `ipl_layers` loads the installed one first (see `ipl_layers/_source_layout.py`)."""

import ipl_layers  # noqa: F401

import pytest  # noqa: E402


@pytest.fixture
def tiny_train_args(tmp_path):
    """Overrides for a training run of a few seconds: a 2-layer hybrid (sliding-window attention, TTT-Linear with
    a Memory+ feed-forward, so the memory value group and TTT's state are in the optimizer) on a folder of small
    text files; the caller adds --out_dir."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(24):  # enough files that both splits get some at val_fraction 0.25
        (corpus / f"f{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(40)))
    return [f"--data={corpus}", "--val_fraction=0.25", "--seq_len=32", "--batch_size=2", "--steps=6",
            "--warmup_steps=2", "--eval_every=4", "--eval_sequences=4", "--save_every=2", "--log_every=1",
            "--eval_seq_len=64", "--model.hidden_size=32", "--model.num_hidden_layers=2", "--model.num_heads=2",
            "--model.mixers=swa,ttt_linear", "--model.mixer_kwargs={ttt_linear: {mini_batch_size: 8}}",
            "--model.window_size=8",
            "--model.ffn={memory_layers: [1], kwargs: {memory_plus: {num_heads: 2, num_keys: 8, topk: 2, key_dim: 8}}}"]


@pytest.fixture
def tiny_tokenizer(tmp_path):
    """A local tokenizer folder: a byte-level BPE of 300 tokens (so any text encodes) trained offline on a few
    strings, with an eos token, saved as `transformers` saves one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([f"def f{i}(x):\n    return x * {i}\n" for i in range(50)] +
                            ["The pass key is 12345. Remember it. What is the pass key?"], trainer)
    path = tmp_path / "tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>").save_pretrained(str(path))
    return str(path)
