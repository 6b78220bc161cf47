"""This folder's REMOTE_MODULES (test_sharded.py, ...) run on 8 simulated CPU devices, each test reported on its own.

XLA reads the device count when jax starts, and the test session started it with one device. So, in a session with
fewer than 8 devices, each collected test of test_sharded.py is replaced by a stand-in; as soon as collection is
done, the selected ones start, once, in one worker process (pytest, with
XLA_FLAGS=--xla_force_host_platform_device_count=8) that runs beside the rest of the session, and each stand-in
reports its own test's outcome and failure text from the worker's JUnit report. Inside the worker the tests run as
themselves.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import jax
import pytest

DEVICES = 8
REMOTE_MODULES = ("test_sharded.py", "test_scaleout.py", "test_vocab_split.py")
_RESULTS: dict = {}
_WORKER: dict = {}


def pytest_collection_modifyitems(session, config, items):
    if jax.device_count() >= DEVICES:
        return
    for i, item in enumerate(items):
        if isinstance(item, pytest.Function) and item.path.name in REMOTE_MODULES:
            stand_in = InWorker.from_parent(item.parent, name=item.name)
            stand_in.own_markers = list(item.own_markers)
            stand_in.keywords.update(item.keywords)
            stand_in.add_marker(pytest.mark.xdist_group("eight_devices"))
            items[i] = stand_in


def pytest_collection_finish(session):
    """Start the worker at once, so it runs beside the rest of the session. Under pytest-xdist (`-n 2`) every xdist
    worker collects the whole suite: there the stand-ins are one xdist group (`--dist loadgroup`, one xdist worker
    runs them all) and that worker starts the 8-device worker when it reaches the first of them."""
    selected = [item for item in session.items if isinstance(item, InWorker)]
    if selected and not hasattr(session.config, "workerinput"):
        _start_worker(selected)


def pytest_sessionfinish(session):
    """A worker still running (its stand-ins never ran: -x, a keyboard interrupt) is stopped; its files go."""
    if "process" in _WORKER and _WORKER["process"].poll() is None:
        _WORKER["process"].kill()
        _WORKER["process"].wait()
    if "report" in _WORKER:
        _WORKER["log"].close()
        shutil.rmtree(_WORKER["report"].parent, ignore_errors=True)


class WorkerFailure(Exception):
    pass


class InWorker(pytest.Item):
    """A test of test_sharded.py, run in the 8-device worker."""

    def runtest(self):
        if "process" not in _WORKER:
            _start_worker([item for item in self.session.items if isinstance(item, InWorker)])
        if not _RESULTS:
            _finish_worker()
        outcome = _RESULTS.get(self.nodeid)
        if outcome is None:
            raise WorkerFailure(f"the 8-device worker reported nothing for this test:\n{_RESULTS.get('log', '')}")
        kind, text = outcome
        if kind == "skipped":
            pytest.skip(text)
        if kind != "passed":
            raise WorkerFailure(text)

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, WorkerFailure):
            return f"(in the 8-device worker)\n{excinfo.value}"
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, self.name


def _start_worker(items: list[InWorker]) -> None:
    root = Path(items[0].config.rootpath)
    report = Path(tempfile.mkdtemp(prefix="moejax-8-devices-")) / "junit.xml"
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
               f"--xla_force_host_platform_device_count={DEVICES}")
    log = open(report.with_name("log.txt"), "w+")  # noqa: SIM115 (read back when the worker is done)
    process = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                                f"--junitxml={report}", *(item.nodeid for item in items)], cwd=root, env=env,
                               stdout=log, stderr=subprocess.STDOUT, text=True)
    _WORKER.update(process=process, report=report, log=log)


def _finish_worker() -> None:
    _WORKER["process"].wait()
    log, report = _WORKER["log"], _WORKER["report"]
    log.seek(0)
    _RESULTS["log"] = log.read()[-6000:]
    if not report.is_file():
        return
    for case in ET.parse(report).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/") + ".py"
        nodeid = f"{module}::{case.get('name')}"
        kind, text = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                kind, text = "failed", (child.get("message") or "") + "\n" + (child.text or "")
            elif child.tag == "skipped":
                kind, text = "skipped", child.get("message") or ""
        _RESULTS[nodeid] = (kind, text)
