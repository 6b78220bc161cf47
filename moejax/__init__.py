"""moejax: Mixture-of-Experts models in JAX/Flax NNX for routing research, checked against transformers.

The public names load on first use, so `import moejax` stays cheap and importing any one module of the
package never pulls in the rest (the package's imports run one way: see tests/unit/test_layering.py).
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "from_pretrained": "moejax.loading", "load_config": "moejax.loading", "export_pretrained": "moejax.export",
    "CausalLMOutput": "moejax.models.common", "ForcedRouting": "moejax.models.common",
    "Steering": "moejax.models.steering",
    "Qwen3MoeForCausalLM": "moejax.models.qwen3_moe", "NemotronHForCausalLM": "moejax.models.nemotron_h",
    "Qwen3MoeConfig": "moejax.models.qwen3_moe", "NemotronHConfig": "moejax.models.nemotron_h",
    "RopeConfig": "moejax.config",
    "MoejaxError": "moejax.errors", "ConfigError": "moejax.errors",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'moejax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
