"""The MQAR generator (Zoology's task) and its accuracy metric."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ipl_layers.models import IPLConfig, IPLForCausalLM
from ipl_layers.models.mqar import mqar_accuracy, mqar_batch

VOCAB = 64


def test_rows_hold_pairs_and_their_queries():
    ids, labels = mqar_batch(np.random.default_rng(0), batch_size=16, seq_len=128, num_kv_pairs=8, vocab_size=VOCAB)
    assert ids.shape == labels.shape == (16, 128)
    for row, row_labels in zip(ids.tolist(), labels.tolist()):
        keys, values = row[0:16:2], row[1:16:2]
        assert all(1 <= k < VOCAB // 2 for k in keys) and all(VOCAB // 2 <= v < VOCAB for v in values)
        assert len(set(keys)) == len(set(values)) == 8
        answers = [t for t, label in enumerate(row_labels) if label != -100]
        assert len(answers) == 8 and all(row_labels[t] == row[t] for t in answers)
        asked = {row[t - 1]: row[t] for t in answers}  # every key is queried once, answered by its own value
        assert asked == dict(zip(keys, values))
        filler = set(range(16, 128)) - set(answers) - {t - 1 for t in answers}
        assert all(row[t] == 0 for t in filler)


def test_query_gaps_follow_the_power_law_and_seeds_repeat():
    ids, labels = mqar_batch(np.random.default_rng(1), batch_size=64, seq_len=512, num_kv_pairs=8, vocab_size=VOCAB)
    gaps = ((labels[:, 16:] != -100).nonzero()[:, 1] - 1) // 2  # query slot index after the context
    assert gaps.float().median() < 0.25 * (512 - 16) // 2  # power law: most queries come early ...
    assert gaps.max() > 0.5 * (512 - 16) // 2  # ... and a few far later
    again = mqar_batch(np.random.default_rng(1), batch_size=64, seq_len=512, num_kv_pairs=8, vocab_size=VOCAB)
    assert torch.equal(ids, again[0]) and torch.equal(labels, again[1])


def test_mistakes_are_named():
    with pytest.raises(ValueError, match="num_kv_pairs: expected 1..31"):
        mqar_batch(np.random.default_rng(0), 1, 256, 32, VOCAB)
    with pytest.raises(ValueError, match="seq_len: expected >= 32 for 8 pairs"):
        mqar_batch(np.random.default_rng(0), 1, 24, 8, VOCAB)


class _Oracle(torch.nn.Module):
    """Logits that put all mass on the next token shifted by `shift`: 0 is a perfect model, 1 an off-by-one one."""

    def __init__(self, shift: int):
        super().__init__()
        self.shift = shift

    def forward(self, ids, use_cache=False):
        nxt = torch.roll(ids, -1 - self.shift, dims=1)
        return type("Out", (), {"logits": F.one_hot(nxt, VOCAB).float()})


def test_accuracy_scores_the_answers_only():
    ids, labels = mqar_batch(np.random.default_rng(2), batch_size=4, seq_len=64, num_kv_pairs=4, vocab_size=VOCAB)
    assert mqar_accuracy(_Oracle(0), ids, labels) == 1.0
    assert mqar_accuracy(_Oracle(1), ids, labels) < 0.3
    model = IPLForCausalLM(IPLConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_heads=2,
                                     mixers="swa,gated_deltanet", window_size=8)).eval()
    assert 0.0 <= mqar_accuracy(model, ids, labels) <= 0.2  # untrained: about chance (1 in 32 values)
