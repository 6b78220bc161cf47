"""Writing what a command outputs without losing anything it did not write: checks of OUT, temporary
directories replaced atomically into place, markers naming the writing command, and CSV tables."""

from __future__ import annotations

import contextlib
import csv
import ctypes
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from moejax.errors import OutputError


def write_csv(path: Path, rows: list[dict], columns: tuple[str, ...] | None = None) -> None:
    """rows as CSV with `columns`, or the union of their keys in first-seen order."""
    fields = list(columns) if columns is not None else list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


MARKER = ".moejax-output.json"  # in every output directory: which command wrote it
PARTIAL = ".moejax-partial.json"  # in a temporary directory while it is being written: which process writes it


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def refuse_unsafe(out: str | Path, inputs=(), flag: str = "--out") -> Path:
    """OUT, resolved (symlinks, "..", a trailing slash), unless it is or contains the root, the home or the working
    directory, or is, contains or lies inside one of `inputs` (a model, a corpus, a checkpoint): then an OutputError
    saying what and what to do."""
    resolved = _resolved(out)
    places = [(Path.cwd().resolve(), "the working directory"), (Path.home().resolve(), "your home directory"),
              (Path("/"), "the root directory")]
    for place, what in places:
        if place == resolved:
            raise OutputError(f"{flag} {out} is {what}; moejax writes a directory of its own and will not replace it "
                              f"there: give a new path, e.g. {Path(out) / 'moejax-output'}")
    for place, what in places:
        if place.is_relative_to(resolved):
            raise OutputError(f"{flag} {out} contains {what} ({place}); moejax would replace it with what it writes: "
                              "give a new path instead")
    for given in inputs:
        if given is None:
            continue
        source = _resolved(given)
        if resolved == source:
            raise OutputError(f"{flag} {out} is the input {given}; give another path for what moejax writes")
        if source.is_relative_to(resolved):
            raise OutputError(f"{flag} {out} contains the input {given}; give a path outside it")
        if resolved.is_relative_to(source):
            raise OutputError(f"{flag} {out} lies inside the input {given}; give a path outside it")
    return resolved


def _manifest(directory: Path) -> dict[str, list[int]]:
    """{relative path: [size, mtime_ns]} of every file below `directory` (its own marker apart; the markers of outputs
    it holds, such as a study's command outputs, are files it wrote)."""
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.is_symlink() and path != directory / MARKER:
            stat = path.stat()
            files[path.relative_to(directory).as_posix()] = [stat.st_size, stat.st_mtime_ns]
    return files


def _foreign(out: Path, written: dict) -> str | None:
    """The first entry of OUT that its command did not write, or that changed since (a file not in its manifest, or
    of another size or time; a directory holding none of its files; a link), described; None when there is none."""
    kept_dirs = {parent.as_posix() for name in written for parent in Path(name).parents if parent != Path(".")}
    for path in sorted(out.rglob("*")):
        name = path.relative_to(out).as_posix()
        if name == MARKER:
            continue
        if path.is_symlink():
            return f"{name} (a link moejax did not make)"
        if path.is_dir():
            if name not in kept_dirs:
                return f"{name}/ (a directory moejax did not write)"
            continue
        if name not in written:
            return f"{name} (not among the files moejax wrote)"
        stat = path.stat()
        if [stat.st_size, stat.st_mtime_ns] != written[name]:
            return f"{name} (changed since moejax wrote it)"
    return None


def _replaceable(resolved: Path, out, command: str, flag: str) -> None:
    """OUT holds an output of `command`, every file of it as written: an OutputError naming the first other thing
    otherwise. A marker proves that moejax created the directory, not that all inside is still its own."""
    try:
        marker = json.loads((resolved / MARKER).read_text())
        writer, written = marker.get("command"), marker.get("files")
    except (OSError, ValueError, AttributeError):
        writer, written = None, None
    if writer != command:
        raise OutputError(f"{flag} {out} holds the output of `moejax {writer}`, not of `moejax {command}`; give "
                          "another path (moejax replaces only what the same command wrote)")
    if not isinstance(written, dict):
        raise OutputError(f"{flag} {out} was written by an older moejax that did not list its files, so what is "
                          "inside cannot be told from what you added; give another path, or remove it yourself")
    foreign = _foreign(resolved, written)
    if foreign is not None:
        raise OutputError(f"{flag} {out} holds {foreign}; moejax replaces only what it wrote itself: move that "
                          "away, or give another path")


def check_output(out: str | Path, command: str, inputs=(), flag: str = "--out") -> Path:
    """Whether `moejax COMMAND` may write (or replace) OUT; raises OutputError naming what is there otherwise.

    OUT may be absent, an empty directory, or a directory this same command wrote earlier (its marker says so) that
    holds nothing else than what it wrote, unchanged (the marker's list of files). It may not be a file, another
    command's output, a directory of anything else, or an unsafe place (refuse_unsafe). Unfinished temporaries that a
    killed run of any command left beside OUT are removed first."""
    resolved = refuse_unsafe(out, inputs, flag)
    remove_stale_temporaries(resolved)
    if not resolved.exists():
        return resolved
    if not resolved.is_dir():
        raise OutputError(f"{flag} {out} is a file; moejax writes a directory there: give another path or move the "
                          "file away yourself")
    if (resolved / MARKER).is_file():
        _replaceable(resolved, out, command, flag)
        return resolved
    entries = sorted(p.name for p in resolved.iterdir())
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise OutputError(f"{flag} {out} is a directory moejax did not write ({len(entries)} entries: {shown}); give "
                          "a new path, or empty or remove it yourself if it can go")
    return resolved


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Removes the temporary directories beside OUT that a killed moejax process left: named for OUT, the command
    and the writing process (which is gone), holding an unfinished output or the old output it replaced."""
    removed = []
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.moejax-[a-z]+-(\d+)-")
    for tmp in out.parent.iterdir() if out.parent.is_dir() else ():
        found = pattern.match(tmp.name)
        if not found or not tmp.is_dir() or not ((tmp / PARTIAL).is_file() or (tmp / MARKER).is_file()):
            continue
        pid = int(found.group(1))
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    if removed:
        print(f"moejax: removed {len(removed)} unfinished output(s) a killed run left beside {out}: "
              + ", ".join(p.name for p in removed), file=sys.stderr)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def new_directory(out: Path, command: str) -> Iterator[Path]:
    """Yields a temporary directory beside OUT (absent or an empty directory) that becomes OUT when the block
    completes, so that OUT never holds part of what the block writes: the block raising, SIGINT or SIGTERM leave OUT
    as it was and remove the temporary; one left by SIGKILL is removed by the next run beside OUT. For a directory
    that later work fills in place (a training run's): only its start is written whole. A symbolic link at OUT is
    followed: the directory it names is the one replaced."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.moejax-{command}-{os.getpid()}-", dir=out.parent))
    try:
        with _terminate_as_exit():
            (tmp / PARTIAL).write_text(json.dumps({"pid": os.getpid(), "command": command}))
            yield tmp
            _normal_permissions(tmp)
            try:
                os.replace(tmp, out)  # replaces an empty OUT; one the user has filled meanwhile stays as it is
            except OSError:
                raise OutputError(f"{out} is no longer empty (something was put there while {command} started); "
                                  "move that away, or give another path") from None
            (out / PARTIAL).unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def output_directory(out: str | Path, command: str, inputs=(), flag: str = "--out") -> Iterator[Path]:
    """Yields a temporary directory beside OUT (check_output decides whether OUT may be written, before and again
    just before it is replaced) that replaces OUT when the block completes: OUT holds its old complete contents or
    the new ones at every instant (the two are exchanged in one rename), and gets a marker naming `command` and
    listing the files written (with their sizes and times: what a later run may replace). The temporary directory
    is removed when the block raises or the process gets SIGINT or SIGTERM; one left by SIGKILL is removed by the
    next run beside OUT."""
    out = check_output(out, command, inputs, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.moejax-{command}-{os.getpid()}-", dir=out.parent))
    try:
        with _terminate_as_exit():
            (tmp / PARTIAL).write_text(json.dumps({"pid": os.getpid(), "command": command}))
            yield tmp
            (tmp / PARTIAL).unlink()
            (tmp / MARKER).write_text(json.dumps({"command": command, "moejax": _version("moejax"),
                                                  "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                  "files": _manifest(tmp)}, indent=2))
            _normal_permissions(tmp)
            if out.exists():  # again: the user may have put something there while the command ran
                check_output(out, command, inputs, flag)
            _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _terminate_as_exit():
    """SIGTERM raises SystemExit (exit status 143) in the main thread, so cleanup runs as for SIGINT."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _normal_permissions(tmp: Path) -> None:
    """The temporary directory was created private (0700); the output gets the user's usual permissions."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)


def _move_into_place(tmp: Path, out: Path) -> None:
    """tmp becomes OUT; an existing OUT is exchanged with tmp in one rename (Linux renameat2), then removed."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp)  # the old contents, now at tmp's path; OUT is already complete
        return
    aside = tmp.with_name(tmp.name + "old")
    os.rename(out, aside)  # without renameat2, OUT is absent between these two renames
    os.rename(tmp, out)
    shutil.rmtree(aside)


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths atomically (renameat2 with RENAME_EXCHANGE); False where the system cannot."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


STUDY_MARKER = ".moejax-study.json"  # what marks a resumable study's directory (resumable_directory)


def resumable_directory(out: str | Path, command: str, inputs=(), flag: str = "--out") -> Path:
    """OUT for work that resumes (a study of several training runs): absent or empty, it is created and marked as
    `command`'s; marked by `command` before, it is kept as it is, to be continued; anything else (a file, another
    command's output, a directory of the user's) is refused, naming what is there. What the command writes inside
    is its own: the runs it started (each resumes by its own rules) and the tables it writes again at the end."""
    resolved = refuse_unsafe(out, inputs, flag)
    marker = resolved / STUDY_MARKER
    if resolved.exists():
        if not resolved.is_dir():
            raise OutputError(f"{flag} {out} is a file; moejax writes a directory there: give another path")
        if marker.is_file():
            try:
                owner = json.loads(marker.read_text()).get("command")
            except (json.JSONDecodeError, OSError, AttributeError):
                owner = None
            if owner != command:
                raise OutputError(f"{flag} {out} holds the output of {owner or 'something else'}, not of {command}; "
                                  "give another path")
            return resolved
        first = next(iter(sorted(resolved.iterdir())), None)
        if first is not None:
            raise OutputError(f"{flag} {out} holds {first.name}, which {command} did not write; moejax replaces "
                              "only what it wrote itself: move that away, or give another path")
    resolved.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"command": command, "moejax": _version("moejax"),
                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2))
    return resolved


def write_file(path: str | Path, text: str, command: str, flag: str) -> Path:
    """Writes a one-file output (e.g. `moejax plan --json`) atomically; an existing file is replaced only when
    moejax wrote it (its JSON names the writing command)."""
    path = refuse_unsafe(path, (), flag)
    if path.exists():
        try:
            writer = json.loads(path.read_text()).get("written_by")
        except (OSError, ValueError, AttributeError):
            writer = None
        if writer != f"moejax {command}":
            raise OutputError(f"{flag} {path} exists and was not written by `moejax {command}`; give another path")
    tmp = path.with_name(f".{path.name}.moejax-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def versions(*packages: str) -> dict[str, str]:
    """Versions of moejax, jax, flax, numpy and the named extra packages, for a run's settings."""
    return {name: _version(name) for name in ("moejax", "jax", "jaxlib", "flax", "numpy", *packages)}
