"""Multi-query associative recall (MQAR, Arora et al. 2023, "Zoology"): the synthetic recall task on which
fixed-state models fall behind attention, and the test of whether a fast-weight memory can store key -> value.

A row starts with `num_kv_pairs` key-value pairs `k1 v1 k2 v2 ...` (keys from the lower half of the vocabulary,
values from the upper half, distinct within a row), then zeros where every key is queried once: the key, followed
by its value. Query offsets follow Zoology's power law `p(gap = i) ~ a * i^(a - 1)` (a = 0.01 by default), so most
queries come soon after the context and a few far later, as repeated bigrams do in text. Token 0 is filler.

    ids, labels = mqar_batch(np.random.default_rng(0), batch_size=32, seq_len=256, num_kv_pairs=16, vocab_size=8192)
    accuracy = mqar_accuracy(model, ids, labels)

`labels` is -100 except at the queried values, in the layout of `IPLForCausalLM(labels=...)` (it shifts them).
`ipl-eval mqar` (train_mqar.py) trains a model config on these batches and scores it on a grid of lengths.
"""

from typing import Tuple

import numpy as np
import torch


def mqar_batch(rng: np.random.Generator, batch_size: int, seq_len: int, num_kv_pairs: int, vocab_size: int,
               power_a: float = 0.01) -> Tuple[torch.Tensor, torch.Tensor]:
    """([batch_size, seq_len] token ids, [batch_size, seq_len] labels); see the module docstring."""
    half, context = vocab_size // 2, 2 * num_kv_pairs
    if num_kv_pairs < 1 or num_kv_pairs > half - 1:
        raise ValueError(f"num_kv_pairs: expected 1..{half - 1} (distinct keys from 1..vocab_size/2 - 1), "
                         f"got {num_kv_pairs}")
    slots = (seq_len - context) // 2  # query positions: a key and its value take two tokens
    if slots < num_kv_pairs:
        raise ValueError(f"seq_len: expected >= {2 * context} for {num_kv_pairs} pairs and their queries, "
                         f"got {seq_len}")
    gap_p = power_a * np.arange(1, slots + 1) ** (power_a - 1.0)
    gap_p /= gap_p.sum()
    ids = np.zeros((batch_size, seq_len), dtype=np.int64)
    is_answer = np.zeros((batch_size, seq_len), dtype=bool)
    for row in range(batch_size):
        keys = rng.choice(np.arange(1, half), num_kv_pairs, replace=False)
        values = rng.choice(np.arange(half, vocab_size), num_kv_pairs, replace=False)
        ids[row, 0:context:2], ids[row, 1:context:2] = keys, values
        order = rng.permutation(num_kv_pairs)  # which pair each query slot asks for
        query_at = context + 2 * rng.choice(slots, num_kv_pairs, replace=False, p=gap_p)
        ids[row, query_at], ids[row, query_at + 1] = keys[order], values[order]
        is_answer[row, query_at + 1] = True
    ids = torch.from_numpy(ids)
    return ids, torch.where(torch.from_numpy(is_answer), ids, torch.full_like(ids, -100))


@torch.no_grad()
def mqar_accuracy(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of queried values the model predicts (argmax of the logits at the query key)."""
    logits = model(ids, use_cache=False).logits[:, :-1]  # [B, T-1, V]: position t predicts token t+1
    targets = labels[:, 1:]
    answered = targets != -100
    return (logits.argmax(-1)[answered] == targets[answered]).float().mean().item()
