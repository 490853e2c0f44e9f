"""Shared fixtures: the real datasets in ../shared/data and a way to run the real CLI."""

from __future__ import annotations

import contextlib
import html
import re
import shutil
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator, Sequence

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SWEEPBENCH_TEST_DATA", PROJECT_ROOT.parent / "shared" / "data")).resolve()

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available on this machine")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real MNIST / CIFAR-10 copies; the tests are about real data, so their absence is an error."""
    if not (SHARED_DATA / "mnist.npz").exists():
        raise FileNotFoundError(f"real datasets expected in {SHARED_DATA} (set SWEEPBENCH_TEST_DATA)")
    return SHARED_DATA


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600,
            check: bool = False) -> subprocess.CompletedProcess:
    """Runs ``python -m sweepbench.cli ARGS`` as a real subprocess and captures its output."""
    full_env = {**os.environ, **(env or {})}
    completed = subprocess.run([sys.executable, "-m", "sweepbench.cli", *args], cwd=cwd, env=full_env,
                               capture_output=True, text=True, timeout=timeout)
    if check and completed.returncode != 0:
        raise AssertionError(f"sweepbench {' '.join(args)} exited {completed.returncode}:\n{completed.stderr}")
    return completed


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    """Polls ``url`` until it answers 200; fails if ``process`` exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{process.args} exited {process.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout} s")


@contextlib.contextmanager
def mlflow_server(folder: Path, backend_uri: str | None = None, port: int | None = None,
                  host: str = "127.0.0.1") -> Iterator[str]:
    """A real ``mlflow server`` on ``host`` (its own SQLite store in ``folder`` unless ``backend_uri`` names
    one; on ``port``, else a free one), serving artifacts from ``folder``; yields its URL and stops its whole
    process group on exit."""
    from sweepbench.tracking import stop_process_group

    port = port or free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1",
         "--backend-store-uri", backend_uri or f"sqlite:///{folder / 'server.db'}", "--serve-artifacts",
         "--artifacts-destination", str(folder / "server-artifacts")],
        cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no GenAI job workers: 10 s faster
    try:
        wait_for_http(f"http://{host}:{port}/health", process)
        yield f"http://{host}:{port}"
    finally:
        stop_process_group(process)


@contextlib.contextmanager
def storage_proxy(database_url: str, folder: Path, host: str = "127.0.0.1", port: int | None = None,
                  timeout: float = 120) -> Iterator[str]:
    """A real ``sweepbench storage serve`` (Optuna's gRPC storage proxy) in front of ``database_url`` on
    ``host``; yields its ``grpc://`` URL once it answers and stops its process group on exit."""
    import grpc

    from sweepbench.tracking import stop_process_group

    port = port or free_port()
    log = folder / f"proxy-{port}.log"
    with log.open("w") as output:
        process = subprocess.Popen([sys.executable, "-m", "sweepbench.cli", "storage", "serve", "--storage",
                                    database_url, "--host", host, "--port", str(port)], cwd=folder, stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=timeout)
            except grpc.FutureTimeoutError:
                raise AssertionError(f"the storage proxy did not answer: {log.read_text()}") from None
        yield f"grpc://{host}:{port}"
    finally:
        stop_process_group(process)


def folder_snapshot(folder: Path) -> set[Path]:
    return {path.relative_to(folder) for path in folder.rglob("*")}


def assert_refused(args: Sequence[str], message: str, cwd: Path, env: dict | None = None,
                   timeout: float = 60) -> subprocess.CompletedProcess:
    """Runs ``sweepbench ARGS`` in ``cwd`` and checks a bad input's contract: exit status 2, exactly one line on
    stderr (``sweepbench: error: ...``) matching the regex ``message``, no traceback, nothing created or changed
    in ``cwd``, within ``timeout`` seconds."""
    import re

    before = folder_snapshot(cwd)
    completed = run_cli(*args, cwd=cwd, env=env, timeout=timeout)
    lines = completed.stderr.splitlines()
    assert completed.returncode == 2, f"exit {completed.returncode}, stderr:\n{completed.stderr}"
    assert len(lines) == 1 and lines[0].startswith("sweepbench: error: "), completed.stderr
    assert re.search(message, lines[0]), f"{lines[0]!r} does not match {message!r}"
    assert folder_snapshot(cwd) == before, f"created: {sorted(map(str, folder_snapshot(cwd) - before))}"
    return completed


@pytest.fixture
def postgres_admin():
    """An autocommit connection to the PostgreSQL server at 127.0.0.1:5432 as ``postgres``; the test skips, with
    the reason, where none answers."""
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=5)
    except psycopg2.OperationalError as exc:
        pytest.skip(f"no PostgreSQL server answers on 127.0.0.1:5432 ({exc})")
    admin.autocommit = True
    yield admin
    admin.close()


@pytest.fixture
def postgres_url(postgres_admin) -> Iterator[str]:
    """A fresh database on the PostgreSQL server at 127.0.0.1:5432, dropped afterwards."""
    admin = postgres_admin
    name = f"sweepbench_test_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE {name} WITH (FORCE)")


def render(url: str, screenshot: Path, budget_ms: int = 20000, size: str = "1400,900") -> str:
    """The page's visible text after headless chromium has run its JavaScript for ``budget_ms`` of virtual time;
    saves a screenshot too (``docs/screenshots.py`` makes the README's pictures with it)."""
    profile = screenshot.parent / f"chrome-profile-{screenshot.stem}"  # fresh: no view choice kept from before
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
               f"--virtual-time-budget={budget_ms}", f"--window-size={size}", "--hide-scrollbars",
               f"--screenshot={screenshot}", "--dump-dom", url]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=180, check=True).stdout
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())
