"""The bounds `moejax parity` checks, with their defaults per verdict: data the command line reads (--tol,
--list-tolerances) without loading anything heavy. moejax.parity.verdict applies them."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Tolerances:
    """The bounds `moejax parity` checks; None = reported, not checked. KL in nats, agreements as fractions of
    content tokens. docs/parity.md gives the measurements behind each default."""

    # The implementation check (float32, both verdicts).
    impl_embedding_relative: float | None = None  # ||e - e_ref|| / ||e_ref|| of the embeddings, at most
    impl_block_relative: float | None = None  # per block, ||error|| / ||update||, at most
    impl_block_token_max: float | None = None  # per block, the worst token's ||error|| over the update's RMS, at most
    impl_router_relative: float | None = None  # per MoE layer, ||z - z_ref|| / ||z_ref||, at most
    impl_logits_relative: float | None = None  # the head: max |dz| / max |z| over every token and entry, at most
    # Routing flips (the implementation check; and end to end in float32).
    other_flips: float | None = None  # per MoE layer, routing flips that are not proven near ties, at most
    tie_rate: float | None = None  # per MoE layer, near ties (beyond exact ones) per token, at most
    router_logit_max_abs: float | None = None  # per MoE layer, the largest |router logit difference|, at most
    # End to end, float32.
    kl_mean: float | None = None  # mean over tokens of KL(reference || moejax), at most
    kl_p99: float | None = None  # the 99th percentile of the per-token KL, at most
    kl_max: float | None = None  # the largest per-token KL, at most
    top1_agreement: float | None = None  # tokens whose argmax token is the same, at least
    expert_set_agreement: float | None = None  # per MoE layer, tokens with identical expert sets, at least
    router_logit_relative: float | None = None  # per MoE layer, ||z_moejax - z_ref|| / ||z_ref||, at most
    hidden_relative: float | None = None  # per block, ||h_moejax - h_ref|| / ||h_ref|| over content tokens, at most
    logits_relative: float | None = None  # max |z_moejax - z_ref| / max |z_ref| of the output logits, at most
    # End to end, 16-bit: moejax's per-token error statistic over transformers' own, at most (KL: the square).
    calibration_mean: float | None = None
    calibration_median: float | None = None
    calibration_p99: float | None = None
    calibration_max: float | None = None

    @property
    def tie_logit_limit(self) -> float:
        """A routing flip at a token whose router logits differ by more than this is never a tie."""
        return math.inf if self.router_logit_max_abs is None else self.router_logit_max_abs


# The implementation check. Each block alone on the reference's float32 input, both sides in float32 on the same
# weights: what is left is summation order. Measured (docs/parity.md): update errors ~3.5e-7 relative on the tiny
# test models and ~1e-6 at the 30B models' widths (random weights: hidden 2048-2688, 128 experts, 512 tokens), the
# worst token ~3e-6 of the update's RMS, the head's logits ~1e-7; embeddings are the same numbers on both sides.
# The bounds leave ~10x (30x for one token) at the 30B widths, and an error of 5e-5 relative in one block's update
# (a q/k-norm epsilon x100, RoPE theta x1.0002) is 5 times the bound.
IMPLEMENTATION = dict(impl_embedding_relative=1e-6, impl_block_relative=1e-5, impl_block_token_max=1e-4,
                      impl_router_relative=1e-5, impl_logits_relative=1e-5, other_flips=0, tie_rate=1e-3,
                      router_logit_max_abs=1e-3)

# float32 end to end: observed KL ~1e-11, router logits ~1e-6, hidden states ~1e-7 relative on the tiny and bench
# models; the bounds leave two to three orders of magnitude for a 48-layer model. Near ties: one in ~40,000
# token-layers was measured on the bench models; 1e-3 per layer is 40 times that (a single tie in a short run is
# never a rate).
#
# Calibrated: moejax and transformers round to 16 bits at different places, so moejax's error against the float32
# truth is of the order of transformers' own, not equal to it; the statistics are taken over the tokens neither side
# routed differently from the truth (a 16-bit flip moves its tokens a lot, and which tokens flip is chance; flips are
# counted apart). Measured over honest checkpoints of both architectures (benchmarks/parity_floor.py, docs/parity.md),
# the worst ratio moejax / transformers of each statistic, at 384 tokens (30 seeds) | 768 (10) | 4096 (5): mean 1.24
# (KL, whose mean follows its tail: 1.98 as the square root of its ratio) | 1.43 | 1.11; median 1.17 | 1.06 | 0.94;
# p99 3.74 | 1.81 | 1.73; max 10.0 | 4.24 | 3.40 (short runs have few tokens in their tails). The multiples leave
# ~1.3-1.7x over the worst short run; KL is judged by their squares. These judge the rounding only: the float32
# implementation check judges the implementation, far more tightly.
TOLERANCES = {
    "float32": Tolerances(**IMPLEMENTATION, kl_mean=1e-6, kl_p99=1e-5, kl_max=1e-4, top1_agreement=0.999,
                          router_logit_relative=1e-4, hidden_relative=1e-4, logits_relative=1e-4),
    "calibrated": Tolerances(**IMPLEMENTATION, calibration_mean=2.5, calibration_median=2.0, calibration_p99=6.0,
                             calibration_max=16.0),
}
# The unit roundoff of each 16-bit dtype: the floor of the reference's own error in the calibrated bounds (a block
# or token where transformers' 16-bit run happens to round to nothing is not a zero yardstick).
UNIT_ROUNDOFF = {"bfloat16": 2.0 ** -9, "float16": 2.0 ** -11}


def tolerances_for(mode: str, overrides: dict[str, float] | None = None) -> Tolerances:
    """The default bounds of a verdict mode ("float32" or "calibrated"), with `overrides` (field -> value)."""
    return dataclasses.replace(TOLERANCES[mode], **(overrides or {}))
