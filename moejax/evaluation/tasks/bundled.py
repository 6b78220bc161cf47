"""Loads the bundled tasks' JSONL files (next to this file, read from disk: nothing reaches the network). lm-eval
calls `load` through each task's `custom_dataset: !function bundled.load`, with the task's dataset_kwargs."""

import json
from pathlib import Path

import datasets


def load(file: str, **_metadata) -> datasets.DatasetDict:
    lines = (Path(__file__).parent / file).read_text(encoding="utf-8").splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in lines if line])})
