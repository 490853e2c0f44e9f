"""Checks for the folders and files a command will write, made where the path enters, before any data loads or
any run starts. They create nothing: each raises a ``ConfigError`` in the one error format (the option, the path,
what is wrong, what is allowed), and the folders are made only when something is written there."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .validators import ConfigError


def folder_problem(folder: str | os.PathLike) -> str | None:
    """Why files cannot be written in ``folder`` (made when missing, with its parents), or None. Creating a folder
    in its nearest existing ancestor is tried for real and undone at once: a permission check alone is wrong for
    root, on read-only mounts and in /proc."""
    existing = Path(folder)
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is {'a file' if existing.exists() else 'a broken link'}, not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".sweepbench-check-", dir=existing))
    except OSError as exc:
        return f"nothing can be created in {existing} ({exc.strerror})"
    return None


def writable_folder(label: str, path: str | os.PathLike) -> Path:
    """``path`` as a folder files can be written in; it may not exist yet (it is made when first written)."""
    problem = folder_problem(path)
    if problem:
        raise ConfigError(f"{label}: cannot write in {path}: {problem}; give a folder you can write to")
    return Path(path)


def output_file(label: str, path: str | os.PathLike | None) -> Path | None:
    """``path`` as a file that can be written: not a folder, writable if it exists, else in a folder that exists
    or can be made (``create_parents`` makes it when the file is written). None (no file asked for) stays None."""
    if path is None:
        return None
    file = Path(path)
    if file.is_dir():
        raise ConfigError(f"{label}: {path} is a folder; give a file name (a path that is not a folder)")
    if file.exists():
        try:
            with open(file, "a"):
                pass
        except OSError as exc:
            raise ConfigError(f"{label}: cannot write {path} ({exc.strerror}); give a file you can write to") from None
        return file
    problem = folder_problem(file.parent)
    if problem:
        raise ConfigError(f"{label}: cannot write {path}: {problem}; give a file in a folder you can write to")
    return file


def create_parents(path: str | os.PathLike) -> Path | None:
    """Makes the missing folders above ``path``; returns the folder made (to say so), or None when it existed."""
    parent = Path(path).parent
    if parent.is_dir():
        return None
    parent.mkdir(parents=True, exist_ok=True)
    return parent
