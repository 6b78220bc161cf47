"""moejax's fused clipped AdamW (moejax/training/adamw.py) against optax's own chain: clip_by_global_norm, then
adamw with a decay mask, frozen parameters through multi_transform + set_to_zero. Same parameters, same
gradients, several steps, with the clip both active and not; parameters and moments must agree to float32
rounding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax.training.adamw import clipped_adamw

SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10, 1e-3)
B1, B2, WD = 0.9, 0.95, 0.1


def _params():
    keys = jax.random.split(jax.random.key(0), 4)
    return {"w_df": jax.random.normal(keys[0], (6, 5)), "norm_d": jax.random.normal(keys[1], (6,)),
            "frozen_df": jax.random.normal(keys[2], (6, 5)),
            "experts": {"up_edf": jax.random.normal(keys[3], (2, 6, 5))}}


TRAIN = {"w_df": True, "norm_d": True, "frozen_df": False, "experts": {"up_edf": True}}
DECAY = {"w_df": True, "norm_d": False, "frozen_df": True, "experts": {"up_edf": True}}


def _optax_reference(clip_norm):
    labels = jax.tree.map(lambda t: "train" if t else "freeze", TRAIN)
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(SCHEDULE, B1, B2, weight_decay=WD, mask=DECAY))
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


@pytest.mark.parametrize("clip_norm", [1e3, 0.5], ids=["unclipped", "clipped"])
def test_matches_optax_chain(clip_norm):
    ours_tx, ref_tx = clipped_adamw(SCHEDULE, B1, B2, WD, clip_norm, TRAIN, DECAY), _optax_reference(clip_norm)
    ours_p = ref_p = _params()
    ours_s, ref_s = ours_tx.init(ours_p), ref_tx.init(ref_p)
    assert isinstance(ours_s.mu["frozen_df"], optax.MaskedNode)  # frozen parameters keep no moments
    for step in range(5):
        grads = jax.tree.map(lambda p, i=step: jnp.sin(p * (i + 1)) * 3.0, ours_p)
        ours_u, ours_s = jax.jit(ours_tx.update)(grads, ours_s, ours_p)
        ref_u, ref_s = jax.jit(ref_tx.update)(grads, ref_s, ref_p)
        ours_p, ref_p = optax.apply_updates(ours_p, ours_u), optax.apply_updates(ref_p, ref_u)
        for ours, ref in zip(jax.tree.leaves(ours_p), jax.tree.leaves(ref_p), strict=True):
            np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(ours_p["frozen_df"], _params()["frozen_df"])
    adam_ref = ref_s.inner_states["train"].inner_state[1][0]
    for ours, ref in ((ours_s.mu, adam_ref.mu), (ours_s.nu, adam_ref.nu)):
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    assert int(ours_s.count) == 5
