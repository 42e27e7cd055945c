"""Two processes on the gloo backend train as one process does with the same global batch: DDP and FSDP2
(`--parallel=fsdp`), the latter also through a checkpoint and a resume."""

import ipl_layers  # noqa: F401  (before transformers, in the spawned processes too)
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ipl_layers.models.train import train
from ipl_layers.models.train_config import parse_config


def _worker(rank: int, args: list, rendezvous: str, results: dict, stops: tuple):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:  # each stop is one call: a run stopped at `stop` (as if preempted), then resumed
        losses = []
        for i, stop in enumerate(stops):
            result = train(parse_config(args), resume=i > 0, stop_at=stop)
            losses += result["losses"]
        results[rank] = {**result, "losses": losses}
    finally:
        dist.destroy_process_group()


def _two_processes(args: list, tmp_path, stops=(None,)) -> dict:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(args, str(tmp_path / "rendezvous"), results, stops), nprocs=2, join=True)
        return dict(results)


@pytest.mark.parametrize("parallel, stops", [("ddp", (None,)), ("fsdp", (2, None))], ids=["ddp", "fsdp-resumed"])
def test_two_gloo_processes_match_one(tiny_train_args, tmp_path, parallel, stops):
    args = tiny_train_args + ["--batch_size=4", "--grad_accum=2", "--steps=4"]
    one = train(parse_config(args + [f"--out_dir={tmp_path / 'one'}"]))
    two = _two_processes(args + [f"--out_dir={tmp_path / 'two'}", f"--parallel={parallel}"], tmp_path, stops)
    for rank in (0, 1):  # both ranks log the loss of the global batch: the one process's, up to summation order
        torch.testing.assert_close(two[rank]["losses"], one["losses"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(two[rank]["val_loss"], one["val_loss"], rtol=1e-5, atol=1e-6)
    assert (tmp_path / "two" / "step-00000004" / "manifest.json").exists()  # written once, by rank 0


def test_fsdp_refuses_sparse_value_gradients():
    from ipl_layers.models import IPLConfig, IPLForCausalLM, fsdp

    config = IPLConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_heads=2, mixers="swa,swa",
                       window_size=4, ffn={"memory_layers": [1], "kwargs": {"memory_plus": {
                           "num_heads": 2, "num_keys": 4, "topk": 2, "key_dim": 8, "sparse_grad": True}}})
    with pytest.raises(ValueError, match=r"'fsdp' needs dense gradients, but memory layers \['model.layers.1"):
        fsdp.shard(IPLForCausalLM(config))
