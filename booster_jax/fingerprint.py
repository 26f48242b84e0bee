"""Content fingerprints of a stage's inputs: data files by their bytes, model directories by their weights.

A stage is reused when its fingerprint matches, so the fingerprint must change when an input's
*content* changes, not only its path: a data file edited in place, or new weights written into the
same model directory. Hashing is cached by (real path, size, mtime) -- in memory, and on disk in a
JSON file when :func:`set_cache_file` names one -- so a rerun does not rehash a 7B model.

A fingerprint is built from named parts (``{"data.alignment_file": digest, "config": ..., ...}``);
:class:`InputLog` keeps the parts each stage last ran with, so a rerun can say which input changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Mapping

from booster_jax import files
from booster_jax.config import Config, config_fingerprint

log = logging.getLogger(__name__)

# Weight files up to this size are hashed byte for byte; larger ones are identified by their
# safetensors header, size and mtime (hashing 13 GB on every new mtime would cost tens of seconds).
CONTENT_HASH_LIMIT = 1 << 30
_CHUNK = 1 << 20

_memo: dict[str, str] = {}
_cache_file: str | None = None


def set_cache_file(path: str | None) -> None:
    """Keep file digests in ``path`` (JSON) across processes; None = in memory only."""
    global _cache_file
    _cache_file = path


def _key(path: str) -> tuple[str, str]:
    st = os.stat(path)
    return os.path.realpath(path), f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"


def _disk_cache() -> dict:
    if not _cache_file or not os.path.exists(_cache_file):
        return {}
    try:
        with open(_cache_file, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # a damaged cache only costs a rehash


def _remember(key: str, digest: str) -> None:
    _memo[key] = digest
    if not _cache_file:
        return
    data = _disk_cache()
    data[key] = digest
    try:
        os.makedirs(os.path.dirname(_cache_file) or ".", exist_ok=True)
        tmp = f"{_cache_file}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, _cache_file)
    except OSError as e:
        log.debug("file digest cache %s not written: %s", _cache_file, e)


def file_digest(path: str) -> str:
    """sha256 of a file's bytes (hex, 32 chars), cached by real path, size and mtime."""
    _, key = _key(path)
    if key in _memo:
        return _memo[key]
    cached = _disk_cache().get(key)
    if isinstance(cached, str):
        _memo[key] = cached
        return cached
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    digest = h.hexdigest()[:32]
    _remember(key, digest)
    return digest


def data_digest(path: str) -> str:
    """Identity of a data input named in the config: the file's content digest, every file's for a
    directory, the name itself for a hub id, 'none' when unset, 'missing' when not there."""
    if not path:
        return "none"
    p = os.path.expanduser(path)
    if os.path.isfile(p):
        return file_digest(p)
    if os.path.isdir(p):
        h = hashlib.sha256()
        for root, dirs, files in os.walk(p):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if not name.startswith("."):
                    full = os.path.join(root, name)
                    h.update(f"{os.path.relpath(full, p)}={file_digest(full)};".encode())
        return h.hexdigest()[:32]
    if os.path.exists(p):
        return "unreadable"
    from booster_jax.data.formats import _looks_local  # a hub id is identified by its name

    return "missing" if _looks_local(path) else f"hub:{path}"


def safetensors_digest(path: str) -> str:
    """A weight file: its header (names, dtypes, shapes, offsets) and size, plus its bytes when it is at
    most ``CONTENT_HASH_LIMIT`` (else its mtime, so rewritten weights still change the digest)."""
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        h.update(head + f.read(min(n, st.st_size)))
    h.update(f"size={st.st_size};".encode())
    h.update((f"bytes={file_digest(path)}" if st.st_size <= CONTENT_HASH_LIMIT else f"mtime={st.st_mtime_ns}").encode())
    return h.hexdigest()[:32]


def model_fingerprint(model_dir: str) -> str:
    """Identity of a model directory: every config / tokenizer file by content and every safetensors
    file by :func:`safetensors_digest`. Sub-directories and hidden files are not part of the model."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if name.startswith(".") or not os.path.isfile(path):
            continue
        digest = safetensors_digest(path) if name.endswith(".safetensors") else file_digest(path)
        h.update(f"{name}={digest};".encode())
    return h.hexdigest()[:16]


def config_parts(cfg: Config, sections) -> dict[str, str]:
    """One fingerprint part per config section, so a rerun can name the setting that changed."""
    return {f"config {s}": config_fingerprint(cfg, [s]) for s in sections}


def options_on(cfg: Config, *names: str) -> list[str]:
    """The data options among ``names`` that are set (unset ones leave older fingerprints unchanged)."""
    return [f"data.{n}" for n in names if getattr(cfg.data, n)]


def combine(parts: Mapping[str, str]) -> str:
    """One 16-hex fingerprint of named parts (order-free)."""
    blob = json.dumps(dict(parts), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def changed_inputs(old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    """Names of the parts that differ (added, removed or changed), sorted."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


class InputLog:
    """The inputs each stage of an output directory last ran with, so a rerun can name what changed.

    ``check(stage, parts)`` logs, when ``stage`` ran before with other parts, one line naming the changed
    inputs, then records the new parts. The file is ``<out_dir>/inputs.json``.
    """

    def __init__(self, out_dir: str, write: bool = True):
        self.path = os.path.join(out_dir, "inputs.json")
        self.write = write
        try:
            with open(self.path, encoding="utf-8") as f:
                self.stages = json.load(f)
        except (OSError, ValueError):
            self.stages = {}

    def check(self, stage: str, parts: Mapping[str, str]) -> list[str]:
        old = self.stages.get(stage)
        changed = changed_inputs(old, parts) if isinstance(old, dict) else []
        if changed:
            log.warning("%s: inputs changed since the last run in this output directory: %s; the stage is "
                        "run again (unless a finished stage with these inputs exists)", stage, ", ".join(changed))
        self.stages[stage] = dict(parts)
        if self.write:
            files.write_json_atomic(self.path, self.stages)
        return changed
