"""The training loop of one stage: resume, step, log, checkpoint; method-agnostic.

A run killed at any point and started again with the same arguments continues exactly:
the state, every batch stream's position and the RNG key are restored from the newest good
checkpoint, so the trainable weights end bitwise equal to an uninterrupted run.

Host syncs are kept off the per-step path: metrics are summed on device over the log window
(with the first non-finite step recorded on device too), and fetched only at log steps and
before checkpoint saves -- which is also where divergence is checked, so a NaN/inf is never
saved and the last good checkpoint survives.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from booster_jax import files, rundir
from booster_jax.errors import BoosterInputError
from booster_jax.train.checkpoint import StageStore, is_main_process, rng_from_json


class TrainingDivergedError(FloatingPointError):
    """A step produced a non-finite loss/metric; nothing from that step on was saved."""


def _init_window(metrics):
    zeros = jax.tree.map(lambda m: jnp.zeros((), jnp.float32), metrics)
    return {"sum": zeros, "bad_step": jnp.array(-1, jnp.int32), "bad": zeros}


@jax.jit
def _accumulate(window, metrics, step):
    """Add this step's metrics to the window sums; remember the first non-finite step and its metrics."""
    metrics = jax.tree.map(lambda m: jnp.asarray(m, jnp.float32).reshape(()), metrics)
    finite = jnp.all(jnp.stack([jnp.isfinite(m) for m in jax.tree.leaves(metrics)]))
    first = (window["bad_step"] < 0) & ~finite
    return {
        "sum": jax.tree.map(jnp.add, window["sum"], metrics),
        "bad_step": jnp.where(first, step, window["bad_step"]),
        "bad": jax.tree.map(lambda old, new: jnp.where(first, new, old), window["bad"], metrics),
    }


def _count_tokens(batches: Mapping[str, Mapping], tokens_key: str | None) -> int:
    keys = [tokens_key] if tokens_key is not None else list(batches)
    return int(sum(np.count_nonzero(np.asarray(batches[k]["attention_mask"])) for k in keys))  # packed: segment ids


def _trim_metrics_file(path: str, name: str, keep_upto: int) -> None:
    """Drop this stage's lines past the resume point (and a torn last line) so the log has no duplicates."""
    files.trim_jsonl(path, keep=lambda rec: not (rec.get("stage") == name and int(rec.get("step", 0)) > keep_upto))


def disk_full_error(name: str, store: StageStore, step: int, e: BaseException,
                    what: str | None = None) -> BoosterInputError:
    """The message for a checkpoint save that ran out of space: where, how much, what was kept."""
    good = store.latest_step()
    kept = f"step {good} ({store.step_dir(good)})" if good is not None else "none (no checkpoint yet)"
    need = rundir.dir_size(store.step_dir(good)) if good is not None else 0
    try:
        free = shutil.disk_usage(store.stage_dir).free
    except OSError:
        free = None
    return BoosterInputError(
        f"stage {name!r}: the disk is full: saving "
        + (what or f"the checkpoint of step {step} under {store.steps_dir}") + " failed "
        f"({str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__}). "
        + (f"{free / 2**20:.1f} MiB free there; " if free is not None else "")
        + (f"a checkpoint takes about {need / 2**20:.1f} MiB. " if need else "")
        + f"The last good checkpoint is {kept} and was kept; free some space and rerun to resume from it.")


def _summary(name, total_steps, start_step, wall_time_s, tokens, last_metrics) -> dict:
    return {
        "stage": name,
        "steps": int(total_steps),
        "resumed_from_step": int(start_step),
        "wall_time_s": float(wall_time_s),
        "tokens": int(tokens),
        "tokens_per_s": float(tokens / wall_time_s) if wall_time_s > 0 else 0.0,
        "steps_per_s": float(total_steps / wall_time_s) if wall_time_s > 0 else 0.0,
        "metrics": dict(last_metrics),
    }


def tensorboard_writer(stage_dir: str):
    """A TensorBoard writer for ``run.tensorboard`` (scalars beside metrics.jsonl, which stays the record)."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise BoosterInputError("run.tensorboard=true needs the tensorboardX package: pip install tensorboardX") \
            from None
    return SummaryWriter(os.path.join(stage_dir, "tensorboard"))


@dataclasses.dataclass(frozen=True)
class StepProgram:
    """How one training step runs on the devices; nothing here is about resuming or logging.

    ``fn(frozen, state, batches, rng) -> (state, metrics)`` is jitted once by ``run_stage`` with the
    state donated (the ``state`` passed in must not be used afterwards), plus ``jit_kwargs`` (e.g.
    ``in_shardings``/``out_shardings``: ``parallel.step_jit_kwargs``). ``place_batch(batches) ->
    batches`` puts each step's host batches on the devices (``parallel.batch_placer(mesh)`` shards
    them over the mesh); None = passed as they are.
    """

    fn: Callable
    jit_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    place_batch: Callable[[dict], dict] | None = None


@dataclasses.dataclass(frozen=True)
class Reporting:
    """What a stage says while it runs; none of it changes a weight, a batch or a checkpoint's state.

    ``metrics_path``: the JSONL of window means (None = none; with ``tensorboard`` also as scalars
    beside it). ``log_every``: the window, in steps; divergence is checked at these steps and before
    every save. ``progress``: a tqdm bar on a terminal, else a line per tenth of the stage.
    ``tokens_key``: the stream whose real tokens tokens/s counts (None = all).
    ``on_step(step, state, metrics)``: called after each step (and its checkpoint); the state it
    sees is donated to the next step, so it must not keep it.
    """

    metrics_path: str | None = None
    log_every: int = 10
    tensorboard: bool = False
    progress: bool = True
    tokens_key: str | None = None
    on_step: Callable[[int, Any, Any], None] | None = None

    @classmethod
    def for_run(cls, run_cfg, **kw) -> "Reporting":
        """The run config's ``log_every`` and ``tensorboard`` with the rest as given."""
        return cls(log_every=run_cfg.log_every, tensorboard=run_cfg.tensorboard, **kw)


class _Resumed(NamedTuple):
    step: int
    wall_time_s: float
    tokens: int
    last_metrics: dict


def _resume(name: str, store: StageStore, state, streams: Mapping[str, Any], rng, total_steps: int):
    """(state, rng, _Resumed) from the newest good checkpoint of ``store``, the streams moved to their saved
    positions; the inputs as they are (step 0) when the stage has none."""
    restored = store.restore_latest(state)
    if restored is None:
        return state, rng, _Resumed(0, 0.0, 0, {})
    state, record = restored
    info = record.get("info") or {}
    missing = [k for k in streams if k not in record.get("streams", {})]
    if missing:
        raise BoosterInputError(
            f"stage {name!r}: checkpoint {store.step_dir(record['step'])} has no position for stream(s) "
            f"{missing} (it has {sorted(record.get('streams', {}))})")
    for k, s in streams.items():
        s.restore(record["streams"][k])
    if record.get("rng") is None:
        raise BoosterInputError(f"stage {name!r}: checkpoint {store.step_dir(record['step'])} has no RNG key")
    start = int(record["step"])
    if start > total_steps:
        raise BoosterInputError(
            f"stage {name!r}: checkpoint {store.step_dir(start)} is at step {start}, past total_steps "
            f"{total_steps}; the schedule changed. Delete {store.stage_dir} to re-run the stage")
    if is_main_process():
        print(f"[{name}] resuming from step {start}/{total_steps} ({store.step_dir(start)})", file=sys.stderr)
    return state, rng_from_json(record["rng"]), _Resumed(start, float(record.get("wall_time_s", 0.0)),
                                                         int(info.get("tokens", 0)),
                                                         dict(info.get("last_metrics", {})))


def _check_finite(name: str, store: StageStore, window, step: int) -> None:
    """Raise ``TrainingDivergedError`` if the window holds a non-finite step, saying what a rerun does."""
    bad_step = int(window["bad_step"]) if window is not None else -1
    if bad_step >= 0:
        bad = {k: float(v) for k, v in jax.device_get(window["bad"]).items()}
        which = ", ".join(f"{k}={v}" for k, v in bad.items() if not np.isfinite(v))
        good = store.latest_step()
        raise TrainingDivergedError(
            f"stage {name!r}: non-finite {which} at step {bad_step} (checked at step {step}); stopped "
            f"without saving. The last good checkpoint is "
            + (f"step {good} ({store.step_dir(good)})" if good is not None else "none (no checkpoint yet)")
            + ". Lower the learning rate or check the data. What a rerun does: with the same settings it "
            + (f"resumes from step {good}" if good is not None else "starts again from step 0")
            + " and, with the same data and RNG, most likely diverges at the same step again; with changed "
            "optimizer settings (they are part of the stage's fingerprint) it starts this stage over from "
            "step 0 in a fresh directory, keeping this one aside; add run.resume_diverged=true to continue "
            "from the last good checkpoint with the new settings instead.")


class _Output:
    """Where a running stage's log lines go: metrics.jsonl (and TensorBoard), then a tqdm bar on a terminal
    or, without one (logs, CI), a line at every tenth of the stage. Process 0 only."""

    def __init__(self, name: str, report: Reporting, total_steps: int, start: int, main: bool):
        self.name, self.total_steps = name, total_steps
        self.path = report.metrics_path if main else None
        log_every = max(int(report.log_every), 1)
        self.milestone = max(total_steps // 10 // log_every * log_every, log_every)
        self.main = main
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            _trim_metrics_file(self.path, name, start)
            open(self.path, "a").close()  # the log exists from the stage's start, even before its first line
        self.board = tensorboard_writer(os.path.dirname(os.path.abspath(self.path))) \
            if self.path and report.tensorboard else None
        self.bar = None
        if main and report.progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start, desc=name, dynamic_ncols=True, file=sys.stderr)

    def log(self, step: int, metrics: dict, rates: dict) -> None:
        if self.path:  # appended and fsynced: a crash tears at most this line
            files.append_jsonl(self.path, {"stage": self.name, **metrics, "step": step, **rates})
        if self.board is not None:
            for k, v in {**metrics, **rates}.items():
                self.board.add_scalar(f"{self.name}/{k}", v, step)
        losses = {k: v for k, v in metrics.items() if "loss" in k}
        if self.bar is None and self.main and (step % self.milestone == 0 or step == self.total_steps):
            print(f"[{self.name}] step {step}/{self.total_steps} "
                  + " ".join(f"{k}={v:.4g}" for k, v in losses.items())
                  + f" {rates['steps_per_s']:.2f} it/s {rates['tokens_per_s']:.0f} tok/s", file=sys.stderr, flush=True)
        if self.bar is not None:
            self.bar.set_postfix(**{k: f"{v:.4g}" for k, v in losses.items()},
                                 **{"it/s": f"{rates['steps_per_s']:.2f}", "tok/s": f"{rates['tokens_per_s']:.0f}"},
                                 refresh=False)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
        if self.bar is not None:
            self.bar.close()


def run_stage(
    *,
    name: str,
    store: StageStore,
    program: StepProgram,
    frozen: Any,
    state: Any,
    streams: Mapping[str, Any],
    total_steps: int,
    rng: jax.Array,
    report: Reporting = Reporting(),
) -> tuple[Any, dict]:
    """Train ``state`` for ``total_steps`` steps of ``program`` -> (state, summary).

    ``store``: the stage's checkpoints, resumed from (the newest good one: state, every stream's
    position, the RNG key) and saved to (every ``store.checkpoint_every`` steps and at the end);
    it refuses a checkpoint of another fingerprint. ``streams``: name -> BatchStream
    (``next_batch``, ``state``, ``restore``). ``report``: logging, progress and the per-step hook.
    Raises ``TrainingDivergedError`` (a ``FloatingPointError``) on a non-finite metric, before
    saving anything from that step on.
    """
    if total_steps < 0:
        raise BoosterInputError(f"stage {name!r}: total_steps must be >= 0, got {total_steps}")
    if report.tokens_key is not None and report.tokens_key not in streams:
        raise BoosterInputError(f"stage {name!r}: tokens_key {report.tokens_key!r} is not a stream; have "
                                f"{sorted(streams)}")
    log_every = max(int(report.log_every), 1)
    main = is_main_process()

    state, rng, (start, wall_before, tokens_before, last_metrics) = _resume(name, store, state, streams, rng,
                                                                            total_steps)
    if start >= total_steps:
        return state, _summary(name, total_steps, start, wall_before, tokens_before, last_metrics)

    out = _Output(name, report, total_steps, start, main)
    jitted = jax.jit(program.fn, **{"donate_argnums": (1,), **dict(program.jit_kwargs)})
    t0 = time.perf_counter()
    tokens = tokens_before
    window, window_n, window_tokens, t_window = None, 0, 0, t0

    try:
        for i in range(start, total_steps):
            step = i + 1
            rng, step_rng = jax.random.split(rng)
            batches = {k: s.next_batch() for k, s in streams.items()}
            n_tok = _count_tokens(batches, report.tokens_key)  # on the host's global batch, before placement
            if program.place_batch is not None:  # scale-out: shard over the mesh (parallel.batch_placer)
                batches = program.place_batch(batches)
            state, metrics = jitted(frozen, state, batches, step_rng)
            if window is None:
                window = _init_window(metrics)
            window = _accumulate(window, metrics, jnp.int32(step))
            window_n += 1
            window_tokens += n_tok
            tokens += n_tok

            is_log = step % log_every == 0 or step == total_steps
            is_ckpt = store.should_save(step) or step == total_steps
            if is_log or is_ckpt:
                _check_finite(name, store, window, step)
            if is_log:
                sums = jax.device_get(window["sum"])
                now = time.perf_counter()
                dt = max(now - t_window, 1e-9)
                last_metrics = {k: float(v) / window_n for k, v in sums.items()}
                rates = {"steps_per_s": window_n / dt, "tokens_per_s": window_tokens / dt}
                out.log(step, last_metrics, rates)
                window = _init_window(metrics)
                window_n, window_tokens, t_window = 0, 0, now
            if is_ckpt:
                wall = wall_before + time.perf_counter() - t0
                try:
                    store.save(step, state, rng=rng, streams={k: s.state() for k, s in streams.items()},
                               wall_time_s=wall, info={"stage": name, "tokens": tokens,
                                                       "last_metrics": last_metrics})
                except Exception as e:  # noqa: BLE001 - only a full disk is turned into a user message
                    if not rundir.is_disk_full(e):
                        raise
                    raise disk_full_error(name, store, step, e) from None
            out.advance()
            if report.on_step is not None:
                report.on_step(step, state, metrics)
    finally:
        out.close()
        store.wait()

    wall = wall_before + time.perf_counter() - t0
    return state, _summary(name, total_steps, start, wall, tokens, last_metrics)


__all__ = ["Reporting", "StepProgram", "TrainingDivergedError", "disk_full_error", "run_stage"]
