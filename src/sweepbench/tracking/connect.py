"""Checks, made where a URI or an address enters and before any work starts, that what a command will talk to can
be used: an MLflow tracking URI (its scheme; a SQLite file's folder; a tracking server or database that answers
within ``PROBE_SECONDS``), a database URL (shared with Optuna's storage), and the address the MLflow UI will
listen on. Each raises a ``ConfigError`` whose one line names the URI (password hidden), what is wrong and what is
allowed; none creates anything. Without them a refused server costs MLflow's HTTP retries (minutes) or a
traceback."""

from __future__ import annotations

import errno
import importlib.util
import ipaddress
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

from ..paths import folder_problem
from ..retry import permanent_reason
from ..validators import ConfigError
from .store import TRACKING_URI_ENV, default_store_path, is_server, sqlite_path, uri_scheme

PROBE_SECONDS = 5
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")
TRACKING_SCHEMES = ("sqlite", "http", "https", *DATABASE_SCHEMES)
TRACKING_ALLOWED = "sqlite:///<file>, http(s)://<MLflow tracking server>, or postgresql://, mysql:// or mssql://"
CONNECT_ARGS = {"postgresql": {"connect_timeout": PROBE_SECONDS}, "mysql": {"connect_timeout": PROBE_SECONDS},
                "mssql": {"timeout": PROBE_SECONDS}}
HEALTH_PATH, API_PATH = "/health", "/api/2.0/mlflow/experiments/search?max_results=1"
HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def redact(url: str) -> str:
    """``url`` with its password, if any, shown as ``***``."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def with_installed_driver(url: str) -> str:
    """A ``postgresql://`` URL with the driver that is installed: SQLAlchemy 2.1 defaults to psycopg 3, while
    this package depends on psycopg2."""
    scheme, sep, rest = url.partition("://")
    if scheme == "postgresql" and importlib.util.find_spec("psycopg") is None:
        return f"postgresql+psycopg2{sep}{rest}"
    return url


def check_tracking_uri(uri: str | None = None, must_exist: bool = False) -> str:
    """The tracking URI a command will use (``uri``, else ``$MLFLOW_TRACKING_URI``, else the embedded store),
    checked and returned: an allowed scheme; for SQLite a file whose folder can be made (``must_exist``: a file
    that exists, for a command that only reads); a server or database that answers within ``PROBE_SECONDS``."""
    label = "--tracking-uri" if uri or not os.environ.get(TRACKING_URI_ENV) else TRACKING_URI_ENV
    uri = uri or os.environ.get(TRACKING_URI_ENV) or f"sqlite:///{default_store_path()}"
    problem = _tracking_problem(uri, must_exist)
    if problem:
        raise ConfigError(f"{label}: {redact(uri)} {problem}")
    return uri


def _tracking_problem(uri: str, must_exist: bool) -> str | None:
    scheme = uri_scheme(uri)
    if "://" not in uri or scheme not in TRACKING_SCHEMES:
        return f"is not a tracking URI sweepbench can use; use {TRACKING_ALLOWED}"
    if is_server(uri):
        return server_problem(uri)
    if scheme == "sqlite":
        return sqlite_problem(uri, "an MLflow store" if must_exist else None)
    return database_problem(uri)


def sqlite_problem(url: str, must_hold: str | None = None) -> str | None:
    """Why ``url`` cannot be a SQLite database file, or None: it must be ``sqlite:///<file>``, not a folder, and
    either exist and be writable or have a folder that can be made. ``must_hold`` (what the file must already hold,
    for a command that only reads it): it must exist, and need not be writable."""
    path = sqlite_path(url)
    if path is None:
        return "is not a SQLite file URL; use sqlite:///<relative path> or sqlite:////<absolute path>"
    if path.is_dir():
        return f"names a folder, {path}; give a database file"
    if path.exists():
        return None if must_hold else _write_problem(path)
    if must_hold:
        return f"does not exist ({path}: no such file); give the file that holds {must_hold}"
    problem = folder_problem(path.parent)
    return problem and f"cannot be created: {problem}; give a file in a folder you can write to"


def _write_problem(path: Path) -> str | None:
    """Why SQLite cannot write the existing file ``path``, or None: the file must be writable, and its folder too,
    where SQLite writes its journal. ``os.access`` says no on a read-only file system even to root; the file is
    not opened, since closing a handle on a SQLite file drops the locks this process holds on it."""
    for target in (path, path.parent):
        if not os.access(target, os.W_OK):
            why = "Read-only file system" if os.statvfs(target).f_flag & os.ST_RDONLY else "Permission denied"
            where = f"({path}: {why})" if target == path else f"(its folder {target}: {why}, for SQLite's journal)"
            return f"cannot be written {where}; give a file you can write to"
    return None


def database_problem(url: str, connections: Callable[[Any], tuple[int, str]] | None = None) -> str | None:
    """Why a database server does not open ``url`` (one connection, ``PROBE_SECONDS`` at most), or None. With
    ``connections``, which reads on the open connection how many a command needs at once and says who needs them:
    why a PostgreSQL server does not let the URL's user open that many."""
    import sqlalchemy

    try:
        parsed = sqlalchemy.engine.make_url(with_installed_driver(url))
        engine = sqlalchemy.create_engine(parsed, poolclass=sqlalchemy.pool.NullPool,
                                          connect_args=CONNECT_ARGS.get(parsed.get_backend_name(), {}))
    except (ImportError, sqlalchemy.exc.NoSuchModuleError) as exc:
        return f"needs a database driver that is not installed ({exc}); install it, or use another database"
    except sqlalchemy.exc.ArgumentError:
        return "is not a database URL; use <scheme>://<user>@<host>[:<port>]/<database>"
    try:
        with engine.connect() as connection:
            if connections and parsed.get_backend_name() == "postgresql":
                return connection_limit_problem(connection, *connections(connection))
            return None
    except sqlalchemy.exc.DBAPIError as exc:
        if permanent_reason(exc):
            return (f"is refused by the server ({_reason(exc.orig)}), which retrying will not change; give a user, "
                    "password and database the server accepts")
        return (f"cannot be opened within {PROBE_SECONDS} s ({_reason(exc.orig)}); check that the server runs and "
                "the host, port, user and database in the URL")
    finally:
        engine.dispose()


LIMITS_QUERY = """SELECT r.rolname, r.rolsuper, r.rolconnlimit, d.datname, d.datconnlimit FROM pg_roles r, pg_database d
WHERE r.rolname = current_user AND d.datname = current_database()"""


def connection_limit_problem(connection: Any, needed: int, who: str) -> str | None:
    """Why the ``CONNECTION LIMIT`` of the connection's role or database (-1: none; superusers are exempt) is
    below what ``who`` needs at once, ``needed``, or None. Only limits are read: connections that other commands
    hold now are waited for."""
    import sqlalchemy

    role, superuser, role_limit, database, database_limit = connection.execute(sqlalchemy.text(LIMITS_QUERY)).one()
    for kind, name, limit in (("ROLE", role, role_limit), ("DATABASE", database, database_limit)):
        if not superuser and 0 <= limit < needed:
            return (f"lets {kind.lower()} {name} open {limit} connection(s) at once (its CONNECTION LIMIT), and "
                    f"{who} needs {needed} at once; raise it to {needed} or more, e.g. ALTER {kind} {name} "
                    f"CONNECTION LIMIT {needed}")
    return None


def _reason(error: BaseException) -> str:
    """The first line of a driver's error, without psycopg's ``connection to server at ... failed:`` preamble."""
    line = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return " ".join(line.rsplit("failed:", 1)[-1].replace("FATAL:", "").split())


def server_problem(uri: str) -> str | None:
    """Why ``uri`` is not an MLflow tracking server that answers within ``PROBE_SECONDS``, or None. Without this,
    MLflow retries a refused server for minutes, silently. Credentials in the URI are left out: an answer that
    asks for them (401, 403) is an answer."""
    parts = urllib.parse.urlsplit(uri.rstrip("/"))
    base = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))
    health = _http_status(base + HEALTH_PATH)
    if health in (200, 401, 403):
        return None
    if isinstance(health, str):
        return (f"did not answer within {PROBE_SECONDS} s ({health}); start the tracking server "
                "(mlflow server --host ... --port ...) or give another URI")
    api = _http_status(base + API_PATH)
    if api in (200, 401, 403):
        return None
    return (f"answered {health} at {HEALTH_PATH} and {api} at the MLflow API; give the URL of an MLflow "
            "tracking server")


def _http_status(url: str) -> int | str:
    """The HTTP status ``url`` answers a GET with, or why it did not answer."""
    try:
        with urllib.request.urlopen(url, timeout=PROBE_SECONDS) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except urllib.error.URLError as exc:
        return getattr(exc.reason, "strerror", None) or str(exc.reason)
    except (OSError, ValueError) as exc:
        return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def check_listen_address(host: str, port: int) -> None:
    """The MLflow UI can listen on ``host``:``port``: a port from 1 to 65535, a host name or IP address of this
    machine, a port that nothing else listens on. Binds for a moment (with SO_REUSEADDR, as uvicorn does)."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port: {port} is out of range; it must be from 1 to 65535")
    if not _is_host(host):
        raise ConfigError(f"--host: {host!r} is not a host name or IP address; use e.g. 127.0.0.1 (this machine "
                          "only) or 0.0.0.0 (every interface)")
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ConfigError(f"--host: {host!r} cannot be resolved ({exc.strerror}); use an address of this "
                          "machine, e.g. 127.0.0.1") from None
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                raise ConfigError(f"--port: {host}:{port} cannot be used ({exc.strerror}); choose another "
                                  "port") from None
            raise ConfigError(f"--host: cannot listen on {host}:{port} ({exc.strerror}); use an address of "
                              "this machine, e.g. 127.0.0.1") from None


def _is_host(host: str) -> bool:
    """An IP address, or a host name whose last label is not all digits (``256.1.1.1`` is neither)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(HOST_NAME.fullmatch(host)) and not host.rstrip(".").rsplit(".", 1)[-1].isdigit()
