"""`IPLModel` and `IPLForCausalLM`: decoders whose layers mix attention and in-parameter-learning layers, as
`transformers` models (save/load with safetensors, `generate()`, gradient checkpointing, the Auto classes).

Every layer keeps its state in one `FastWeightCache` (attention layers their keys and values, fast-weight layers
their fast weights, optimizer sums and conv histories), passed as `cache` the way transformers 5 names it. It is a
`transformers` `Cache` whose layers hold named states (see `ipl_layers/cache.py`); `generate()` is told not to
build a `DynamicCache` (our layers cannot keep fast weights in one) and the model creates a `FastWeightCache` on
the first call with `use_cache`, or takes the one passed (`generate(..., cache=cache)` to keep learning across
calls).

`attention_mask` is a [B, T] padding mask (left or right padding; with a cache it may cover past and current
tokens). Every layer packs the real tokens away, so a padded row computes what the unpadded sequence computes;
the attention layers count RoPE positions over real tokens only, so `position_ids` is not needed and not taken.
Packed batches: `input_ids` [1, total] with `cu_seqlens` [N+1] (a keyword every layer takes) run N sequences
without padding, each from its own state; for training on them, set the labels of each sequence's first token
to -100 (the loss shifts labels across the packed row).
"""

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ipl_layers.cache import FastWeightCache
from ipl_layers.layers.norm import RMSNorm
from ipl_layers.models.attention import IPLAttention
from ipl_layers.models.blocks import IPLBlock, SwiGLU
from ipl_layers.models.configuration_ipl import IPLConfig
from ipl_layers.models.registry import FFNS, MIXERS


class IPLPreTrainedModel(PreTrainedModel):
    config_class = IPLConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["IPLBlock"]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own FastWeightCache; generate() must not make a DynamicCache

    def _init_weights(self, module: nn.Module):
        """Initialises only what the model itself owns: embeddings, the attention and SwiGLU projections, the
        untied head and the block norms. The in-parameter-learning layers keep their constructors' inits (gate
        biases, decay rates, start weights), which the generic `PreTrainedModel` init would overwrite."""
        std = self.config.initializer_range
        if isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (IPLAttention, SwiGLU)):
            for linear in module.children():
                init.normal_(linear.weight, mean=0.0, std=std)
        elif isinstance(module, IPLBlock):
            init.ones_(module.mixer_norm.weight)
            init.ones_(module.ffn_norm.weight)
        elif isinstance(module, IPLModel):
            init.ones_(module.norm.weight)
        elif isinstance(module, IPLForCausalLM) and not self.config.tie_word_embeddings:
            init.normal_(module.lm_head.weight, mean=0.0, std=std)


class IPLModel(IPLPreTrainedModel):
    """Embeddings, `num_hidden_layers` pre-norm blocks (mixer and feed-forward as the config names them), a final
    RMSNorm. Returns the last hidden states [B, T, hidden] and, with `use_cache`, the cache."""

    def __init__(self, config: IPLConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            IPLBlock(
                MIXERS[name](config, i, **config.mixer_kwargs.get(name, {})),
                FFNS[config.ffn_name(i)](config, **config.ffn["kwargs"].get(config.ffn_name(i), {})),
                config.hidden_size, config.norm_eps,
            )
            for i, name in enumerate(config.mixers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[FastWeightCache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> Union[BaseModelOutputWithPast, tuple]:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("IPLModel: pass exactly one of input_ids [B, T] and inputs_embeds [B, T, hidden]")
        if cache is not None and not isinstance(cache, FastWeightCache):
            raise TypeError(f"IPLModel: cache: expected a FastWeightCache (or None), got {type(cache).__name__}")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # the blocks would drop it anyway: the backward recomputes them
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if use_cache and cache is None:
            cache = FastWeightCache()
        kwargs.pop("position_ids", None)  # generate() passes them; positions come from the mask and the cache

        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, hidden]
        all_hidden = []
        for block in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states, cache = block(hidden_states, attention_mask=attention_mask, cache=cache,
                                         use_cache=use_cache, **kwargs)
        hidden_states = self.norm(hidden_states)
        all_hidden = tuple(all_hidden) + (hidden_states,) if output_hidden_states else None
        cache = cache if use_cache else None  # a cache passed with use_cache=False is read, not updated nor returned
        if not return_dict:
            return tuple(x for x in (hidden_states, cache, all_hidden) if x is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache, hidden_states=all_hidden)


class IPLForCausalLM(IPLPreTrainedModel, GenerationMixin):
    """`IPLModel` with a language-model head (tied to the embeddings with `tie_word_embeddings`)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: IPLConfig):
        super().__init__(config)
        self.model = IPLModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear):
        self.lm_head = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[FastWeightCache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> Union[CausalLMOutputWithPast, tuple]:
        """`labels` [B, T]: next-token cross-entropy (labels shifted inside; -100 ignored). `logits_to_keep`: the
        last positions to compute logits for (0: all), as `generate()` asks for 1 after the prefill."""
        if labels is not None and logits_to_keep:
            raise ValueError("IPLForCausalLM: labels need the logits of every position: pass logits_to_keep=0")
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache,
                             inputs_embeds=inputs_embeds, use_cache=use_cache,
                             output_hidden_states=output_hidden_states, return_dict=True, **kwargs)
        hidden_states = outputs.last_hidden_state
        logits = self.lm_head(hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states)  # [B, T', V]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if not return_dict:
            return tuple(x for x in (loss, logits, outputs.cache, outputs.hidden_states) if x is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache,
                                      hidden_states=outputs.hidden_states)
