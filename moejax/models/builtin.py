"""The built-in demonstration model: a small random Qwen3-MoE over bytes, so `moejax analyze` runs anywhere.

Its weights are a fixed seeded initialisation, not a trained model: its routing differs by script
because the byte embeddings do, which is enough to exercise the whole analysis.
"""

from __future__ import annotations

import json
from pathlib import Path

from moejax.data.tokenize import ByteTokenizer, byte_level_tokenizer

NAME = "builtin-tiny-qwen3-moe"
# Its weights start random, so training it (`moejax train` with no --model) takes a larger step than the 1e-5
# suited to continuing a pre-trained model.
LEARNING_RATE = 1e-3


def builtin_config():
    """Its Qwen3MoeConfig."""
    from moejax.models.qwen3_moe import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=64, num_hidden_layers=8,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                          moe_intermediate_size=32, num_experts=32, num_experts_per_tok=4, norm_topk_prob=True)


def builtin_model():
    """The seeded demonstration model (the same weights on every machine)."""
    from flax import nnx

    from moejax.models.qwen3_moe import Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM(builtin_config(), rngs=nnx.Rngs(0))


def save_builtin_files(directory: Path) -> None:
    """What a checkpoint directory of the built-in model holds besides its weights: config.json (with its special
    token ids), generation_config.json and the byte-level tokenizer's files, chat template included; so a run
    trained from it, and its export, load like any checkpoint (`moejax generate`, `moejax eval`, `lm_eval`)."""
    tokenizer = byte_level_tokenizer()
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    (directory / "config.json").write_text(json.dumps(builtin_config().to_hf() | ids | {"dtype": "float32"},
                                                      indent=2))
    (directory / "generation_config.json").write_text(json.dumps(ids, indent=2))
    tokenizer.save_pretrained(directory)
