"""Writing a command's output directory: CSV tables, and all-or-nothing replacement of OUT."""

from __future__ import annotations

import contextlib
import csv
import shutil
import tempfile
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def write_csv(path: Path, rows: list[dict], columns: tuple[str, ...] | None = None) -> None:
    """rows as CSV with `columns`, or the union of their keys in first-seen order."""
    fields = list(columns) if columns is not None else list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


@contextlib.contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """Yields a temporary directory beside `out`; it replaces `out` when the block completes and is
    removed when it raises, so a failed run leaves nothing half-written in OUT."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def versions(*packages: str) -> dict[str, str]:
    """Versions of moejax, jax, flax, numpy and the named extra packages, for a run's settings."""
    found = {}
    for name in ("moejax", "jax", "jaxlib", "flax", "numpy", *packages):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found
