"""Write a generated tree of files in one step: the output directory is replaced whole or not at all."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Mapping

from nonn.artifacts import atomic_directory

__all__ = ["write_tree", "write_files"]


def write_tree(out: str | os.PathLike[str], files: Mapping[str, str | bytes | Path], *, overwrite: bool = False) -> list[Path]:
    """Write `files` (relative path -> text, bytes, or a file to copy) as the directory `out`.

    The tree is built beside `out` and renamed over it, so a failure leaves any earlier `out`
    untouched; an existing `out` is an error unless `overwrite`. Returns the written paths.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write_files(tmp, files)
    return [out / name for name in sorted(files)]


def write_files(directory: str | os.PathLike[str], files: Mapping[str, str | bytes | Path]) -> None:
    """Write `files` (relative path -> text, bytes, or a file to copy) under `directory` (inside an atomic write)."""
    directory = Path(directory)
    for name, content in sorted(files.items()):
        relative = Path(name)
        if relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"{name!r}: expected a path inside the output directory")
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
