"""Bad URLs, stores, addresses and output paths: one line, exit status 2, nothing created, within seconds.

Every case runs the real CLI against real things on 127.0.0.1 only: ports nothing listens on, a server that
never answers, an HTTP server that is not MLflow, the PostgreSQL server, a real MLflow SQLite store and real
Optuna studies. Bad run settings and data are in tests/test_bad_input.py.
"""

from __future__ import annotations

import http.server
import importlib.util
import socket
import threading
from pathlib import Path

import optuna
import pytest

from sweepbench.config import RunConfig
from sweepbench.engine import train
from sweepbench.report.export import write_export
from sweepbench.tracking import MlflowLogger
from tests.conftest import PROJECT_ROOT, SHARED_DATA, assert_refused, folder_snapshot, run_cli

URL_TIMEOUT = 20  # seconds: a refused or silent server is one line well before this, not minutes of retries
DATA = ["--data-dir", str(SHARED_DATA)]
STUDY = ["study", "run", str(PROJECT_ROOT / "studies" / "mnist_mlp_quick.toml"), *DATA]
BENCH = ["bench", str(PROJECT_ROOT / "benchmarks" / "quick.toml"), *DATA]
TRAIN = ["train", "--epochs", "1", "--train-subset", "1000", *DATA]
REPORT = ["report", "--tracking-uri", "{store}"]
COMMANDS = {"train": TRAIN, "report": ["report"], "study run": STUDY, "bench": BENCH}
REFUSED = "postgresql://postgres@127.0.0.1:1/x"
ONLY_SCHEMES = r"is not a tracking URI sweepbench can use; use sqlite:///<file>, http\(s\)://"
NO_ANSWER = r"did not answer within 5 s \(Connection refused\); start the tracking server"
PROC = r"nothing can be created in /proc"

CASES = {  # name: (arguments, the one line, seconds allowed); {file}, {store}, ... are filled in per test
    "storage scheme": ([*STUDY, "--storage", "foo://bar"],
                       r"--storage: foo://bar is not a storage URL Optuna can use; use sqlite:///<file>, "
                       r"postgresql://"),
    "storage refused": ([*STUDY, "--storage", REFUSED],
                        r"--storage: postgresql://postgres@127\.0\.0\.1:1/x cannot be opened within 5 s "
                        r"\(Connection refused\); check that the server runs", URL_TIMEOUT),
    "storage sqlite in /proc": ([*STUDY, "--storage", "sqlite:////proc/x/s.db"],
                                rf"--storage: sqlite:////proc/x/s\.db cannot be created: {PROC}"),
    "storage sqlite under a file": ([*STUDY, "--storage", "sqlite:///{file}/s.db"],
                                    r"--storage: sqlite:///.*/plain\.txt/s\.db cannot be created: .*plain\.txt is a "
                                    r"file, not a folder"),
    **{f"{name} tracking scheme": ([*args, "--tracking-uri", "ftp://x"], rf"--tracking-uri: ftp://x {ONLY_SCHEMES}")
       for name, args in COMMANDS.items()},
    **{f"{name} tracking server refused": ([*args, "--tracking-uri", "http://127.0.0.1:1"],
                                           rf"--tracking-uri: http://127\.0\.0\.1:1 {NO_ANSWER}", URL_TIMEOUT)
       for name, args in COMMANDS.items()},
    "tracking password hidden": (["report", "--tracking-uri", "http://user:secret@127.0.0.1:1"],
                                 rf"^(?!.*secret).*http://user:\*\*\*@127\.0\.0\.1:1 {NO_ANSWER}", URL_TIMEOUT),
    "tracking server silent": (["report", "--tracking-uri", "{silent}"],
                               r"--tracking-uri: http://127\.0\.0\.1:\d+ did not answer within 5 s \(timed out\)",
                               URL_TIMEOUT),
    "tracking server not mlflow": (["report", "--tracking-uri", "{not_mlflow}"],
                                   r"answered 404 at /health and 404 at the MLflow API; give the URL of an MLflow "
                                   r"tracking server", URL_TIMEOUT),
    "tracking database refused": (["report", "--tracking-uri", REFUSED],
                                  r"--tracking-uri: postgresql://postgres@127\.0\.0\.1:1/x cannot be opened within 5 s "
                                  r"\(Connection refused\)", URL_TIMEOUT),
    "tracking from the environment": (["report"], rf"^sweepbench: error: MLFLOW_TRACKING_URI: ftp://y {ONLY_SCHEMES}"),
    "tracking sqlite in /proc": ([*TRAIN, "--tracking-uri", "sqlite:////proc/x/mlflow.db"],
                                 rf"--tracking-uri: sqlite:////proc/x/mlflow\.db cannot be created: {PROC}"),
    "tracking sqlite under a file": ([*BENCH, "--tracking-uri", "sqlite:///{file}/mlflow.db"],
                                     r"cannot be created: .*plain\.txt is a file, not a folder"),
    "tracking sqlite host": ([*TRAIN, "--tracking-uri", "sqlite://x"],
                             r"--tracking-uri: sqlite://x is not a SQLite file"),
    "tracking sqlite folder": (["report", "--tracking-uri", "sqlite:///{folder}"],
                               r"names a folder, .*; give a database"),
    "report without a store": (["report"], r"--tracking-uri: sqlite:///.*/mlruns/mlflow\.db does not exist \(.*: no "
                                           r"such file\); give the file that holds an MLflow store"),
    "study checkpoint_dir in /proc": ([*STUDY, "--set", "checkpoint_dir=/proc/x"],
                                      rf"checkpoint_dir: cannot write in /proc/x: {PROC}.*; give a folder you "
                                      r"can write to"),
    "study checkpoint_dir under a file": ([*STUDY, "--set", "checkpoint_dir={file}/x"],
                                          r"checkpoint_dir: cannot write in .*plain\.txt/x: .*plain\.txt is a "
                                          r"file, not a folder"),
    "report output in /proc": ([*REPORT, "--output", "/proc/t.csv"],
                               rf"--output: cannot write /proc/t\.csv: {PROC}"),
    "report output is a folder": ([*REPORT, "--output", "."], r"--output: \. is a folder; give a file name"),
    "report output under a file": ([*REPORT, "--output", "{file}/t.csv"], r"--output: .* is a file, not a folder"),
    "report plot in /proc": ([*REPORT, "--plot", "/proc/x"], rf"--plot: cannot write in /proc/x: {PROC}"),
    "export output in /proc": (["study", "export", "alpha", "--output", "/proc/t.csv"], rf"--output: .*{PROC}"),
    "bench output in /proc": ([*BENCH, "--output", "/proc/x/t.md"], rf"--output: cannot write /proc/x/t\.md: {PROC}"),
    "bench output is a folder": ([*BENCH, "--output", "{folder}"], r"--output: .* is a folder"),
    "ui port too big": (["ui", "--port", "99999"], r"--port: 99999 is out of range; it must be from 1 to 65535"),
    "ui port zero": (["ui", "--port", "0"], r"--port: 0 is out of range"),
    "ui host": (["ui", "--host", "bad host!"], r"--host: 'bad host!' is not a host name or IP address; use e\.g\. "),
    "ui host numbers": (["ui", "--host", "256.1.1.1"], r"--host: '256\.1\.1\.1' is not a host name or IP address"),
    "ui port in use": (["ui", "--port", "{busy}"], r"--port: 127\.0\.0\.1:\d+ cannot be used \(Address already in use\)"
                                                   r"; choose another port"),
    "show no study": (["study", "show", "nothing"], r"study: no study 'nothing' in mlruns/studies/ \(the default "
                                                    r"storage: one SQLite file per study\); studies there: none"),
    "export no study": (["study", "export", "nothing"], r"study: no study 'nothing' in mlruns/studies/.*none"),
    "show missing file": (["study", "show", "x", "--storage", "sqlite:///missing.db"],
                          r"--storage: sqlite:///missing\.db does not exist \(.*missing\.db: no such file\); give the "
                          r"file that holds the study"),
    "show storage refused": (["study", "show", "x", "--storage", REFUSED], r"--storage: .* \(Connection refused\)",
                             URL_TIMEOUT),
    "storage proxy without a port": ([*STUDY, "--storage", "grpc://127.0.0.1"],
                                     r"--storage: grpc://127\.0\.0\.1 is not a gRPC storage proxy URL; use "
                                     r"grpc://<host>:<port>"),
    "storage proxy not answering": ([*STUDY, "--storage", "grpc://127.0.0.1:1"],
                                    r"--storage: grpc://127\.0\.0\.1:1 does not answer within 5 s: is `sweepbench "
                                    r"storage serve` running there", URL_TIMEOUT),
    "worker proxy not answering": (["study", "worker", *STUDY[2:], "--storage", "grpc://127.0.0.1:1"],
                                   r"--storage: grpc://127\.0\.0\.1:1 does not answer within 5 s", URL_TIMEOUT),
    "worker wait negative": (["study", "worker", *STUDY[2:], "--storage", "sqlite:///s.db", "--wait", "-1"],
                             r"--wait: -1\.0 is out of range; it must be a number of seconds >= 0"),
    "serve a proxy": (["storage", "serve", "--storage", "grpc://127.0.0.1:1"],
                      r"--storage: a gRPC proxy serves a database, not another proxy"),
    "serve storage refused": (["storage", "serve", "--storage", REFUSED], r"--storage: .* \(Connection refused\)",
                              URL_TIMEOUT),
    "serve port in use": (["storage", "serve", "--storage", "sqlite:///s.db", "--port", "{busy}"],
                          r"--port: 127\.0\.0\.1:\d+ cannot be used \(Address already in use\)"),
    "serve no connections": (["storage", "serve", "--storage", "sqlite:///s.db", "--connections", "0"],
                             r"--connections: 0 is out of range; it must be from 1 to 64"),
    "serve port too big": (["storage", "serve", "--storage", "sqlite:///s.db", "--port", "70000"],
                           r"--port: 70000 is out of range"),
}
ENVIRONMENTS = {"tracking from the environment": {"MLFLOW_TRACKING_URI": "ftp://y"}}
SLOW = {"tracking server silent"}  # waits out the 5 s probe


class NotMlflow(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_error(404)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory, data_dir):
    """Real things on 127.0.0.1 for the cases to point at: a store with runs, a server that accepts connections
    and never answers, an HTTP server that is not MLflow, a port something listens on."""
    folder = tmp_path_factory.mktemp("endpoints")
    store = f"sqlite:///{folder / 'mlflow.db'}"
    config = RunConfig(data_dir=str(data_dir), model_kwargs={"hidden_size": 32}, train_subset=1000, val_size=500)
    train(config, [MlflowLogger("bad-urls", store, log_artifacts=False, log_model=False)])
    silent, busy = socket.socket(), socket.socket()
    for listener in (silent, busy):
        listener.bind(("127.0.0.1", 0))
        listener.listen()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotMlflow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield {"store": store, "silent": f"http://127.0.0.1:{silent.getsockname()[1]}",
               "not_mlflow": f"http://127.0.0.1:{server.server_address[1]}", "busy": busy.getsockname()[1]}
    finally:
        server.shutdown()
        silent.close()
        busy.close()


@pytest.mark.parametrize("name", [pytest.param(name, marks=[pytest.mark.slow] if name in SLOW else [])
                                  for name in CASES])
def test_each_bad_url_or_path_is_one_line_and_creates_nothing(name, endpoints, tmp_path):
    args, message, *timeout = CASES[name]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (tmp_path / "plain.txt").write_text("a regular file\n")
    values = {**endpoints, "file": tmp_path / "plain.txt", "folder": tmp_path}
    assert_refused([arg.format(**values) for arg in args], message, cwd, env=ENVIRONMENTS.get(name),
                   timeout=timeout[0] if timeout else 60)


@pytest.mark.postgres
def test_a_database_that_does_not_exist_is_one_line_with_the_password_hidden(postgres_admin, tmp_path):
    url = "postgresql://postgres:secret@127.0.0.1/no_such_db"
    assert_refused([*STUDY, "--storage", url], r'^(?!.*secret).*--storage: postgresql://postgres:\*\*\*@127\.0\.0\.1/'
                   r'no_such_db cannot be opened within 5 s \(database "no_such_db" does not exist\)', tmp_path,
                   timeout=URL_TIMEOUT)


@pytest.mark.postgres
def test_showing_a_study_in_an_empty_database_creates_no_tables(postgres_admin, tmp_path):
    name = "sweepbench_test_bad_urls_empty"
    with postgres_admin.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS {name}")
        cursor.execute(f"CREATE DATABASE {name}")
    try:
        assert_refused(["study", "show", "x", "--storage", f"postgresql://postgres@127.0.0.1/{name}"],
                       rf"study: no study 'x' in postgresql://postgres@127\.0\.0\.1/{name}; studies there: none",
                       tmp_path, timeout=URL_TIMEOUT)
        import psycopg2

        with psycopg2.connect(host="127.0.0.1", user="postgres", dbname=name) as connection:
            with connection.cursor() as cursor:
                cursor.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'")
                assert cursor.fetchone()[0] == 0
        connection.close()
    finally:
        with postgres_admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.mark.skipif(importlib.util.find_spec("MySQLdb") is not None, reason="the MySQL driver is installed here")
def test_a_storage_whose_driver_is_missing_says_so(tmp_path):
    assert_refused([*STUDY, "--storage", "mysql://root@127.0.0.1/x"],
                   r"--storage: mysql://root@127\.0\.0\.1/x needs a database driver that is not installed "
                   r"\(No module named 'MySQLdb'\)", tmp_path)


def stored_studies(cwd: Path, *names: str) -> None:
    """Real Optuna studies in the default storage, one SQLite file per study, and a file that is not a study."""
    folder = cwd / "mlruns" / "studies"
    folder.mkdir(parents=True)
    for name in names:
        study = optuna.create_study(study_name=name, storage=f"sqlite:///{folder / name}.db")
        study.optimize(lambda trial: trial.suggest_float("x", -1, 1) ** 2, n_trials=3)
    (folder / "notes.db").write_text("not a database\n")


@pytest.mark.parametrize("command", ["show", "export"])
def test_a_missing_study_lists_the_stored_ones_and_creates_nothing(command, tmp_path):
    stored_studies(tmp_path, "beta", "alpha")
    assert_refused(["study", command, "gamma"], r"study: no study 'gamma' in mlruns/studies/ .*; studies there: "
                                                r"alpha, beta; give --storage for a study stored elsewhere", tmp_path)


def test_report_makes_the_missing_folders_of_its_output_and_says_so(endpoints, tmp_path):
    reported = run_cli("report", "--tracking-uri", endpoints["store"], "--output", "no/such/dir/t.csv", cwd=tmp_path,
                       check=True)
    assert "wrote no/such/dir/t.csv (made the folder no/such/dir)" in reported.stderr
    assert (tmp_path / "no/such/dir/t.csv").read_text().startswith("model,")
    assert folder_snapshot(tmp_path) == {Path(p) for p in ("no", "no/such", "no/such/dir", "no/such/dir/t.csv")}


def test_study_export_makes_the_missing_folders_of_its_output_and_says_so(tmp_path):
    stored_studies(tmp_path, "alpha")
    before = folder_snapshot(tmp_path)
    exported = run_cli("study", "export", "alpha", "--format", "csv", "--output", "trials/alpha/t.csv", cwd=tmp_path,
                       check=True)
    assert exported.stderr.strip() == "wrote trials/alpha/t.csv (made the folder trials/alpha)"
    assert (tmp_path / "trials/alpha/t.csv").read_text().startswith("number,")
    assert folder_snapshot(tmp_path) - before == {Path("trials"), Path("trials/alpha"), Path("trials/alpha/t.csv")}


def test_an_output_in_an_existing_folder_makes_nothing_else(tmp_path):
    assert write_export(tmp_path / "t.md", "| a |") is None
    assert write_export(tmp_path / "new" / "t.md", "| a |") == tmp_path / "new"
    assert (tmp_path / "t.md").read_text() == (tmp_path / "new" / "t.md").read_text() == "| a |\n"
