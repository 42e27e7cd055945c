"""`ipl-eval passkey` / `python -m ipl_layers.models.passkey`: passkey retrieval (Mohtashami & Jaggi 2023). A prompt
of `length` tokens hides "The pass key is NNNNN. Remember it. NNNNN is the pass key." at a depth in filler text and
ends with "What is the pass key? The pass key is"; the checkpoint greedily decodes the answer, and a trial counts
when the digits it writes first are the key.

    ipl-eval passkey runs/demo                                    # lengths 256,1024,4096, depths 0..1, 10 trials
    ipl-eval passkey runs/demo --lengths=512,2048 --depths=0,0.5,1 --trials=20 --filler=validation

Text is bytes for a byte-level run and goes through the run's tokenizer for a tokenizer run; lengths count those
tokens. The filler is a fixed sentence repeated (the task's original filler) or, with `--filler=validation`, a
window of the run's validation split at a random offset. Keys and offsets come from
`numpy.random.default_rng([seed, length, depth index])`. Writes `<out>/passkey.csv` (length, depth, trials,
correct, accuracy) and prints the accuracy per length.
"""

import argparse
import csv
import functools
import os
import re
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from ipl_layers.models.evaluate import load_run, resolve_checkpoint
from ipl_layers.models.tokenizer import load_tokenizer
from ipl_layers.models.train import resolve_device

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = " What is the pass key? The pass key is"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "

Encode = Callable[[str], List[int]]


def byte_encode(text: str) -> List[int]:
    return list(text.encode())


def byte_decode(ids: List[int]) -> str:
    """Ids past the bytes (a vocabulary padded beyond 256) become 0xFF, never UTF-8, so they read as U+FFFD
    instead of vanishing from between two digits."""
    return bytes(i if i < 256 else 0xFF for i in ids).decode("utf-8", "replace")


def passkey_prompt(filler: Sequence[int], key: str, depth: float, length: int, encode: Encode) -> List[int]:
    """`length` token ids: the first tokens of `filler` with the key sentence at `depth` of them (0: before all,
    1: after all), then the question."""
    needle, question = encode(NEEDLE.format(key=key)), encode(QUESTION)
    room = length - len(needle) - len(question)
    if room < 0:
        raise ValueError(f"lengths: expected at least {len(needle) + len(question)} tokens (the key sentence and "
                         f"the question), got {length}")
    if not 0 <= depth <= 1:
        raise ValueError(f"depths: expected values in [0, 1], got {depth}")
    if len(filler) < room:
        raise ValueError(f"filler: expected at least {room} tokens for a prompt of {length}, got {len(filler)}")
    at = round(depth * room)
    return [int(t) for t in filler[:at]] + needle + [int(t) for t in filler[at:room]] + question


def answer(text: str) -> Optional[str]:
    """The digits the decoded continuation starts with (after spaces), or None."""
    match = re.match(r"\s*(\d+)", text)
    return match.group(1) if match else None


@torch.no_grad()
def greedy_decode(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, steps] greedy continuation of `ids` [B, T] through the model's cache. Not generate(): the validation
    filler of a byte run holds 0 bytes (document separators), which generate() would take for padding."""
    out = model(ids, use_cache=True, logits_to_keep=1)
    tokens = []
    for i in range(steps):
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))  # [B, 1]
        if i + 1 < steps:
            out = model(tokens[-1], cache=out.cache, use_cache=True)
    return torch.cat(tokens, 1)


def passkey_accuracy(model: torch.nn.Module, encode: Encode, decode: Callable[[List[int]], str],
                     filler: Callable[[np.random.Generator, int], Sequence[int]], lengths: Sequence[int],
                     depths: Sequence[float], trials: int, seed: int = 0, batch_size: int = 8,
                     device: torch.device = torch.device("cpu")) -> List[dict]:
    """One row {length, depth, trials, correct, accuracy} per (length, depth); `filler(rng, n)` gives n tokens."""
    rows = []
    for length in lengths:
        for index, depth in enumerate(depths):
            rng = np.random.default_rng([seed, length, index])
            keys = [str(rng.integers(10_000, 100_000)) for _ in range(trials)]
            prompts = [passkey_prompt(filler(rng, length), key, depth, length, encode) for key in keys]
            steps = max(len(encode(f" {key}")) for key in keys) + 1  # the key and one token to end its digits
            correct = 0
            for start in range(0, trials, batch_size):
                ids = torch.tensor(prompts[start:start + batch_size], device=device)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    new = greedy_decode(model, ids, steps).tolist()
                correct += sum(answer(decode(t)) == key for t, key in zip(new, keys[start:start + batch_size]))
            rows.append({"length": length, "depth": depth, "trials": trials, "correct": correct,
                         "accuracy": correct / trials})
    return rows


def _repeated(encode: Encode) -> Callable[[np.random.Generator, int], List[int]]:
    sentence = encode(FILLER)
    return lambda rng, n: (sentence * (n // len(sentence) + 1))[:n]


def _window(tokens: np.ndarray) -> Callable[[np.random.Generator, int], np.ndarray]:
    def take(rng: np.random.Generator, n: int) -> np.ndarray:
        if len(tokens) < n:
            raise ValueError(f"lengths: --filler=validation needs at most the {len(tokens)} validation tokens, "
                             f"got {n}")
        start = rng.integers(0, len(tokens) - n + 1)
        return tokens[start:start + n]
    return take


def write_csv(rows: List[dict], path: str):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["length", "depth", "trials", "correct", "accuracy"])
        for r in rows:
            writer.writerow([r["length"], r["depth"], r["trials"], r["correct"], f"{r['accuracy']:.4f}"])


def _list(kind):
    def parse(text: str):
        try:
            return [kind(x) for x in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
    return parse


def main(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(prog="ipl-eval passkey", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a run folder (its latest checkpoint) or a checkpoint folder")
    parser.add_argument("--lengths", type=_list(int), default=[256, 1024, 4096], help="prompt lengths in tokens")
    parser.add_argument("--depths", type=_list(float), default=[0.0, 0.25, 0.5, 0.75, 1.0],
                        help="where the key sentence sits in the filler: 0 first, 1 last")
    parser.add_argument("--trials", type=int, default=10, help="prompts (keys) per length and depth")
    parser.add_argument("--filler", choices=("sentence", "validation"), default="sentence")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--out", default=None, help="output folder (default: <run>/eval)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    checkpoint = resolve_checkpoint(args.checkpoint)
    device = resolve_device(args.device)
    config, model, val_tokens, byte_level = load_run(checkpoint, device)
    if config.tokenizer is not None:
        tokenizer = load_tokenizer(config.tokenizer)
        encode, decode = functools.partial(tokenizer.encode, add_special_tokens=False), tokenizer.decode
    elif byte_level:
        encode, decode = byte_encode, byte_decode
    else:
        raise ValueError(f"checkpoint: expected a byte-level or --tokenizer run, got {checkpoint!r}, trained on the "
                         f"token file {config.data!r} whose text encoding is unknown")
    filler = _window(val_tokens) if args.filler == "validation" else _repeated(encode)
    rows = passkey_accuracy(model, encode, decode, filler, args.lengths, args.depths, args.trials, args.seed,
                            args.batch_size, device)
    path = os.path.join(args.out or os.path.join(os.path.dirname(os.path.normpath(checkpoint)), "eval"),
                        "passkey.csv")
    write_csv(rows, path)
    for length in args.lengths:
        mine = [r for r in rows if r["length"] == length]
        correct, trials = sum(r["correct"] for r in mine), sum(r["trials"] for r in mine)
        depths = " ".join(f"{r['depth']:g}:{r['accuracy']:.2f}" for r in mine)
        print(f"length {length:>6}: {correct}/{trials} = {correct / trials:.3f}  (by depth {depths})")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
