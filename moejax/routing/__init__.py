"""Routing statistics accumulated in the jitted forward pass, and the metrics of docs/metrics.md.

The settings the commands offer are defined here, where the command line reads them without loading JAX."""

# Which experts count as a token's choice: the model's own (its router: for Nemotron-H the correction bias and group
# limit decide), or "raw", the top-K of softmax(raw router logits) that paper A's forward hooks on the gate compute.
SELECTIONS = ("model", "raw")
PROBABILITIES = ("softmax", "native")  # the routing probabilities P_t the analysis uses (moejax.routing.stats)
# Routing consistency (moejax.routing.analysis): distinct token pairs sampled per chunk, without replacement (every
# pair when a chunk has fewer); paper B samples 500 pairs per sequence.
PAIRS_PER_CHUNK = 500
BOOTSTRAP_DRAWS = 1000  # resamples of the chunks for the collapse summary's confidence interval
