"""A study across eight hosts, one of them cut off mid-study and brought back (issue 20). Each host is a network
namespace with its own address on a bridge the test makes (and removes), running a ``sweepbench study worker``;
the root namespace runs one PostgreSQL and one ``mlflow server`` (PostgreSQL backend store, artifacts served by
the server), and the study's head (``study run``). Then the same through Optuna's gRPC storage proxy between the
workers and PostgreSQL. Traffic goes to those addresses only: the bridge's network is the test's own."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import mlflow.pytorch
import optuna
import psycopg2
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from sweepbench.config import ConfigError
from sweepbench.study import RETRY_HISTORY, RUN_ID_ATTR, WORKER_ATTR, normalize_storage_url
from sweepbench.study.ending import STALE_MESSAGE
from sweepbench.study.storage import open_existing_study
from sweepbench.tracking import fluent_tracking_uri
from tests.conftest import mlflow_server, storage_proxy
from tests.test_faults import PG_BIN, PrivatePostgres
from tests.test_study import assert_exactly, mlflow_runs, study_args, write_spec

pytestmark = pytest.mark.slow

HOSTS = 8
NETWORK = "10.213.0"  # the test's own bridge network: .1 is the root namespace, .11 to .18 the hosts
HEARTBEAT_SECONDS = 2  # a trial silent for 3 of them is stale
LONGEST_CUT_SECONDS = 90  # the cut lasts until another worker failed the host's trial as stale, at most this
N_TRIALS = 24


@dataclass
class Host:
    namespace: str
    link: str  # the root namespace's end of the host's cable: down is the host cut off
    address: str


class HostNetwork:
    """A bridge in the root namespace and ``HOSTS`` namespaces, each on a veth pair to it."""

    def __init__(self, tag: str) -> None:
        self.bridge = f"sbbr{tag}"
        self.hosts = [Host(f"sbh{index}-{tag}", f"sbv{index}{tag}", f"{NETWORK}.{10 + index}")
                      for index in range(1, HOSTS + 1)]

    def __enter__(self) -> HostNetwork:
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{NETWORK}.1/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for host in self.hosts:
            ip("netns", "add", host.namespace)
            ip("link", "add", host.link, "type", "veth", "peer", "name", "eth0", "netns", host.namespace)
            ip("link", "set", host.link, "master", self.bridge, "up")
            ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
            ip("-n", host.namespace, "link", "set", "eth0", "up")
            ip("-n", host.namespace, "link", "set", "lo", "up")
        return self

    def __exit__(self, *exc_info) -> None:
        for host in self.hosts:
            subprocess.run(["ip", "link", "del", host.link], capture_output=True)
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def cut(self, host: Host) -> None:
        ip("link", "set", host.link, "down")

    def restore(self, host: Host) -> None:
        ip("link", "set", host.link, "up")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def network() -> Iterator[HostNetwork]:
    if os.geteuid() != 0 or shutil.which("ip") is None or PG_BIN is None or shutil.which("runuser") is None:
        pytest.skip("needs root, iproute2 (ip netns) and PostgreSQL's initdb/pg_ctl")
    with HostNetwork(f"{os.getpid() % 10000}") as made:
        yield made


@pytest.fixture
def services(network: HostNetwork) -> Iterator[dict[str, str]]:
    """One private PostgreSQL (the study's database and the MLflow server's) and one ``mlflow server``, both
    listening on the bridge, in the root namespace."""
    folder = Path(tempfile.mkdtemp(prefix="sweepbench-hosts-"))
    shutil.chown(folder, "postgres", "postgres")
    server = PrivatePostgres(folder, listen=f"127.0.0.1,{NETWORK}.1", trusted_network=f"{NETWORK}.0/24")
    server.start()
    try:
        with contextlib.closing(psycopg2.connect(host="127.0.0.1", port=server.port, user="postgres",
                                                 dbname="postgres")) as admin:
            admin.autocommit = True
            with admin.cursor() as cursor:
                cursor.execute("CREATE DATABASE study")
                cursor.execute("CREATE DATABASE mlflow")
        database = f"postgresql://postgres@{NETWORK}.1:{server.port}"
        mlflow_folder = folder / "mlflow"
        mlflow_folder.mkdir()
        with mlflow_server(mlflow_folder, normalize_storage_url(f"{database}/mlflow"), host=f"{NETWORK}.1") as url:
            yield {"storage": normalize_storage_url(f"{database}/study"), "tracking": url, "folder": str(folder)}
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def start_worker(host: Host, spec: Path, storage: str, tracking: str, data_dir: Path, log: Path) -> subprocess.Popen:
    """``sweepbench study worker`` on ``host`` (``ip netns exec`` execs it: the process is the worker)."""
    with log.open("w") as output:
        return subprocess.Popen(["ip", "netns", "exec", host.namespace, sys.executable, "-m", "sweepbench.cli",
                                 "study", "worker", str(spec), "--storage", storage, "--tracking-uri", tracking,
                                 "--data-dir", str(data_dir), "--wait", "300"],
                                cwd=log.parent, stdout=output, stderr=subprocess.STDOUT, text=True)


def running_trial_of(study_name: str, storage: str, workers: dict[int, Host]) -> tuple[Host, int] | None:
    """A host whose worker trains a trial now (linked to its MLflow run), and that trial's number."""
    with contextlib.suppress(ConfigError):  # not made yet
        study = open_existing_study(study_name, storage)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            pid = int(trial.user_attrs.get(WORKER_ATTR, ":0").rsplit(":", 1)[1])
            if pid in workers and RUN_ID_ATTR in trial.user_attrs:
                return workers[pid], trial.number
    return None


def trial_state(study_name: str, storage: str, number: int) -> TrialState:
    return open_existing_study(study_name, storage).trials[number].state


def run_partitioned_study(network: HostNetwork, services: dict[str, str], storage: str, tmp_path: Path,
                          data_dir: Path) -> None:
    """The head and a worker on each host; one host cut off while its worker trains, until another worker has
    failed its trial as stale (longer than the grace period); then every check of the issue."""
    name = "many-hosts"
    spec = write_spec(tmp_path, name, n_trials=N_TRIALS, epochs=3, subset=4000, pruner="none")
    head_log = tmp_path / "head.log"
    with head_log.open("w") as output:
        head = subprocess.Popen([sys.executable, "-m", "sweepbench.cli", *study_args(
            spec, data_dir, "--storage", storage, "--tracking-uri", services["tracking"],
            "--heartbeat-interval", str(HEARTBEAT_SECONDS), "--no-system-metrics")],
            cwd=tmp_path, stdout=output, stderr=subprocess.STDOUT, text=True)
    workers = {}
    for host in network.hosts:
        process = start_worker(host, spec, storage, services["tracking"], data_dir, tmp_path / f"{host.namespace}.log")
        workers[process.pid] = (host, process)
    try:
        deadline = time.monotonic() + 400
        victim = None
        while victim is None:
            assert time.monotonic() < deadline, "no host's worker was seen training"
            assert head.poll() is None, head_log.read_text()
            victim = running_trial_of(name, storage, {pid: host for pid, (host, _) in workers.items()})
            time.sleep(0.2)
        host, trial_number = victim
        network.cut(host)
        cut_at = time.monotonic()
        while trial_state(name, storage, trial_number) == TrialState.RUNNING:
            assert time.monotonic() - cut_at < LONGEST_CUT_SECONDS, "no worker failed the cut-off host's trial"
            time.sleep(0.5)
        time.sleep(2 * HEARTBEAT_SECONDS)
        network.restore(host)
        print(f"host {host.address} cut off for {time.monotonic() - cut_at:.0f} s while training trial "
              f"{trial_number}")
        assert head.wait(timeout=600) == 0, head_log.read_text()
        for pid, (worker_host, process) in workers.items():
            allowed = (0, 1) if worker_host == host else (0,)  # the cut-off one may leave, in one line
            assert process.wait(timeout=300) in allowed, (tmp_path / f"{worker_host.namespace}.log").read_text()
    finally:
        for process in [head, *(process for _, process in workers.values())]:
            if process.poll() is None:
                process.kill()
                process.wait()
    check_study(name, storage, services["tracking"], trial_number)
    victim_log = (tmp_path / f"{host.namespace}.log").read_text()
    rejoined = victim_log.count(STALE_MESSAGE)
    left = victim_log.count("sweepbench: error:")
    assert rejoined + left == 1, victim_log  # the cut-off worker's one line: it rejoined, or it left


def check_study(name: str, storage: str, tracking: str, cut_trial: int) -> None:
    """Exactly N finished, none twice, the cut-off trial failed and run again, every finished trial's MLflow run
    FINISHED with its metrics, nothing RUNNING anywhere, the best model registered through the server."""
    study = open_existing_study(name, storage)
    assert_exactly(study, N_TRIALS)
    finished = [trial for trial in study.trials if trial.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    origins = [trial.system_attrs.get(RETRY_HISTORY, [trial.number])[0] for trial in finished]
    assert len(origins) == len(set(origins)), "no trial finished twice (as itself and as its retry)"
    assert study.trials[cut_trial].state == TrialState.FAIL
    assert cut_trial in origins, "the cut-off trial ran again elsewhere and finished"
    parent, children = mlflow_runs(tracking, name)
    runs = {run.info.run_id: run for run in children}
    assert parent.info.status == "FINISHED"
    for trial in finished:
        run = runs[trial.user_attrs[RUN_ID_ATTR]]
        assert run.info.status == "FINISHED", trial.number
        curve = MlflowClient(tracking).get_metric_history(run.info.run_id, "val_accuracy")
        assert len(curve) == trial.user_attrs["epochs_run"], trial.number
    assert not [run.info.run_name for run in children if run.info.status == "RUNNING"]
    assert not study.get_trials(states=(TrialState.RUNNING,))
    version = MlflowClient(tracking).get_model_version_by_alias(name, "best")
    assert version.run_id == study.best_trial.user_attrs[RUN_ID_ATTR]
    with fluent_tracking_uri(tracking):
        model = mlflow.pytorch.load_model(f"models:/{name}@best")  # its files, served by the server
    assert sum(parameter.numel() for parameter in model.parameters()) > 0


def test_eight_hosts_on_postgresql_one_cut_off_mid_study_end_with_exactly_n(network, services, tmp_path, data_dir):
    run_partitioned_study(network, services, services["storage"], tmp_path, data_dir)


def test_eight_hosts_through_the_grpc_proxy_one_cut_off_mid_study_end_with_exactly_n(network, services, tmp_path,
                                                                                     data_dir):
    with storage_proxy(services["storage"], tmp_path, host=f"{NETWORK}.1") as proxy:
        run_partitioned_study(network, services, proxy, tmp_path, data_dir)
    behind = optuna.load_study(study_name="many-hosts", storage=services["storage"])
    assert len(behind.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == N_TRIALS, \
        "the proxy kept the study in PostgreSQL"
