"""Crash-safe output files: every JSON/YAML/text output is replaced atomically, JSONL logs are appended
line by line with fsync and read back tolerating a torn last line.

Why: a run can be killed (or the disk fill) at any byte. A reader must then see the old file or the
whole new one (temp file + fsync + rename), and a per-step log loses at most its last, partial line,
which the next run drops before appending.

Every JSON written here is strict JSON (``dumps``): a NaN or infinity -- a metric with nothing to
measure -- is written as ``null``, since ``jq``, JavaScript and most parsers reject Python's ``NaN``.
Readers that compute with such a field turn it back with ``nan_for_null``.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from typing import Any, Callable, Iterable, Mapping


def _fsync_dir(path: str) -> None:
    """Make a rename in ``path``'s directory durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_text_atomic(path: str, text: str) -> None:
    """tmp file + fsync + rename: readers see the old file or the whole new one, never half."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(path)


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite number (NaN, +-inf, numpy's too) replaced by None, recursively."""
    if isinstance(obj, numbers.Real) and not isinstance(obj, numbers.Integral):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, indent: int | None = None, sort_keys: bool = True, default: Callable | None = None,
          **kw) -> str:
    """Strict JSON: non-finite numbers become null (also those ``default`` returns); never ``NaN``."""
    strict_default = None if default is None else (lambda o: finite(default(o)))
    return json.dumps(finite(obj), indent=indent, sort_keys=sort_keys, default=strict_default, allow_nan=False, **kw)


def nan_for_null(record: Mapping, keys: Iterable[str]) -> dict:
    """A copy of ``record`` with the named fields that are null read back as NaN (for code computing with them)."""
    out = dict(record)
    for k in keys:
        if k in out and out[k] is None:
            out[k] = float("nan")
    return out


def write_json_atomic(path: str, obj: Any, indent: int | None = 1, default: Callable | None = None) -> None:
    write_text_atomic(path, dumps(obj, indent=indent, default=default) + "\n")


def write_jsonl_atomic(path: str, rows: Iterable[Any]) -> None:
    write_text_atomic(path, "".join(dumps(r) + "\n" for r in rows))


def append_jsonl(path: str, row: Any) -> None:
    """One line appended and fsynced: a crash can tear only this line (``read_jsonl`` drops it)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(dumps(row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str) -> list[Any]:
    """The rows of a JSONL log; a torn (unparsable or unterminated) last line is dropped with a warning.
    A damaged line elsewhere is not a crash artefact: it is dropped and reported too."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = fh.readlines()
    rows, bad = [], []
    for i, line in enumerate(lines):
        try:
            if not line.endswith("\n"):
                raise ValueError("unterminated")
            rows.append(json.loads(line))
        except ValueError:
            bad.append(i + 1)
    if bad:
        warnings.warn(f"{path}: dropped unreadable line(s) {bad} (a run stopped while writing it)", stacklevel=2)
    return rows


def read_jsonl_strict(path: str) -> list[tuple[int, Any]]:
    """(line number, object) for each non-empty line of a JSONL input (samples, labels): unlike a log, a line
    that is not JSON is an error naming the file and the line, not something to drop."""
    from booster_jax.errors import BoosterInputError

    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise BoosterInputError(f"{path} line {n}: not JSON ({e.msg})") from None
    return rows


def trim_jsonl(path: str, keep: Callable[[Any], bool]) -> None:
    """Rewrite a JSONL log atomically with only the rows ``keep`` accepts (and no torn line)."""
    if os.path.exists(path):
        write_jsonl_atomic(path, [r for r in read_jsonl(path) if keep(r)])


def read_json(path: str) -> tuple[Any, str | None]:
    """(object, None) or (None, why it could not be read) -- for callers that redo what is unreadable."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh), None
    except FileNotFoundError:
        return None, "missing"
    except (OSError, ValueError) as e:
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
