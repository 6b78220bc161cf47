"""Downstream evaluation: moejax models behind lm-evaluation-harness, and the bundled offline tasks."""
