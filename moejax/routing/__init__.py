"""Routing statistics accumulated in the jitted forward pass, and the metrics of docs/metrics.md.

The settings the commands offer are defined here, where the command line reads them without loading JAX."""

PROBABILITIES = ("softmax", "native")  # the routing probabilities P_t the analysis uses (moejax.routing.stats)
PAIRS_PER_CHUNK = 64  # token pairs sampled per chunk for the routing consistency (moejax.routing.analysis)
