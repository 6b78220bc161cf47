"""Fixtures shared by the command tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Qwen3-MoE checkpoint with the byte-level tokenizer (a module's own `checkpoint` overrides it)."""
    from moejax.parity.fixtures import make_checkpoint

    path = tmp_path_factory.mktemp("checkpoint") / "model"
    make_checkpoint("qwen3_moe", path, seed=3, byte_tokenizer=True)
    return path
