"""Atomic artifact writing and hashing: one place for "never leave a half-written file".

Every stage writes through these helpers: data goes to a temporary file in the destination's
directory, is flushed to disk, then renamed over the destination in one step, so a crash or a
failed validation leaves the previous artifact intact. Pure standard library (no torch).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


__all__ = [
    "ArtifactError",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_write_jsonl",
    "atomic_directory",
    "exchange_paths",
    "sha256_file",
    "read_json_artifact",
]


class ArtifactError(ValueError):
    """An artifact file is missing, corrupt, or of an unexpected format or version."""


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success rename it over `dest`, else delete it.

    Use it when a library insists on writing to a path itself (torch.save, np.save, savefig):
    ``with atomic_path("fan.npy") as tmp: np.save(tmp, w)``.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp" + dest.suffix, dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; an artifact gets the permissions of an ordinary new file.
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(dest: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `dest` atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
    return Path(dest)


def atomic_write_text(dest: str | os.PathLike[str], text: str) -> Path:
    """Write `text` (UTF-8) to `dest` atomically."""
    return atomic_write_bytes(dest, text.encode("utf-8"))


def atomic_write_json(dest: str | os.PathLike[str], obj: Any, indent: int = 2) -> Path:
    """Serialise `obj` as JSON (sorted keys off, trailing newline) and write it atomically."""
    return atomic_write_text(dest, json.dumps(obj, indent=indent) + "\n")


def atomic_write_jsonl(dest: str | os.PathLike[str], records: Iterable[Any]) -> Path:
    """Write one JSON object per line (a training log, say) atomically."""
    return atomic_write_text(dest, "".join(json.dumps(record) + "\n" for record in records))


@contextlib.contextmanager
def atomic_directory(dest: str | os.PathLike[str], overwrite: bool = True) -> Iterator[Path]:
    """Yield an empty temporary directory beside `dest`; on success it replaces `dest` whole.

    A failure inside the block removes the temporary directory and leaves any existing `dest`
    untouched. With overwrite=False an existing `dest` is an error.
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} already exists (pass overwrite=True to replace it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists() and exchange_paths(tmp, dest):
        # One step: dest now holds the new tree, tmp the old one.
        shutil.rmtree(tmp, ignore_errors=True)
        return
    # Fallback where an atomic swap is not available: a short window with dest missing.
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange_paths(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE).

    Returns False where the platform or file system cannot, so callers fall back.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_json_artifact(
    path: str | os.PathLike[str],
    expected_format: str,
    validate: Callable[[dict[str, Any]], None] | None = None,
    remake: str | None = None,
) -> dict[str, Any]:
    """Read a JSON artifact and check its `"format"` field (e.g. "nonn.partition/1").

    Raises ArtifactError naming the path when the file is missing, is not JSON, or has another
    format; `validate` may raise further ArtifactErrors for the content. `remake` (the command
    that writes the artifact again) is said when the file holds another version of it.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found (expected a {expected_format} JSON file)")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc}); expected a {expected_format} file") from exc
    if not isinstance(obj, dict) or obj.get("format") != expected_format:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        family = expected_format.rsplit("/", 1)[0] + "/"
        older = remake is not None and isinstance(found, str) and found.startswith(family)
        advice = f": made by an older nonn; run `{remake}` again" if older else ""
        raise ArtifactError(f"{path}: format is {found!r}, expected {expected_format!r}{advice}")
    if validate is not None:
        validate(obj)
    return obj
