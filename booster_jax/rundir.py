"""Who may write a run directory, and what a stage directory in it holds.

- ``claim_run_dir``: the output directory is checked (creatable, writable, empty or already ours: a
  marker file is written on first use) and locked for the run's lifetime, so two runs never write one
  directory at once. The lock is a file holding the owner's pid and host; a lock left by a dead
  process on this host (pid no longer alive) or one whose heartbeat stopped on another host (older
  than ``STALE_AFTER_S``) is stale and taken over. In a multi-process run only process 0 takes the
  lock and broadcasts the outcome, so every process refuses (or proceeds) together.
- ``claim_stage_dir``: the one fingerprint check of a stage (training or evaluation). The stage
  directory records the fingerprint of what it was made from; same -> reused/resumed; different or
  unreadable -> the old directory is moved aside (``<dir>.old-<utc>`` with a NOTE) and the stage
  runs into a fresh one, unless every record the stage wrote names this fingerprint (then only the
  file was damaged: it is rewritten, with a warning). Nothing is ever reused under another
  configuration or silently deleted.
"""

from __future__ import annotations

import datetime
import errno
import glob
import json
import logging
import os
import socket
import threading
import time
import warnings

from booster_jax import files
from booster_jax.errors import BoosterInputError

log = logging.getLogger(__name__)

MARKER = ".booster-jax-run"  # written on first use: the directory is the project's
LOCK = "run.lock"
FINGERPRINT = "fingerprint"
NOTE = "NOTE.txt"
OURS = {MARKER, LOCK, ".jax_cache"}  # may be present before the marker (the compilation cache)
# another run starting on the same directory at the same moment leaves these for an instant
TRANSIENT_PREFIXES = (f"{MARKER}.tmp-", f"{LOCK}.", ".write-test-")

HEARTBEAT_S = 30.0  # the lock file's mtime is refreshed this often while the run lives
STALE_AFTER_S = 600.0  # a lock from another host with no heartbeat for this long is stale


def _foreign(names) -> list[str]:
    """The entries that are not this project's (its marker, lock, cache and their in-flight temp files)."""
    return sorted(n for n in set(names) - OURS if not n.startswith(TRANSIENT_PREFIXES))


class RunLockedError(BoosterInputError):
    """Another live run is writing the output directory."""


class StageMovedAsideWarning(UserWarning):
    """A stage directory of another configuration (or unreadable) was moved aside, not reused."""


class FingerprintRepairedWarning(UserWarning):
    """A stage's damaged fingerprint file was rewritten from its records, which all name this configuration."""


def _utc_stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _process_index() -> int:
    import jax

    return jax.process_index()


def _process_count() -> int:
    import jax

    return jax.process_count()


def barrier(name: str) -> None:
    if _process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------------------------ the run dir

def check_output_dir(out: str) -> str:
    """The absolute run directory, created and writable, and empty or already a run directory."""
    if not out or not str(out).strip():
        raise BoosterInputError("run.output_dir: expected a directory path, got an empty value")
    path = os.path.abspath(out)
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        what = "is a file" if probe == path else f"lies under a file ({probe})"
        raise BoosterInputError(f"run.output_dir={out}: {what}, not a directory; choose another run.output_dir")
    try:
        os.makedirs(path, exist_ok=True)
        test = os.path.join(path, f".write-test-{os.getpid()}")
        with open(test, "w") as fh:
            fh.write("ok")
        os.remove(test)
    except OSError as e:
        raise BoosterInputError(f"run.output_dir={out}: cannot write there ({e.strerror or e}); choose a "
                                "writable run.output_dir") from None
    if not os.path.exists(os.path.join(path, MARKER)):
        found = _foreign(os.listdir(path))
        legacy = glob.glob(os.path.join(path, "align", "*", FINGERPRINT))  # a run dir made before the marker
        if found and not legacy:
            shown = ", ".join(found[:10]) + (f", ... ({len(found)} entries)" if len(found) > 10 else "")
            raise BoosterInputError(
                f"run.output_dir={out}: the directory is not empty and is not a booster-jax run directory "
                f"(no {MARKER} marker); found {shown}. Nothing was written; use an empty or new run.output_dir")
        files.write_text_atomic(os.path.join(path, MARKER), "booster-jax run directory\n")
    return path


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped by its parent) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), so a recycled pid is not mistaken for the owner."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class RunLock:
    """An exclusive lock file in a run directory (see the module docstring for the stale-lock rules)."""

    def __init__(self, run_dir: str, lock_path: str | None = None):
        self.run_dir = run_dir
        self.path = lock_path or os.path.join(run_dir, LOCK)
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid()),
                      "time": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _stale(self, holder, why) -> str | None:
        """Why the lock at ``self.path`` is stale, or None when its owner may still be running."""
        try:
            age = time.time() - os.path.getmtime(self.path)
        except FileNotFoundError:
            return "gone"
        if not isinstance(holder, dict) or "pid" not in holder:
            return f"unreadable lock ({why}), {age:.0f} s old" if age > STALE_AFTER_S else None
        if holder.get("host") == self.owner["host"]:
            pid = int(holder["pid"])
            if not _pid_alive(pid):
                return f"pid {pid} is not running"
            if holder.get("started") and _start_time(pid) not in (None, holder["started"]):
                return f"pid {pid} is another process now"
            return None
        return f"no heartbeat for {age:.0f} s" if age > STALE_AFTER_S else None

    def _message(self, holder) -> str:
        pid = holder.get("pid", "?") if isinstance(holder, dict) else "?"
        host = holder.get("host", "?") if isinstance(holder, dict) else "?"
        return (f"another run (pid {pid} on host {host}) is writing {self.run_dir}; wait for it or use another "
                "run.output_dir")

    def acquire(self) -> None:
        tmp = f"{self.path}.{os.getpid()}"
        files.write_json_atomic(tmp, self.owner)
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)  # atomic, whole content, fails if the lock exists
                    break
                except FileExistsError:
                    holder, why = files.read_json(self.path)
                    stale = self._stale(holder, why)
                    if stale is None:
                        raise RunLockedError(self._message(holder)) from None
                    self._break(holder, stale)
            else:
                raise RunLockedError(self._message(files.read_json(self.path)[0]))
        finally:
            os.remove(tmp)
        self._thread = threading.Thread(target=self._heartbeat, name="booster-run-lock", daemon=True)
        self._thread.start()

    def _break(self, holder, stale: str) -> None:
        """Take a stale lock out of the way; if another process replaced it meanwhile, put theirs back."""
        aside = f"{self.path}.stale-{os.getpid()}"
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        if files.read_json(aside)[0] != holder:
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            os.remove(aside)
            return
        os.remove(aside)
        log.warning("%s: took over a stale lock (%s)", self.path, stale)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder, _ = files.read_json(self.path)
        if isinstance(holder, dict) and holder.get("pid") == self.owner["pid"] and \
                holder.get("host") == self.owner["host"]:
            os.remove(self.path)


_HELD: dict[str, int] = {}  # run dirs this process holds -> nesting depth


class claim_run_dir:
    """Context manager: check, mark and lock the run directory (re-entrant within one process)."""

    def __init__(self, out: str):
        self.out = out
        self.lock: RunLock | None = None

    def __enter__(self) -> str:
        path = os.path.abspath(self.out) if self.out else ""
        if path and path in _HELD:
            _HELD[path] += 1
            self.path = path
            return path
        refusal = None
        if _process_index() == 0:
            try:
                path = check_output_dir(self.out)
                self.lock = RunLock(path)
                self.lock.acquire()
            except BoosterInputError as e:
                refusal = e
        if _process_count() > 1:
            import numpy as np
            from jax.experimental import multihost_utils

            failed = multihost_utils.broadcast_one_to_all(np.int32(refusal is not None))
            if int(failed) and refusal is None:
                raise BoosterInputError(f"process 0 could not claim run.output_dir={self.out}; see its log")
        if refusal is not None:
            raise refusal
        _HELD[path] = 1
        self.path = path
        return path

    def __exit__(self, *exc) -> None:
        path = self.path
        _HELD[path] -= 1
        if _HELD[path] == 0:
            del _HELD[path]
            if self.lock is not None:
                self.lock.release()


class shared_dir_lock:
    """Context manager for a directory shared by several runs (``run.cache_dir``): wait while another
    live run writes it (lock file ``<dir>.lock`` beside it), then hold it. Process 0 only."""

    def __init__(self, path: str, poll_s: float = 2.0):
        self.path, self.poll_s, self.lock = path, poll_s, None

    def __enter__(self):
        if _process_index() != 0:
            return self
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.lock = RunLock(self.path, lock_path=f"{os.path.abspath(self.path)}.lock")
        said = False
        while True:
            try:
                self.lock.acquire()
                return self
            except RunLockedError as e:
                if not said:
                    log.warning("%s; waiting (shared by runs through run.cache_dir)", e)
                    said = True
                time.sleep(self.poll_s)

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.release()


# ---------------------------------------------------------------------------------- stage dirs

def recorded_fingerprint(stage_dir: str) -> tuple[str | None, str | None]:
    """(fingerprint, None), or (None, why none can be read); (None, None) for an absent or empty dir."""
    if not os.path.isdir(stage_dir) or not [n for n in os.listdir(stage_dir) if ".tmp-" not in n]:
        return None, None  # absent, empty, or only a half-written first file
    path = os.path.join(stage_dir, FINGERPRINT)
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            return None, f"{path} is unreadable ({type(e).__name__})"
        return (text, None) if text else (None, f"{path} is empty")
    summary, why = files.read_json(os.path.join(stage_dir, "summary.json"))  # an evaluation made before
    if isinstance(summary, dict) and summary.get("fingerprint"):        # fingerprint files
        return str(summary["fingerprint"]), None
    return None, f"{stage_dir} holds files but no {FINGERPRINT} file"


def fingerprints_in_records(stage_dir: str) -> list[str]:
    """The fingerprints the stage's own records were written under, one per readable record: DONE, each
    step checkpoint's JSON item, an evaluation's summary.json and its generation log's header line.
    Unreadable records are left out (the stage store and the evaluation judge those themselves)."""
    found = []
    paths = [os.path.join(stage_dir, "DONE"), os.path.join(stage_dir, "summary.json")]
    paths += sorted(glob.glob(os.path.join(stage_dir, "steps", "*", "info", "metadata")))
    for path in paths:
        if ".orbax-checkpoint-tmp" in path:
            continue
        record, _ = files.read_json(path)
        if isinstance(record, dict) and record.get("fingerprint"):
            found.append(str(record["fingerprint"]))
    try:
        with open(os.path.join(stage_dir, "generations.jsonl"), encoding="utf-8") as fh:
            header = json.loads(fh.readline())
        if isinstance(header, dict) and header.get("fingerprint"):
            found.append(str(header["fingerprint"]))
    except (OSError, ValueError):
        pass
    return found


def claim_stage_dir(stage_dir: str, fingerprint: str) -> bool:
    """The one fingerprint check of a stage. True: the directory is this configuration's (reuse or
    resume it). False: it is fresh -- any other content was moved aside with a NOTE and a warning.

    A fingerprint file that disagrees (damaged, or of another configuration) while every record the
    stage wrote (``fingerprints_in_records``, at least one) names ``fingerprint``: the file is the one
    thing wrong, so it is rewritten with a warning and the stage resumes from its last good checkpoint."""
    found, problem = recorded_fingerprint(stage_dir)
    if found == fingerprint:
        return True
    records = fingerprints_in_records(stage_dir) if found is not None or problem is not None else []
    if records and set(records) == {fingerprint}:
        path = os.path.join(stage_dir, FINGERPRINT)
        was = problem or f"{path} says {found[:40]!r}"
        if _process_index() == 0:
            files.write_text_atomic(path, fingerprint)
        warnings.warn(f"{stage_dir}: {was}, but all {len(records)} record(s) the stage wrote (DONE, step "
                      f"checkpoints, evaluation summary) name this configuration's fingerprint {fingerprint[:16]}...; "
                      f"rewrote {path} and reusing the stage (it resumes from its last good checkpoint)",
                      FingerprintRepairedWarning, stacklevel=2)
        barrier(f"booster_repair_fingerprint_{os.path.basename(stage_dir)}")
        return True
    if found is not None or problem is not None:
        why = (f"it holds a run of another configuration (fingerprint {found[:16]}..., this run has "
               f"{fingerprint[:16]}...)" if found is not None else problem)
        dest = move_aside(stage_dir, why) if _process_index() == 0 else f"{stage_dir}.old-*"
        warnings.warn(f"{stage_dir}: {why}; moved it aside to {dest} (kept, not reused) and running the stage "
                      "into a fresh directory", StageMovedAsideWarning, stacklevel=2)
    if _process_index() == 0:
        os.makedirs(stage_dir, exist_ok=True)
        files.write_text_atomic(os.path.join(stage_dir, FINGERPRINT), fingerprint)
    barrier(f"booster_claim_stage_{os.path.basename(stage_dir)}")
    return False


def move_aside(stage_dir: str, why: str) -> str:
    """Rename ``stage_dir`` to ``<stage_dir>.old-<utc>`` with a NOTE saying why; returns the new path.
    Process 0 only; the caller synchronises the processes afterwards."""
    stamp = _utc_stamp()
    dest, n = f"{stage_dir}.old-{stamp}", 1
    while os.path.exists(dest):
        n += 1
        dest = f"{stage_dir}.old-{stamp}-{n}"
    os.replace(stage_dir, dest)
    files.write_text_atomic(os.path.join(dest, NOTE), (
        f"Moved aside from {stage_dir} at {stamp} by pid {os.getpid()} on {socket.gethostname()}:\n{why}.\n"
        "Nothing in this directory was reused; the stage ran again into a fresh directory. Delete this one "
        "when you no longer need it.\n"))
    return dest


def is_disk_full(e: BaseException) -> bool:
    """An OSError ENOSPC/EDQUOT, or a TensorStore/Orbax error that says so."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "No space left" in text or "Disk quota" in text


def dir_size(path: str) -> int:
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


__all__ = ["FingerprintRepairedWarning", "RunLock", "RunLockedError", "StageMovedAsideWarning", "check_output_dir",
           "claim_run_dir", "claim_stage_dir", "fingerprints_in_records", "recorded_fingerprint"]
