"""moejax: Mixture-of-Experts models in JAX/Flax NNX for routing research, checked against transformers."""

__version__ = "0.1.0"

from moejax.config import ConfigError, NemotronHConfig, Qwen3MoeConfig, RopeConfig
from moejax.export import export_pretrained
from moejax.loading import from_pretrained, load_config
from moejax.models.common import CausalLMOutput
from moejax.models.nemotron_h import NemotronHForCausalLM
from moejax.models.qwen3_moe import Qwen3MoeForCausalLM

__all__ = [
    "CausalLMOutput", "ConfigError", "NemotronHConfig", "NemotronHForCausalLM", "Qwen3MoeConfig",
    "Qwen3MoeForCausalLM", "RopeConfig",
    "export_pretrained", "from_pretrained", "load_config",
]
