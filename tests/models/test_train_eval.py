"""The per-position eval: one loss per position, a CSV and a PNG comparing checkpoints."""

import csv

import numpy as np

from ipl_layers.models.evaluate import log_bins, main, per_position_loss
from ipl_layers.models.train import train
from ipl_layers.models.train_config import parse_config


def test_log_bins_cover_every_position_once():
    for length in (1, 2, 5, 64, 1024):
        bins = log_bins(length)
        assert [t for b in bins for t in b] == list(range(length))
        assert length == 1 or len(bins[-1]) > 1  # no lone last position


def test_eval_compares_checkpoints_in_a_csv_and_a_png(tiny_train_args, tmp_path, capsys):
    train(parse_config(tiny_train_args + [f"--out_dir={tmp_path / 'run'}"]))
    curve = per_position_loss(str(tmp_path / "run" / "step-00000006"), seq_len=48, sequences=3)
    assert curve.shape == (48,) and np.isfinite(curve).all() and (curve > 0).all()

    main([str(tmp_path / "run"), str(tmp_path / "run" / "step-00000004"), "--seq_len=48", "--sequences=3",
          f"--out={tmp_path / 'eval'}"])
    rows = list(csv.reader(open(tmp_path / "eval" / "per_position.csv")))
    assert rows[0] == ["position", "run/step-00000006", "run/step-00000004"]
    assert [int(r[0]) for r in rows[1:]] == list(range(1, 49))
    np.testing.assert_allclose([float(r[1]) for r in rows[1:]], curve, rtol=1e-5)
    assert (tmp_path / "eval" / "per_position.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[16,49)" in capsys.readouterr().out
