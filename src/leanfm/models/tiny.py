"""Tiny random models of every supported decoder architecture, for fast structural tests.

Seeded and built from transformers configs, so the same name always yields the same weights. They share
SmolLM2's tokenizer (vocabulary 49152) so they run on the real corpora; their perplexity is near the
vocabulary size, which is the point: they test shapes and plumbing, not language modelling.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPTNeoXConfig,
    LlamaConfig,
    OPTConfig,
    PhiConfig,
    PretrainedConfig,
    PreTrainedModel,
)

VOCAB = 49152
_COMMON: dict[str, Any] = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def tiny_configs() -> dict[str, PretrainedConfig]:
    """The configs of the tiny models; small but with every layout feature (GQA, partial rotary, fused qkv)."""
    return {
        "tiny-llama": LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, tie_word_embeddings=True, **_COMMON,
        ),
        "tiny-opt": OPTConfig(
            hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64,
            max_position_embeddings=2048, **_COMMON,
        ),
        "tiny-phi": PhiConfig(  # type: ignore[call-arg]  # partial_rotary_factor: a legacy kwarg, read from **kwargs
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            partial_rotary_factor=0.5, max_position_embeddings=2048, **_COMMON,
        ),
        "tiny-neox": GPTNeoXConfig(  # type: ignore[call-arg]  # rotary_pct: a legacy kwarg, read from **kwargs
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.5,
            max_position_embeddings=2048, tie_word_embeddings=False, **_COMMON,
        ),
        # Gemma-3's traits at toy size: 2 query heads per KV head, head_dim (32) != hidden / heads, q/k norms,
        # a window (8) shorter than the test sequences, sliding and global layers with different rotary bases,
        # and a query_pre_attn_scalar that is not head_dim (so a wrong attention scale shows)
        "tiny-gemma3": Gemma3TextConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24, sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
            max_position_embeddings=2048, tie_word_embeddings=True, **_COMMON,
        ),
    }


def build_tiny(name: str, seed: int = 0) -> PreTrainedModel:
    """Build tiny model ``name`` with weights drawn from a fixed seed (bitwise reproducible on CPU)."""
    config = tiny_configs()[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if config.model_type == "gemma3_text":  # its norms start at weight 0 (scale 1): make them matter
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name.endswith("norm.weight"):
                        param.normal_(0.0, 0.3)
    return model.eval()
