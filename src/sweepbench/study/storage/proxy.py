"""Optuna's gRPC storage proxy (``optuna.storages.run_grpc_proxy_server``): one server process in front of the
study's database, so that many workers hold no database connection of their own; the workers reach it as
``--storage grpc://HOST:PORT`` (``GrpcStorageProxy``)."""

from __future__ import annotations

import functools
import logging
import warnings
from concurrent.futures import ThreadPoolExecutor

import optuna
import sqlalchemy

from ..job import proxy_address, redact

log = logging.getLogger(__name__)

PROXY_THREADS = 16  # calls the proxy takes at once; beyond its connections, a call waits for one (milliseconds)
POOL_WAIT_SECONDS = 60


def is_proxy(storage_url: str) -> bool:
    return storage_url.startswith("grpc://")


@functools.lru_cache(maxsize=4)
def grpc_proxy(storage_url: str) -> optuna.storages.BaseStorage:
    """A client of the proxy at ``grpc://HOST:PORT``, one per process and URL (a gRPC channel reconnects by
    itself after an outage)."""
    from optuna.storages import GrpcStorageProxy

    host, port = proxy_address(storage_url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return GrpcStorageProxy(host=host, port=port)


def serve(storage_url: str, host: str, port: int, connections: int) -> None:
    """Serves ``storage_url`` (a database: PostgreSQL, MySQL or SQLite) on ``host``:``port`` until Ctrl-C or
    SIGTERM. The database's tables are made (or checked) first; the server caches finished trials in memory, as
    Optuna advises (``get_storage``), and holds at most ``connections`` connections to a database server, however
    many workers it serves."""
    from optuna.storages._grpc.server import make_server

    engine_kwargs = {"pool_size": connections, "max_overflow": 0, "pool_timeout": POOL_WAIT_SECONDS,
                     "pool_pre_ping": True}
    if storage_url.startswith("sqlite"):
        engine_kwargs = {"poolclass": sqlalchemy.pool.NullPool, "connect_args": {"timeout": 60}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.get_storage(optuna.storages.RDBStorage(storage_url, engine_kwargs=engine_kwargs))
        server = make_server(storage, host, port, ThreadPoolExecutor(max_workers=PROXY_THREADS))
    server.start()
    log.info(f"Optuna storage proxy for {redact(storage_url)} at grpc://{host}:{port}, at most {connections} "
             "database connection(s) (Ctrl-C to stop)")
    try:
        server.wait_for_termination()
    finally:
        server.stop(grace=2).wait()
