"""Downstream evaluation: moejax models behind lm-evaluation-harness, and the bundled offline tasks."""

from pathlib import Path

# The bundled offline tasks (moejax_demo: multiple choice and short generation in en/he/ja), declared to lm-eval in
# the `lm_eval.tasks` entry-point group (moejax.evaluation.lm_eval_plugins).
TASKS = Path(__file__).parent / "tasks"
