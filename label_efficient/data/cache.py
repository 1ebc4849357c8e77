"""On-disk cache of preprocessed cases, memory-mapped: data larger than memory.

Each entry is a folder ``<root>/<key[:2]>/<key>/`` of ``.npy`` arrays and a ``meta.json`` written last (the entry
exists only once it is complete); every file is written to a temporary name and renamed (atomic), so a run killed
mid-write, or two processes building the same entry, never leave a partial entry behind. The key hashes the
preprocessing settings (:data:`CACHE_VERSION` included) and each source file's absolute path, size and mtime: a
changed setting or file gets a new key and is rebuilt (stale entries are left on disk; delete the folder to reclaim
them). Arrays are opened with ``np.load(mmap_mode="c")``: pages are read on demand and shared by every process
(data-loader workers included) through the page cache; copy-on-write because torch takes only writable arrays,
the file itself is never modified.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

#: bump when the preprocessing code changes what an entry holds
CACHE_VERSION = 1


def _stat(path: str | os.PathLike | None) -> list:
    if path is None:
        return [None]
    p = Path(path)
    st = p.stat()
    return [str(p.absolute()), st.st_size, st.st_mtime_ns]


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class DiskCache:
    """Preprocessed arrays of cases under ``root``, keyed by ``settings`` and the source files (module docstring)."""

    def __init__(self, root: str | os.PathLike, settings: Mapping[str, Any]):
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self.settings = self.with_version(settings)
        self._settings_json = json.dumps(self.settings, sort_keys=True, default=str)

    @staticmethod
    def with_version(settings: Mapping[str, Any]) -> dict:
        return {"cache_version": CACHE_VERSION, **settings}

    def key(self, kind: str, *files: str | os.PathLike | None) -> str:
        """Entry key of ``kind`` (e.g. ``image``/``label``) built from ``files`` under the current settings."""
        blob = json.dumps([self._settings_json, kind] + [_stat(f) for f in files], default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def _dir(self, key: str) -> Path:
        return self.root / key[:2] / key

    def load(self, key: str) -> tuple[dict[str, np.ndarray], dict, dict[str, str]] | None:
        """``(arrays memory-mapped, meta, {name: file})`` of a complete entry, else None."""
        d = self._dir(key)
        try:
            meta = json.loads((d / "meta.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
        paths = {n: str(d / f"{n}.npy") for n in meta.get("arrays", [])}
        try:
            arrays = {n: np.load(p, mmap_mode="c") for n, p in paths.items()}
        except (OSError, ValueError):
            return None
        return arrays, meta.get("meta", {}), paths

    def save(self, key: str, arrays: Mapping[str, np.ndarray], meta: Mapping | None = None) -> None:
        d = self._dir(key)
        d.mkdir(parents=True, exist_ok=True)
        for name, a in arrays.items():
            _atomic(d / f"{name}.npy", lambda f, a=a: np.save(f, np.ascontiguousarray(a), allow_pickle=False))
        body = json.dumps({"arrays": list(arrays), "meta": dict(meta or {})}, default=str).encode()
        _atomic(d / "meta.json", lambda f: f.write(body))

    def load_json(self, key: str) -> Any | None:
        try:
            return json.loads((self._dir(key) / "value.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def save_json(self, key: str, value: Any) -> None:
        d = self._dir(key)
        d.mkdir(parents=True, exist_ok=True)
        body = json.dumps(value, default=str).encode()
        _atomic(d / "value.json", lambda f: f.write(body))


def open_mapped(path: str) -> np.ndarray:
    return np.load(path, mmap_mode="c")
