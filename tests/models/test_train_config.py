"""The training config: shipped configs parse and build, overrides are typed, mistakes name the key."""

import pytest
import torch

from ipl_layers.layers.memory import memory_parameter_groups
from ipl_layers.models.train import build_model
from ipl_layers.models.train_config import parse_config


def test_demo_config_builds_a_byte_level_hybrid():
    config = parse_config([])  # the default is the demo
    assert config.out_dir == "runs/demo" and config.data is None
    model = build_model(config)
    assert model.config.vocab_size == 256
    assert model.config.mixers == ["swa", "ttt_linear", "swa", "gated_deltanet"]
    values = memory_parameter_groups(model, 1.0, 1.0)[1]["params"]
    assert len(values) == 1  # the Memory+ table at layer 2 gets its own optimizer group


@pytest.mark.parametrize("name, dense_millions", [("125m", (110, 160)), ("350m", (330, 420))])
def test_gpu_configs_build_at_their_size(name, dense_millions):
    config = parse_config([f"--config={name}"])
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = build_model(config, byte_level=False)
    dense = sum(p.numel() for p in memory_parameter_groups(model, 1.0, 1.0)[0]["params"]) / 1e6
    assert dense_millions[0] < dense < dense_millions[1]


def test_overrides_are_typed_and_applied_in_order(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"model": {"hidden_size": 64, "num_heads": 2}, "steps": 7, "out_dir": "x"}')
    config = parse_config(["--config=demo", f"--config={path}", "--lr=1e-3", "--steps=9", "--model.num_heads=4",
                           "--data=null", "--grad_clip=0"])
    assert config.lr == 1e-3 and isinstance(config.lr, float)
    assert config.steps == 9 and config.out_dir == "x" and config.grad_clip == 0.0
    assert config.model == {"hidden_size": 64, "num_heads": 4} and config.data is None


@pytest.mark.parametrize("args, message", [
    (["--stepz=3"], "--stepz: expected one of"),
    (["--steps=many"], "steps: expected int, got 'many'"),
    (["--steps=0"], "steps: expected a positive int, got 0"),
    (["--val_fraction=1.5"], r"val_fraction: expected a value in \(0, 1\)"),
    (["--device=tpu"], "device: expected"),
    (["--parallel=zero"], "parallel: expected .ddp. or .fsdp., got .zero."),
    (["--lr=-1"], "lr: expected >= 0"),
    (["steps=3"], "arguments: expected --key=value"),
    (["--config=nope"], "config: expected a file or one of"),
    (["--train.lr=1"], "--train.lr: expected one of"),
])
def test_mistakes_name_the_key(args, message):
    with pytest.raises(ValueError, match=message):
        parse_config(args)


def test_model_mistakes_surface_at_build():
    config = parse_config(["--model.mixers=swa,nope,swa,swa"])
    with pytest.raises(ValueError, match=r"mixers\[1\]: expected one of"):
        build_model(config)
    with pytest.raises(ValueError, match="model.vocab_size: byte-level data needs >= 256"):
        build_model(parse_config(["--model.vocab_size=100"]))
