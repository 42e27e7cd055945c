"""Two processes on the gloo backend train as one process does with the same global batch (DDP)."""

import ipl_layers  # noqa: F401  (before transformers, in the spawned processes too)
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ipl_layers.models.train import train
from ipl_layers.models.train_config import parse_config


def _worker(rank: int, args: list, rendezvous: str, results: dict):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        results[rank] = train(parse_config(args))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one(tiny_train_args, tmp_path):
    args = tiny_train_args + ["--batch_size=4", "--grad_accum=2", "--steps=4"]
    one = train(parse_config(args + [f"--out_dir={tmp_path / 'one'}"]))
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(args + [f"--out_dir={tmp_path / 'two'}"], str(tmp_path / "rendezvous"), results),
                 nprocs=2, join=True)
        two = dict(results)
    for rank in (0, 1):  # both ranks log the loss of the global batch: the one process's, up to summation order
        torch.testing.assert_close(two[rank]["losses"], one["losses"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(two[rank]["val_loss"], one["val_loss"], rtol=1e-5, atol=1e-6)
    assert (tmp_path / "two" / "step-00000004" / "manifest.json").exists()  # written once, by rank 0
