"""HF-compatible hybrid models (installed as `ipl_layers.models`): `IPLConfig`, `IPLModel`, `IPLForCausalLM`, the
mixer / feed-forward registries, and `patch_attention` (our mixers inside existing Llama/Qwen decoders). Importing
it (which `import ipl_layers` does) registers the config and the models with `AutoConfig`, `AutoModel` and
`AutoModelForCausalLM` under model_type "ipl". Pretraining and evals live in `train` (`ipl-train`) and `evaluate`
(`ipl-eval`), imported on demand: they need tqdm, PyYAML and matplotlib, the models do not."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from ipl_layers.models.attention import IPLAttention
from ipl_layers.models.configuration_ipl import IPLConfig, expand_pattern
from ipl_layers.models.modeling_ipl import IPLForCausalLM, IPLModel, IPLPreTrainedModel
from ipl_layers.models.patching import patch_attention
from ipl_layers.models.registry import FFNS, MIXERS, register_ffn, register_mixer

AutoConfig.register(IPLConfig.model_type, IPLConfig, exist_ok=True)
AutoModel.register(IPLConfig, IPLModel, exist_ok=True)
AutoModelForCausalLM.register(IPLConfig, IPLForCausalLM, exist_ok=True)

__all__ = [
    "FFNS",
    "IPLAttention",
    "IPLConfig",
    "IPLForCausalLM",
    "IPLModel",
    "IPLPreTrainedModel",
    "MIXERS",
    "expand_pattern",
    "patch_attention",
    "register_ffn",
    "register_mixer",
]
