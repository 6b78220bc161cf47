"""Routing statistics accumulated in the jitted forward pass, and the metrics of METRICS.md."""
