"""The Orbax stage store: resumable step checkpoints and the finished output of one pipeline stage.

Layout of ``stage_dir``::

    steps/<N>/state/   the TrainState pytree (Orbax StandardSave, OCDBT)
    steps/<N>/info/    JSON: step, data-stream positions, RNG key data, wall time, content checksum
    corrupt/<N>.<utc>  step checkpoints that failed to restore, moved aside (kept for inspection)
    final/state/       the stage's TrainState, for the next stage
    final/meta.json    resolved config, fingerprints, base model, tokenizer, metrics summary
    DONE               written last (atomic rename): {"fingerprint", "checksum", ...}

Why a content checksum: Orbax/TensorStore reject most damaged files (bad JSON, truncated
chunks, missing manifests), but a checkpoint is only trusted when the restored values hash to
what was saved. The hash is an integer reduction on device, so it is exact under any sharding
and costs one pass over the (small, LoRA) state.

Every process must call ``save``/``restore_latest``/``save_final``/``load_final`` (Orbax
saves and restores collectively); only process 0 writes the JSON/marker files and moves
directories.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import time
import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from booster_jax import files
from booster_jax.errors import BoosterInputError
from booster_jax.train import orbax_noise

FORMAT_VERSION = 1
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's unfinished-save directory suffix


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (damaged, unfinished) or a finished stage is stale."""


# ---------------------------------------------------------------- helpers

def is_main_process() -> bool:
    return jax.process_index() == 0


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _write_json_atomic(path: str, obj: Any) -> None:
    """tmp file + fsync + rename (``booster_jax.files``): readers see the old file or the whole new one."""
    files.write_json_atomic(path, obj, default=_json_default)


def _json_default(o):
    if isinstance(o, (np.generic, jax.Array)) and np.ndim(o) == 0:
        return np.asarray(o).item()
    if isinstance(o, (np.ndarray, jax.Array)):
        return np.asarray(o).tolist()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def _jsonable(obj: Any) -> Any:
    return json.loads(files.dumps(obj, default=_json_default))  # strict: a NaN is stored as null


def rng_to_json(key) -> dict:
    """A PRNG key (typed ``jax.random.key`` or raw uint32 ``PRNGKey``) as JSON-able raw data."""
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    data = np.asarray(jax.random.key_data(key))
    return {
        "data": data.reshape(-1).tolist(),
        "shape": list(data.shape),
        "dtype": str(data.dtype),
        "impl": str(jax.random.key_impl(key)) if typed else None,
    }


def rng_from_json(d: Mapping) -> jax.Array:
    """Inverse of ``rng_to_json``: the same kind of key, bit for bit."""
    data = jnp.asarray(np.asarray(d["data"], dtype=d.get("dtype", "uint32")).reshape(d["shape"]))
    if d.get("impl"):
        return jax.random.wrap_key_data(data, impl=d["impl"])
    return data


def abstract_like(tree):
    """ShapeDtypeStructs carrying each leaf's sharding: Orbax restores onto those (any mesh)."""

    def one(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x  # numpy arrays / python scalars: Orbax restores them as they are

    return jax.tree.map(one, tree)


def _leaf_digest(x):
    """(sum, position-weighted sum) of the leaf's bits as uint32, wrapping: order-free, hence exact."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        u = x.astype(jnp.uint32)
    elif x.dtype.itemsize >= 4:
        u = jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8-byte types gain a trailing dim of 2
    else:
        u = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]).astype(jnp.uint32)
    u = u.reshape(-1)
    w = jnp.arange(u.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
    return jnp.stack([jnp.sum(u, dtype=jnp.uint32), jnp.sum(u * w, dtype=jnp.uint32)])


_digest = jax.jit(lambda tree: [_leaf_digest(x) for x in jax.tree.leaves(tree)])


def state_checksum(tree) -> str:
    """A hex digest of every leaf's exact bits (and the leaf shapes/dtypes)."""
    leaves = jax.tree.leaves(tree)
    h = hashlib.sha256()
    for x in leaves:
        h.update(f"{tuple(np.shape(x))}{jnp.result_type(x)};".encode())
    if leaves:
        h.update(np.stack([np.asarray(d) for d in _digest(tree)]).tobytes())
    return h.hexdigest()[:32]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


class _Corrupt(Exception):
    pass


# ---------------------------------------------------------------- the store

class StageStore:
    """Step checkpoints and the final output of one stage under ``stage_dir``.

    ``fingerprint`` (optional): the stage's config fingerprint; it is written into every step
    checkpoint and a checkpoint written under another fingerprint is refused on restore, so a
    changed config never silently continues an old run (``clear()`` starts the stage over);
    ``also_accept``: older fingerprints whose checkpoints this stage may still resume (run.resume_diverged).
    ``checkpoint_every``: save every N steps (0 = only at the end of the stage).
    """

    STATE, INFO = "state", "info"

    def __init__(self, stage_dir: str, keep_last: int = 2, checkpoint_every: int = 100, *,
                 fingerprint: str | None = None, async_save: bool = False, also_accept=()):
        if keep_last < 1:
            raise BoosterInputError(f"run.keep_last: expected a value >= 1, got {keep_last}")
        if checkpoint_every < 0:
            raise BoosterInputError(f"run.checkpoint_every: expected a value >= 0, got {checkpoint_every}")
        self.stage_dir = os.path.abspath(stage_dir)
        self.keep_last = int(keep_last)
        self.checkpoint_every = int(checkpoint_every)
        self.fingerprint = fingerprint
        self.also_accept = tuple(also_accept)  # older fingerprints whose checkpoints may be resumed
        self.async_save = bool(async_save)
        self._mngr: ocp.CheckpointManager | None = None
        orbax_noise.install()  # before any write or read: a failed one's echoes race with its error reaching us

    @classmethod
    def from_run_config(cls, stage_dir: str, run_cfg, **kw) -> "StageStore":
        return cls(stage_dir, run_cfg.keep_last, run_cfg.checkpoint_every, **kw)

    # -- paths
    @property
    def steps_dir(self) -> str:
        return os.path.join(self.stage_dir, "steps")

    @property
    def final_dir(self) -> str:
        return os.path.join(self.stage_dir, "final")

    @property
    def done_path(self) -> str:
        return os.path.join(self.stage_dir, "DONE")

    @property
    def corrupt_dir(self) -> str:
        return os.path.join(self.stage_dir, "corrupt")

    def step_dir(self, step: int) -> str:
        return os.path.join(self.steps_dir, str(step))

    # -- the Orbax manager (created lazily, so a finished stage never touches steps/)
    @property
    def manager(self) -> ocp.CheckpointManager:
        if self._mngr is None:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=self.keep_last,
                create=True,
                cleanup_tmp_directories=True,  # unfinished saves of a killed run
                enable_async_checkpointing=self.async_save,
            )
            self._mngr = ocp.CheckpointManager(self.steps_dir, options=options,
                                               item_names=(self.STATE, self.INFO))
        return self._mngr

    def close(self) -> None:
        if self._mngr is not None:
            self._mngr.wait_until_finished()
            self._mngr.close()
            self._mngr = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps()) if os.path.isdir(self.steps_dir) else []

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        return self.checkpoint_every > 0 and step > 0 and step % self.checkpoint_every == 0

    # -- step checkpoints
    def save(self, step: int, state, *, rng=None, streams: Mapping[str, Mapping] | None = None,
             wall_time_s: float = 0.0, info: Mapping[str, Any] | None = None) -> None:
        """Checkpoint ``state`` after ``step`` steps with the JSON item (streams, rng, wall time, ``info``).

        Synchronous unless ``async_save``: the loop donates ``state`` to the next step, so its
        buffers must be written (or copied to host) before this returns.
        """
        record = {
            "format": FORMAT_VERSION,
            "step": int(step),
            "time": time.time(),
            "wall_time_s": float(wall_time_s),
            "rng": rng_to_json(rng) if rng is not None else None,
            "streams": _jsonable(dict(streams or {})),
            "fingerprint": self.fingerprint,
            "checksum": state_checksum(state),
            "info": _jsonable(dict(info or {})),
        }
        self.manager.save(int(step), args=ocp.args.Composite(**{
            self.STATE: ocp.args.StandardSave(state),
            self.INFO: ocp.args.JsonSave(record),
        }), force=True)
        if not self.async_save:
            self.manager.wait_until_finished()

    def wait(self) -> None:
        if self._mngr is not None:
            self._mngr.wait_until_finished()

    def _unfinished_saves(self) -> list[str]:
        if not os.path.isdir(self.steps_dir):
            return []
        return sorted(n for n in os.listdir(self.steps_dir) if TMP_SUFFIX in n)

    def restore_latest(self, target_state) -> tuple[Any, dict] | None:
        """(state, json) of the newest checkpoint that restores and verifies, or None if none was ever made.

        ``target_state``: a TrainState of arrays or ShapeDtypeStructs; the result takes its
        structure, dtypes and shardings. Damaged newer checkpoints are reported and moved to
        ``corrupt/``; if every checkpoint is damaged, ``BoosterInputError`` (nothing is moved).
        """
        self.wait()  # our own pending async save is not an "unfinished" one
        if self._mngr is not None:
            self._mngr.reload()  # the directory may have changed under a long-lived store
        unfinished = self._unfinished_saves()  # before the manager's cleanup removes them
        steps = sorted(self.all_steps(), reverse=True)
        if unfinished:
            warnings.warn(
                f"{self.steps_dir}: discarding unfinished checkpoint save(s) {unfinished} of an interrupted "
                f"run; " + (f"resuming from step {steps[0]}" if steps else "no finished checkpoint, the "
                            "stage starts from step 0"), CheckpointWarning, stacklevel=2)
        if not steps:
            return None
        abstract = abstract_like(target_state)
        failures: list[tuple[int, str]] = []
        for step in steps:
            try:
                state, record = self._restore_step(step, abstract)
            except _Corrupt as e:
                failures.append((step, str(e)))
                continue
            if failures:
                self._set_aside(failures, good=step)
            return state, record
        listing = "; ".join(f"step {s} ({self.step_dir(s)}): {msg}" for s, msg in failures)
        raise BoosterInputError(
            f"{self.steps_dir}: no usable checkpoint; every one failed to restore or verify: {listing}. "
            f"Nothing was deleted. What you can do: delete the stage directory {self.stage_dir} and rerun, "
            f"which runs this stage again from step 0; or copy the step checkpoints back from a backup into "
            f"{self.steps_dir} and rerun, which resumes from them.")

    def _restore_step(self, step: int, abstract) -> tuple[Any, dict]:
        try:
            record = self.manager.restore(step, args=ocp.args.Composite(**{self.INFO: ocp.args.JsonRestore()}))[
                self.INFO]
            if not isinstance(record, dict) or "checksum" not in record or "step" not in record:
                raise _Corrupt("the JSON item lacks 'step'/'checksum'")
        except _Corrupt:
            raise
        except Exception as e:  # noqa: BLE001 - any read/parse failure means an unusable checkpoint
            raise _Corrupt(f"cannot read its JSON item: {_first_line(e)}") from e
        if self.fingerprint is not None and record.get("fingerprint") not in (None, self.fingerprint,
                                                                                     *self.also_accept):
            raise BoosterInputError(
                f"{self.step_dir(step)}: checkpoint was written under config fingerprint "
                f"{str(record.get('fingerprint'))[:12]}..., this run has {self.fingerprint[:12]}...; the stage's "
                f"configuration changed. Call StageStore.clear() or delete {self.stage_dir} to re-run it.")
        if int(record["step"]) != step:
            raise _Corrupt(f"JSON says step {record['step']} but the directory is step {step}")
        try:
            state = self.manager.restore(step, args=ocp.args.Composite(**{
                self.STATE: ocp.args.StandardRestore(abstract)}))[self.STATE]
        except Exception as e:  # noqa: BLE001
            raise _Corrupt(f"cannot restore the state: {_first_line(e)}") from e
        got = state_checksum(state)
        if got != record["checksum"]:
            raise _Corrupt(f"restored values do not match the saved checksum ({got} != {record['checksum']})")
        return state, record

    def _set_aside(self, failures: list[tuple[int, str]], good: int) -> None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        moved = []
        if is_main_process():
            os.makedirs(self.corrupt_dir, exist_ok=True)
            for step, _ in failures:
                dest = os.path.join(self.corrupt_dir, f"{step}.{stamp}")
                os.replace(self.step_dir(step), dest)
                moved.append(dest)
        _barrier(f"booster_stage_store_set_aside_{good}")
        self.manager.reload()
        detail = "; ".join(f"step {s}: {msg}" for s, msg in failures)
        warnings.warn(
            f"{self.steps_dir}: newest checkpoint(s) damaged, falling back to step {good} "
            f"({self.step_dir(good)}). {detail}. Moved aside to {moved or self.corrupt_dir}.",
            CheckpointWarning, stacklevel=3)

    # -- the stage output
    def save_final(self, state, meta: Mapping[str, Any], fingerprint: str | None = None) -> None:
        """Write ``final/`` (state + meta.json) and then ``DONE`` last, so DONE implies a complete output.

        ``fingerprint``: defaults to ``meta['config_fingerprint']``, then ``meta['fingerprint']``,
        then the store's own.
        """
        fp = fingerprint or meta.get("config_fingerprint") or meta.get("fingerprint") or self.fingerprint
        if not fp:
            raise BoosterInputError(
                f"{self.stage_dir}: save_final needs a config fingerprint (argument, meta['config_fingerprint'] "
                "or StageStore(fingerprint=...))")
        self.wait()
        if is_main_process():
            if os.path.exists(self.done_path):
                os.remove(self.done_path)  # the old output stops counting before it is overwritten
            os.makedirs(self.final_dir, exist_ok=True)
        _barrier("booster_stage_store_final_begin")
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(self.final_dir, self.STATE), state, force=True)
        ckptr.wait_until_finished()
        ckptr.close()
        checksum = state_checksum(state)
        if is_main_process():
            _write_json_atomic(os.path.join(self.final_dir, "meta.json"), _jsonable(dict(meta)))
            _write_json_atomic(self.done_path, {"format": FORMAT_VERSION, "fingerprint": fp,
                                                "checksum": checksum, "time": time.time()})
        _barrier("booster_stage_store_final_done")

    def read_done(self) -> dict | None:
        """The DONE marker's JSON, or None if absent or unreadable."""
        try:
            with open(self.done_path, encoding="utf-8") as fh:
                done = json.load(fh)
            return done if isinstance(done, dict) else None
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None

    def is_done(self, fingerprint: str) -> bool:
        """True only if DONE exists and was written under ``fingerprint``; otherwise reports why not."""
        if not os.path.exists(self.done_path):
            return False
        done = self.read_done()
        if done is None:
            warnings.warn(f"{self.done_path}: DONE marker is unreadable; the stage will be re-run",
                          CheckpointWarning, stacklevel=2)
            return False
        if done.get("fingerprint") != fingerprint:
            warnings.warn(
                f"{self.stage_dir}: the stage finished under config fingerprint "
                f"{str(done.get('fingerprint'))[:12]}... but the current config has {str(fingerprint)[:12]}...; "
                "the stage's configuration changed and it will be re-run (StageStore.clear() removes the old "
                "output and checkpoints)", CheckpointWarning, stacklevel=2)
            return False
        return True

    def load_final(self, target) -> tuple[Any, dict]:
        """(state, meta) of a finished stage, restored onto ``target``'s structure and shardings."""
        done = self.read_done()
        if done is None:
            raise BoosterInputError(f"{self.stage_dir}: the stage has no finished output (no readable DONE marker)")
        state_dir = os.path.join(self.final_dir, self.STATE)
        try:
            ckptr = ocp.StandardCheckpointer()
            state = ckptr.restore(state_dir, abstract_like(target))
            ckptr.close()
            with open(os.path.join(self.final_dir, "meta.json"), encoding="utf-8") as fh:
                meta = json.load(fh)
        except Exception as e:  # noqa: BLE001
            raise BoosterInputError(
                f"{self.final_dir}: cannot load the stage output ({_first_line(e)}); delete {self.done_path} "
                "to rebuild it from the step checkpoints") from e
        if done.get("checksum") and state_checksum(state) != done["checksum"]:
            raise BoosterInputError(
                f"{state_dir}: restored values do not match the checksum in {self.done_path}; the output is "
                f"damaged. Delete {self.done_path} to rebuild it from the step checkpoints")
        return state, meta

    def clear(self) -> None:
        """Remove DONE, final/ and steps/ (for re-running a stage whose config changed). Keeps corrupt/."""
        self.close()
        if is_main_process():
            if os.path.exists(self.done_path):
                os.remove(self.done_path)
            for d in (self.final_dir, self.steps_dir):
                shutil.rmtree(d, ignore_errors=True)
        _barrier("booster_stage_store_clear")


__all__ = [
    "CheckpointWarning",
    "StageStore",
    "abstract_like",
    "is_main_process",
    "rng_from_json",
    "rng_to_json",
    "state_checksum",
]
