"""This folder's REMOTE_MODULES (test_sharded.py, ...) run on 8 simulated CPU devices, each test reported on its own.

XLA reads the device count when jax starts, and the test session started it with one device. So, in a session with
fewer than 8 devices, each collected test of test_sharded.py is replaced by a stand-in; as soon as collection is
done, the selected ones start, once, in one worker process (pytest, with
XLA_FLAGS=--xla_force_host_platform_device_count=8) that runs beside the rest of the session, and each stand-in
reports its own test's outcome and failure text from the worker's JUnit report. Inside the worker the tests run as
themselves. Under pytest-xdist (`-n 2 --dist loadscope`) each module's stand-ins have a worker process of their own,
started by the xdist worker the module was sent to.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import jax
import pytest

from moejax.parallel.mesh import simulated_devices_env

DEVICES = 8
REMOTE_MODULES = ("test_sharded.py", "test_scaleout.py", "test_vocab_split.py")
_RESULTS: dict = {}  # nodeid -> (outcome, text), from the workers' JUnit reports
_WORKERS: dict = {}  # batch ("all", or one module's path under pytest-xdist) -> its process, report and log


def pytest_collection_modifyitems(session, config, items):
    if jax.device_count() >= DEVICES:
        return
    for i, item in enumerate(items):
        if isinstance(item, pytest.Function) and item.path.name in REMOTE_MODULES:
            stand_in = InWorker.from_parent(item.parent, name=item.name)
            stand_in.own_markers = list(item.own_markers)
            stand_in.keywords.update(item.keywords)
            items[i] = stand_in


def _under_xdist(config) -> bool:
    return hasattr(config, "workerinput")


def pytest_collection_finish(session):
    """Start the worker at once, so it runs beside the rest of the session. Under pytest-xdist every xdist worker
    collects the whole suite and runs only what it is sent (`--dist loadscope`: whole modules), so there each module's
    stand-ins start their own 8-device worker when the first of them runs."""
    selected = [item for item in session.items if isinstance(item, InWorker)]
    if selected and not _under_xdist(session.config):
        _start_worker("all", selected)


def pytest_sessionfinish(session):
    """A worker still running (its stand-ins never ran: -x, a keyboard interrupt) is stopped; its files go."""
    for worker in _WORKERS.values():
        if worker["process"].poll() is None:
            worker["process"].kill()
            worker["process"].wait()
        worker["log"].close()
        shutil.rmtree(worker["report"].parent, ignore_errors=True)


class WorkerFailure(Exception):
    pass


class InWorker(pytest.Item):
    """A test of test_sharded.py, run in the 8-device worker."""

    def runtest(self):
        batch = str(self.path) if _under_xdist(self.config) else "all"
        if batch not in _WORKERS:
            _start_worker(batch, [item for item in self.session.items
                                  if isinstance(item, InWorker) and (batch == "all" or str(item.path) == batch)])
        worker = _WORKERS[batch]
        if "log_tail" not in worker:
            _finish_worker(worker)
        outcome = _RESULTS.get(self.nodeid)
        if outcome is None:
            raise WorkerFailure(f"the 8-device worker reported nothing for this test:\n{worker['log_tail']}")
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


def _start_worker(batch: str, items: list[InWorker]) -> None:
    root = Path(items[0].config.rootpath)
    report = Path(tempfile.mkdtemp(prefix="moejax-8-devices-")) / "junit.xml"
    env = simulated_devices_env(DEVICES)
    log = open(report.with_name("log.txt"), "w+")  # noqa: SIM115 (read back when the worker is done)
    process = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                                f"--junitxml={report}", *(item.nodeid for item in items)], cwd=root, env=env,
                               stdout=log, stderr=subprocess.STDOUT, text=True)
    _WORKERS[batch] = dict(process=process, report=report, log=log)


def _finish_worker(worker: dict) -> None:
    worker["process"].wait()
    log, report = worker["log"], worker["report"]
    log.seek(0)
    worker["log_tail"] = log.read()[-6000:]
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
