"""`moejax eval`: downstream scores of a checkpoint through lm-evaluation-harness, offline, with moejax underneath.

lm-eval (the `eval` extra) is imported only when the command runs. Nothing reaches the network: the Hugging Face
hub and datasets libraries are switched to offline mode before they load, so a task whose data is not on disk fails
at once with a line saying so.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

from moejax.commands.options import MESH_HELP, STEERING_HELP, check_options, option
from moejax.data.tokenize import transformers_tokenizer
from moejax.errors import DataError, SettingsError
from moejax.evaluation import TASKS
from moejax.evaluation.offline import DATA_DIR_HELP, task_folder
from moejax.evaluation.task_index import cache_task_index
from moejax.io import output_directory, write_csv
from moejax.models.builtin import NAME as BUILTIN

LANGUAGE_SUFFIX = re.compile(r"[_-]([a-z]{2,3})$")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    model: Path | None = option(None, "Hugging Face checkpoint directory (or an Orbax one from `moejax convert`) "
                                "with its tokenizer files; default: the built-in demonstration model", kind=Path,
                                metavar="DIR")
    tasks: tuple[str, ...] = option(("moejax_demo",), "lm-eval task, group or tag names, comma-separated; the "
                                    "default runs the bundled offline suite (multiple choice and short generation in "
                                    "en/he/ja)", kind=list, metavar="T1,T2")
    include_path: tuple[Path, ...] = option((), "a folder of your own lm-eval task YAML files (repeatable); the "
                                            "bundled tasks are always included", kind=Path, repeat=True, metavar="DIR")
    data_dir: Path | None = option(None, DATA_DIR_HELP, kind=Path, metavar="DIR")
    num_fewshot: int | None = option(None, "few-shot examples per prompt (default: each task's own)", kind=int,
                                     minimum=0)
    limit: int | None = option(None, "score only the first N documents of each task", kind=int, minimum=1,
                               metavar="N")
    batch_size: int = option(8, "packed rows (loglikelihood) or prompts (generation) per forward pass", kind=int,
                             minimum=1)
    chat: bool = option(False, "apply the model's chat template to each prompt (lm-eval's --apply_chat_template)",
                        kind=bool)
    dtype: str = option("float32", "parameter dtype (auto: the checkpoint's)", choices=("float32", "bfloat16", "auto"))
    mesh: str | None = option(None, MESH_HELP, metavar="AXIS=N,...")
    steering: Path | None = option(None, STEERING_HELP, kind=Path, metavar="FILE")
    model_args: str | None = option(None, "further arguments of the lm-eval model, KEY=VALUE,... (e.g. "
                                    "max_length=4096, or a moejax config override such as dt_floor=time_step_min)",
                                    metavar="K=V,...")
    seed: int = option(0, "seed of lm-eval's few-shot sampling and of sampled generation", kind=int, minimum=0)
    out: Path = option(Path("moejax-eval"), "output directory (replaced only when the run succeeds)", kind=Path)
    allow_nonfinite: bool = option(False, "load a checkpoint holding NaN or infinite weights instead of refusing it",
                                   kind=bool)

    def __post_init__(self):
        check_options(self)
        if not self.tasks:
            raise SettingsError("--tasks names no task")
        extra_args(self.model_args)


def extra_args(text: str | None) -> dict[str, str]:
    """KEY=VALUE,... -> {KEY: VALUE}."""
    pairs = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"--model-args: expected KEY=VALUE pairs separated by commas, got {part!r}")
        pairs[key.strip()] = value.strip()
    return pairs


def _offline() -> None:
    """No network for the hub and datasets libraries, and no per-split progress bars from datasets. They read the
    variables when they are imported; where this process imported them already (`evaluate` called from Python, after
    transformers), their offline switches are set too: otherwise a task whose data is not here waits ~20 s on the
    hub's retries before it is named."""
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        os.environ[name] = "1"
    switches = {"huggingface_hub.constants": ("HF_HUB_OFFLINE",),
                "datasets.config": ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    for module, names in switches.items():
        if module in sys.modules:
            for name in names:
                setattr(sys.modules[module], name, True)


def loadable_tasks(settings: EvalSettings, offline: Path | None = None):
    """lm-eval's TaskManager for `settings` (lm-eval's tasks, the bundled ones, --include-path's and `offline`,
    --data-dir's task folder), with each of settings.tasks in it and its documents loaded once: a task that is not
    there or needs the network is named (DataError) before any model work. The hub and datasets libraries are turned
    offline first."""
    _offline()
    manager = _task_manager(settings, offline)
    _check_loadable(settings, manager)
    return manager


def _task_manager(settings: EvalSettings, offline: Path | None = None):
    """lm-eval's tasks, the bundled ones, those under --include-path and `offline` (--data-dir's tasks)."""
    from lm_eval.tasks import TaskManager

    cache_task_index()
    for folder in settings.include_path:
        if not folder.is_dir():
            raise DataError(f"--include-path {folder}: no such folder")
    folders = [TASKS, *settings.include_path, *([offline] if offline else [])]
    manager = TaskManager(include_path=list(map(str, folders)))
    known = set(manager.all_tasks)
    for name in settings.tasks:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise DataError(f"--tasks: unknown task {name!r}{hint} (lm-eval's tasks, the bundled moejax_* ones, "
                            "those under --include-path and those of --data-dir's benchmarks)")
    return manager


def _check_loadable(settings: EvalSettings, manager) -> None:
    """Loads each task's documents once, so that one needing the network is named before any model work."""
    for name in settings.tasks:
        try:
            manager.load([name])
        except Exception as e:  # datasets raises many kinds (ConnectionError, OfflineModeIsEnabled, FileNotFound...)
            text = f"{type(e).__name__}: {e}".splitlines()[0]
            if "offline" in text.lower() or "connect" in text.lower() or "hub" in text.lower():
                raise DataError(f"--tasks {name}: its data is not on this machine and moejax eval runs offline "
                                f"({text[:200]}); point the task at local files (dataset_path: json, dataset_kwargs: "
                                "{data_files: ...}) and pass its folder with --include-path") from None
            raise DataError(f"--tasks {name}: cannot be loaded ({text[:300]})") from None


def language_of(task: str, config: dict) -> str:
    metadata = config.get("metadata") or {}
    for key in ("language", "lang"):
        if isinstance(metadata.get(key), str):
            return metadata[key]
    found = LANGUAGE_SUFFIX.search(task)
    return found.group(1) if found else ""


def chance_level(samples: list[dict]) -> float | None:
    """A multiple-choice task's accuracy by chance: the mean over its documents of 1 / their number of choices (one
    loglikelihood request each); None for other tasks."""
    counts = [len(s["arguments"]) for s in samples if isinstance(s.get("arguments"), list | tuple | dict)]
    if not counts or min(counts) < 2:
        return None
    return float(np.mean([1 / n for n in counts]))


def score_rows(results: dict, samples: dict | None = None) -> list[dict]:
    """One row per task, metric and filter: the task, its language and family (the name without the language), and
    for an accuracy of a multiple-choice task its chance level (from `samples`, lm-eval's logged samples)."""
    rows = []
    for task, metrics in results["results"].items():
        config = results.get("configs", {}).get(task, {})
        multiple_choice = config.get("output_type") == "multiple_choice"
        chance = chance_level((samples or {}).get(task, [])) if multiple_choice else None
        language = language_of(task, config)
        family = task[:-len(language) - 1] if language and task.endswith(language) else task
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if "_stderr" in metric or not isinstance(value, int | float) or metric in ("sample_len",):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            rows.append({"task": task, "language": language, "family": family, "metric": metric,
                         "filter": filter_name, "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, int | float) else "",
                         "samples": results.get("n-samples", {}).get(task, {}).get("effective", ""),
                         "chance": chance if chance is not None and metric.startswith("acc") else ""})
    return rows


def evaluate(settings: EvalSettings) -> tuple[Path, dict]:
    """Writes OUT: lm-eval's results and samples (as `lm_eval --output_path` writes them), scores.csv (one row per
    task, language and metric) and scores.png; returns (OUT, lm-eval's results)."""
    inputs = [p for p in (settings.model, settings.steering, *settings.include_path, settings.data_dir)
              if p is not None]
    with output_directory(settings.out, "eval", inputs) as tmp:
        _offline()
        try:
            import lm_eval
            from lm_eval.loggers import EvaluationTracker
        except ImportError:
            raise SettingsError("moejax eval needs lm-evaluation-harness: pip install -e '.[eval]'") from None
        from moejax.loading import load_config
        from moejax.opening import model_files
        from moejax.report.figures import scores_figure

        if settings.model is not None:  # the checkpoint's own files first: a wrong directory fails at once
            files = model_files(settings.model)
            load_config(files)
            tokenizer = transformers_tokenizer(files)
            if settings.chat and not getattr(tokenizer, "chat_template", None):
                raise DataError(f"--chat: the tokenizer of {settings.model} has no chat template (chat_template in "
                                "tokenizer_config.json or chat_template.jinja)")
        # --data-dir's benchmarks: task YAML over the user's files, written with the run's output (never into DIR).
        offline = task_folder(settings.data_dir, tmp / "tasks", list(settings.tasks)) if settings.data_dir else None
        manager = loadable_tasks(settings, offline)
        # By name, as `lm_eval --model moejax --model_args ...` runs it (the results are named after the model).
        model_args = {"pretrained": str(settings.model) if settings.model else BUILTIN, "dtype": settings.dtype,
                      "allow_nonfinite": settings.allow_nonfinite, **extra_args(settings.model_args)}
        if settings.mesh:
            model_args["mesh"] = settings.mesh
        if settings.steering:
            model_args["steering"] = str(settings.steering)
        tracker = EvaluationTracker(output_path=str(tmp))
        results = lm_eval.simple_evaluate(
            model="moejax", model_args=model_args, batch_size=settings.batch_size, tasks=list(settings.tasks),
            num_fewshot=settings.num_fewshot, limit=settings.limit,
            task_manager=manager, log_samples=True, evaluation_tracker=tracker, apply_chat_template=settings.chat,
            random_seed=settings.seed, numpy_random_seed=settings.seed, fewshot_random_seed=settings.seed)
        samples = results.pop("samples")
        tracker.save_results_aggregated(results=results, samples=samples)
        for task in results["configs"]:
            tracker.save_results_samples(task_name=task, samples=samples[task])
        rows = score_rows(results, samples)
        write_csv(tmp / "scores.csv", rows, ("task", "language", "family", "metric", "filter", "value", "stderr",
                                            "samples", "chance"))
        if rows:
            scores_figure(tmp / "scores.png", rows, f"{settings.model or BUILTIN}")
        (tmp / "settings.json").write_text(json.dumps(
            {k: [str(x) for x in v] if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v
             for k, v in dataclasses.asdict(settings).items()}, indent=2))
    return settings.out, results
