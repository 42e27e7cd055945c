"""IPLConfig: pattern strings, defaults, and validation errors that name the field, the expected and the actual."""

import pytest

from ipl_layers.models import IPLConfig, expand_pattern


def small(**kwargs):
    return IPLConfig(**{"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 4, "num_heads": 2, **kwargs})


def test_expand_pattern():
    assert expand_pattern("swa,ttt_linear*2, attn") == ["swa", "ttt_linear", "ttt_linear", "attn"]
    assert expand_pattern("(swa,gla)*2") == ["swa", "gla", "swa", "gla"]
    assert expand_pattern("((swa,gla*2)*2,attn)*2") == (["swa", "gla", "gla"] * 2 + ["attn"]) * 2


@pytest.mark.parametrize("pattern, match", [
    ("swa,(gla", "unbalanced"),
    ("(swa,gla)", "unbalanced or unrepeated"),
    ("swa*0", r"'name\*n' \(n >= 1\), got 'swa\*0'"),
    ("swa,,gla", "got ''"),
    ("swa*x", r"got 'swa\*x'"),
])
def test_expand_pattern_errors(pattern, match):
    with pytest.raises(ValueError, match=match):
        expand_pattern(pattern)


def test_defaults_and_normalisation():
    config = small(mixers="(swa,ttt_linear)*2", ffn="swiglu")
    assert config.mixers == ["swa", "ttt_linear", "swa", "ttt_linear"]
    assert config.ffn == {"default": "swiglu", "memory": "memory_plus", "memory_layers": [], "kwargs": {}}
    assert config.num_kv_heads == 2 and config.intermediate_size == 128  # 8/3 * 32 rounded up to 64
    assert small().mixers == ["attn"] * 4
    config = small(ffn={"memory_layers": [3, 1], "memory": "product_key"})
    assert [config.ffn_name(i) for i in range(4)] == ["swiglu", "product_key", "swiglu", "product_key"]


def test_dict_round_trip():
    config = small(mixers="swa,gla*3", mixer_kwargs={"gla": {"expand_k": 1.0}}, ffn={"memory_layers": [2]})
    again = IPLConfig.from_dict(config.to_dict())
    assert again.mixers == config.mixers and again.ffn == config.ffn and again.mixer_kwargs == config.mixer_kwargs


@pytest.mark.parametrize("kwargs, match", [
    ({"mixers": "swa,gla"}, r"mixers: expected num_hidden_layers = 4 names, got 2"),
    ({"mixers": ["swa", "gla", "attn", "mamba9"]}, r"mixers\[3\]: expected one of \[.*'swa'.*\], got 'mamba9'"),
    ({"mixers": 3}, r"mixers: expected a list of names or a pattern string, got 3"),
    ({"mixer_kwargs": {"flash": {}}}, r"mixer_kwargs: expected names among .*, got 'flash'"),
    ({"mixer_kwargs": {"gla": 1}}, r"mixer_kwargs: expected a dict"),
    ({"ffn": "mlp"}, r"ffn\['default'\]: expected one of \[.*'swiglu'.*\], got 'mlp'"),
    ({"ffn": {"memory": "pkm"}}, r"ffn\['memory'\]: expected one of .*, got 'pkm'"),
    ({"ffn": {"memory_layers": [4]}}, r"ffn\['memory_layers'\]: expected indices in \[0, 4\) .*, got 4"),
    ({"ffn": {"memory_layers": [-1]}}, r"expected indices in \[0, 4\) .*, got -1"),
    ({"ffn": {"memory_layers": [1, 1]}}, r"expected distinct indices, got \[1, 1\]"),
    ({"ffn": {"memory_layer": [1]}}, r"ffn: expected keys among .*, got unknown \['memory_layer'\]"),
    ({"ffn": {"kwargs": {"moe": {}}}}, r"ffn\['kwargs'\]: expected names among .*, got 'moe'"),
    ({"num_heads": 3}, r"num_heads: expected a divisor of hidden_size = 32, got 3"),
    ({"num_kv_heads": 3}, r"num_kv_heads: expected a divisor of num_heads = 2, got 3"),
    ({"num_hidden_layers": 0}, r"num_hidden_layers: expected a positive int, got 0"),
    ({"window_size": 0}, r"window_size: expected a positive int, got 0"),
])
def test_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small(**kwargs)
