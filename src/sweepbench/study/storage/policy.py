"""The retry policy of a study's storage: the one of ``sweepbench.retry``, with a SQLite file's own permanent
faults."""

from __future__ import annotations

import dataclasses

from ...retry import RetryPolicy, causes
from ...tracking.connect import sqlite_problem
from ..job import redact


STORAGE_RETRY = RetryPolicy("study storage")
SQLITE_WRITE_ERRORS = ("readonly database", "unable to open database file", "Read-only file system",
                       "Permission denied")


def storage_policy(storage_url: str) -> RetryPolicy:
    """The retry policy for a storage: for a SQLite file, an error that a file or folder which cannot be written
    explains (``sqlite_problem``) is permanent and says which; "unable to open database file" alone is not."""
    if not storage_url.startswith("sqlite"):
        return STORAGE_RETRY

    def diagnose(exc: BaseException) -> str | None:
        if not any(text in str(error) for error in causes(exc) for text in SQLITE_WRITE_ERRORS):
            return None
        problem = sqlite_problem(storage_url)
        return problem and f"{redact(storage_url)} {problem}"

    return dataclasses.replace(STORAGE_RETRY, diagnose=diagnose)
