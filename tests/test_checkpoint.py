"""The stage store: step checkpoints, damaged-checkpoint fallback, DONE/fingerprint logic, NaN stop."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from booster_jax.config import RunConfig
from booster_jax.errors import BoosterInputError
from booster_jax.train import checkpoint as ckpt
from booster_jax.train.checkpoint import CheckpointWarning, StageStore, rng_from_json, rng_to_json
from booster_jax.train.loop import Reporting, StepProgram, TrainingDivergedError, run_stage
from tests import resume_worker as tiny


@pytest.fixture(scope="module")
def built():
    """One tiny stage; the step function is shared so every run_stage here reuses one compilation."""
    return tiny.build()


def fresh_state(built):
    frozen, state, *_ = built
    return jax.tree.map(jnp.array, state)  # a copy: run_stage donates what it is given


def bumped(state, k=1.0):
    """A different state with the same structure (every leaf + k)."""
    return jax.tree.map(lambda x: (x + k).astype(x.dtype), state)


def same(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return (jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb)
            and all(np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y) for x, y in zip(la, lb)))


def save_two(store, state):
    a, b = state, bumped(state)
    store.save(5, a, rng=jax.random.key(5), streams={"align": {"epoch": 0, "position": 20}}, wall_time_s=1.0)
    store.save(10, b, rng=jax.random.key(10), streams={"align": {"epoch": 1, "position": 0}}, wall_time_s=2.0)
    return a, b


# ----------------------------------------------------------------------------- save / restore


def test_save_restore_roundtrip(tmp_path, built):
    state = fresh_state(built)
    key = jax.random.key(42)
    with StageStore(str(tmp_path / "s"), keep_last=2, checkpoint_every=5, fingerprint="fp") as store:
        assert store.restore_latest(state) is None  # nothing saved yet
        store.save(5, state, rng=key, streams={"align": {"epoch": 2, "position": 8}}, wall_time_s=3.5,
                   info={"tokens": 123})
    # a new store (a new process) restores onto the target's structure, dtypes and shardings
    with StageStore(str(tmp_path / "s"), keep_last=2, checkpoint_every=5, fingerprint="fp") as store:
        restored, record = store.restore_latest(state)
    assert same(restored, state)
    assert type(restored) is type(state)
    for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert x.sharding == y.sharding
    assert record["step"] == 5 and record["streams"] == {"align": {"epoch": 2, "position": 8}}
    assert record["wall_time_s"] == 3.5 and record["info"] == {"tokens": 123} and record["fingerprint"] == "fp"
    back = rng_from_json(record["rng"])
    assert np.array_equal(jax.random.key_data(back), jax.random.key_data(key))
    assert jax.random.key_impl(back) == jax.random.key_impl(key)

    # abstract targets (ShapeDtypeStruct with sharding) work too: that is how another mesh restores
    abstract = ckpt.abstract_like(state)
    with StageStore(str(tmp_path / "s"), keep_last=2, checkpoint_every=5) as store:
        restored2, _ = store.restore_latest(abstract)
    assert same(restored2, state)


def test_rng_json_raw_key_roundtrip():
    raw = jax.random.PRNGKey(3)
    back = rng_from_json(json.loads(json.dumps(rng_to_json(raw))))
    assert back.dtype == raw.dtype and np.array_equal(back, raw)


def test_keep_last(tmp_path, built):
    state = fresh_state(built)
    with StageStore(str(tmp_path / "s"), keep_last=2, checkpoint_every=5) as store:
        for step in (5, 10, 15, 20):
            store.save(step, bumped(state, step), rng=jax.random.key(step))
        assert store.all_steps() == [15, 20]
        assert sorted(os.listdir(store.steps_dir)) == ["15", "20"]
        restored, record = store.restore_latest(state)
    assert record["step"] == 20 and same(restored, bumped(state, 20))
    assert StageStore(str(tmp_path / "x"), checkpoint_every=5).should_save(10)
    assert not StageStore(str(tmp_path / "x"), checkpoint_every=0).should_save(10)


# ----------------------------------------------------------------------------- damaged checkpoints


def _files(d, exclude=("commit_success.txt",)):
    out = []
    for root, _, names in os.walk(d):
        out += [os.path.join(root, n) for n in names if n not in exclude]
    return out


def damage(step_dir, how):
    if how in ("garble_data", "garble_metadata"):  # flip bytes in the middle of the file
        if how == "garble_data":  # the largest file of the OCDBT store the restore reads (state/d/)
            f = max(_files(os.path.join(step_dir, "state", "d")), key=os.path.getsize)
        else:
            f = os.path.join(step_dir, "state", "_METADATA")
        data = bytearray(open(f, "rb").read())
        mid = len(data) // 2
        for i in range(mid, min(mid + 64, len(data))):
            data[i] ^= 0xA5
        open(f, "wb").write(bytes(data))
    elif how == "truncate_json":
        (f,) = _files(os.path.join(step_dir, "info"))
        data = open(f, "rb").read()
        open(f, "wb").write(data[: len(data) // 2])
    elif how == "truncate_data":
        for f in _files(os.path.join(step_dir, "state")):
            if os.path.getsize(f) > 200:
                open(f, "r+b").truncate(os.path.getsize(f) // 3)
    elif how == "missing_metadata":
        os.remove(os.path.join(step_dir, "state", "_METADATA"))
    elif how == "missing_state":
        shutil.rmtree(os.path.join(step_dir, "state"))
    elif how == "empty_dir":
        shutil.rmtree(step_dir)
        os.makedirs(step_dir)
    elif how == "wrong_checksum":  # values that parse fine but are not what was saved
        (f,) = _files(os.path.join(step_dir, "info"))
        rec = json.load(open(f))
        rec["checksum"] = "0" * 32
        json.dump(rec, open(f, "w"))
    else:
        raise AssertionError(how)


HOW = ["garble_data", "garble_metadata", "truncate_json", "truncate_data", "missing_metadata", "missing_state", "empty_dir",
       "wrong_checksum"]


@pytest.mark.parametrize("how", HOW)
def test_corrupt_latest_falls_back_with_warning(tmp_path, built, how):
    state = fresh_state(built)
    store = StageStore(str(tmp_path / "s"), keep_last=3, checkpoint_every=5)
    a, _ = save_two(store, state)
    store.close()
    damage(store.step_dir(10), how)

    store = StageStore(str(tmp_path / "s"), keep_last=3, checkpoint_every=5)
    with pytest.warns(CheckpointWarning) as rec:
        restored, record = store.restore_latest(state)
    msg = " ".join(str(w.message) for w in rec)
    assert store.steps_dir in msg and "falling back to step 5" in msg and "step 10" in msg
    assert record["step"] == 5 and record["streams"]["align"] == {"epoch": 0, "position": 20}
    assert same(restored, a)
    # the damaged one is kept for inspection, out of the way of the resumed run
    assert [n.split(".")[0] for n in os.listdir(store.corrupt_dir)] == ["10"]
    assert store.all_steps() == [5]
    store.save(10, bumped(state, 7), rng=jax.random.key(1))  # the resumed run can write step 10 again
    restored, record = store.restore_latest(state)
    assert record["step"] == 10 and same(restored, bumped(state, 7))
    store.close()


def test_silent_bit_flip_is_caught_by_the_checksum(tmp_path, built):
    """One flipped bit in a large (incompressible) array chunk restores without any Orbax error."""
    big = np.random.RandomState(0).randn(64, 64).astype(np.float32)  # 16 KiB: stored out of line
    state = fresh_state(built)._replace(extra={"big": jnp.asarray(big)})
    store = StageStore(str(tmp_path / "s"), keep_last=3, checkpoint_every=5)
    a, _ = save_two(store, state)
    store.close()
    f = max(_files(os.path.join(store.step_dir(10), "state")), key=os.path.getsize)
    data = bytearray(open(f, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(f, "wb").write(bytes(data))
    store = StageStore(str(tmp_path / "s"), keep_last=3, checkpoint_every=5)
    with pytest.warns(CheckpointWarning, match="do not match the saved checksum"):
        restored, record = store.restore_latest(state)
    assert record["step"] == 5 and same(restored, a)
    store.close()


def test_all_corrupt_is_a_clear_error(tmp_path, built):
    state = fresh_state(built)
    store = StageStore(str(tmp_path / "s"), keep_last=3, checkpoint_every=5)
    save_two(store, state)
    store.close()
    damage(store.step_dir(10), "garble_data")
    damage(store.step_dir(5), "truncate_json")
    store = StageStore(str(tmp_path / "s"), keep_last=3, checkpoint_every=5)
    with pytest.raises(BoosterInputError, match="no usable checkpoint") as e:
        store.restore_latest(state)
    assert store.steps_dir in str(e.value) and "step 10" in str(e.value) and "step 5" in str(e.value)
    assert sorted(os.listdir(store.steps_dir)) == ["10", "5"]  # nothing moved or deleted
    store.close()


# (scenario, what a user is told on stderr, whether Orbax floods stderr without the guard)
FAILURES = {
    "save": (["error: ValueError: OUT_OF_RANGE: ", "File too large", "steps/2.orbax-checkpoint-tmp"], True),
    "final": (["error: ValueError: OUT_OF_RANGE: ", "File too large", "final/state.orbax-checkpoint-tmp"], True),
    "restore": (["error: BoosterInputError: ", "no usable checkpoint", "Nothing was deleted"], True),
    "fallback": (["warning: ", "newest checkpoint(s) damaged, falling back to step 1"], True),
    "verify": (["error: BoosterInputError: ", "do not match the saved checksum"], False),
    "load_final": (["error: BoosterInputError: ", "cannot load the stage output"], True),
}


def run_failure_worker(scenario, stage_dir, *flags):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "tests.checkpoint_failure_worker", scenario, str(stage_dir), *flags],
                          capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("scenario", sorted(FAILURES))
def test_a_failed_checkpoint_write_or_read_prints_one_line_through_interpreter_exit(tmp_path, scenario):
    """Issue 29 item 1: every failure path of the stage store (step save, final write, restore, fallback,
    checksum verify, final load), each in its own interpreter, stderr captured until it exits: exactly the
    one error (or warning) line. The control runs the same failure with the guard off and sees Orbax's
    echoes flood stderr (closed-loop tracebacks, abandoned coroutines at exit, logged worker errors)."""
    pieces, floods = FAILURES[scenario]
    guarded = run_failure_worker(scenario, tmp_path / "guarded")
    assert guarded.returncode == 0, guarded.stderr[-3000:]
    lines = guarded.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(pieces[0]), guarded.stderr[:6000]
    assert all(p in lines[0] for p in pieces), lines[0]
    assert "Traceback" not in guarded.stderr
    if scenario == "fallback":
        assert guarded.stdout.strip() == "restored step 1"
    if floods:
        control = run_failure_worker(scenario, tmp_path / "unguarded", "--unguarded")
        assert control.returncode == 0, control.stderr[-3000:]
        # a failed write: at least Orbax's two worker threads log it with a traceback (more when the failure
        # hits array data rather than the first metadata write); a failed read: a traceback per abandoned read
        assert control.stderr.count("Traceback") >= (2 if scenario in ("save", "final") else 5), control.stderr[:3000]
        if scenario in ("restore", "fallback", "load_final"):  # the shutdown-time flood
            assert control.stderr.count("Exception ignored in: <coroutine object _read_array_index_and_device_put"
                                        ) >= 5, control.stderr[-3000:]


def test_the_noise_guard_lets_other_errors_through():
    """The guard drops only Orbax's echoes: an unrelated 'Event loop is closed' raised by Python code, a
    coroutine of our own, and asyncio/absl records that do not come from Orbax are left alone."""
    import asyncio
    import logging
    import sys
    import types

    from booster_jax.train import orbax_noise

    orbax_noise.install()
    try:
        raise RuntimeError("Event loop is closed")
    except RuntimeError as e:
        ours = e
    assert not orbax_noise.closed_loop_callback(ours)  # raised by Python code, not a native callback
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as e:
        direct = e
    assert not orbax_noise.closed_loop_callback(direct)  # called from this test's frame: not native code

    @types.coroutine
    def pending():
        yield

    async def mine():
        try:
            await pending()
        except BaseException as e:
            raise ValueError("mine") from e

    coro = mine()
    coro.send(None)
    try:
        coro.close()
    except ValueError as e:
        closed_err = e
    assert not orbax_noise.abandoned_orbax_coroutine(types.SimpleNamespace(object=coro, exc_value=closed_err))

    def record(name, msg, path=__file__):
        return logging.LogRecord(name, logging.ERROR, path, 1, msg, None, None)

    assert not orbax_noise.is_noise_record(record("asyncio", "Task exception was never retrieved\nfuture: <Task "
                                                             "coro=<mine() defined at /home/me/x.py:3>>"))
    assert not orbax_noise.is_noise_record(record("absl", "_SignalingThread.run() raised an exception: x"))
    assert orbax_noise.is_noise_record(record("absl", "_SignalingThread.run() raised an exception: x",
                                              orbax_noise.ORBAX_DIR + "_src/futures/future.py"))
    assert orbax_noise.is_noise_record(record("asyncio", "Task was destroyed but it is pending!\ntask: <Task "
                                                         f"coro=<f() defined at {orbax_noise.ORBAX_DIR}x.py:1>>"))
    try:
        raise ValueError("OUT_OF_RANGE: raised by Python code")
    except ValueError as e:
        python_error = e
    unretrieved = record("asyncio", "Future exception was never retrieved\nfuture: <Future finished>")
    unretrieved.exc_info = (ValueError, python_error, python_error.__traceback__)
    assert not orbax_noise.is_noise_record(unretrieved)
    native = ValueError("OUT_OF_RANGE: Error writing \"w1/0.0\" in OCDBT database")  # as TensorStore sets it
    unretrieved.exc_info = (ValueError, native, None)
    assert orbax_noise.is_noise_record(unretrieved)
    assert getattr(sys.excepthook, "_booster_orbax_noise") and getattr(sys.unraisablehook, "_booster_orbax_noise")

    # a coroutine collected before it ran: Orbax's is dropped (the flaky one-line check's second line), ours warns
    import gc
    import warnings

    from orbax.checkpoint._src.serialization import serialization

    async def never_run():
        pass

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        orbax_coro = serialization.async_serialize_from_host(None, {})  # only created: nothing of it runs
        del orbax_coro
        our_coro = never_run()
        del our_coro
        gc.collect()
    assert [str(w.message) for w in seen] == [f"coroutine '{never_run.__qualname__}' was never awaited"]


def test_unfinished_save_is_ignored_with_warning(tmp_path, built):
    state = fresh_state(built)
    store = StageStore(str(tmp_path / "s"), keep_last=3, checkpoint_every=5)
    _, b = save_two(store, state)
    store.close()
    # what a run killed during Orbax's save leaves: a half-written temporary directory
    tmp = os.path.join(store.steps_dir, "15" + ckpt.TMP_SUFFIX + "-1234")
    shutil.copytree(store.step_dir(10), tmp)
    damage(tmp, "truncate_data")
    store = StageStore(str(tmp_path / "s"), keep_last=3, checkpoint_every=5)
    with pytest.warns(CheckpointWarning, match="unfinished"):
        restored, record = store.restore_latest(state)
    assert record["step"] == 10 and same(restored, b)
    store.close()


def test_checkpoint_of_another_config_is_refused(tmp_path, built):
    state = fresh_state(built)
    with StageStore(str(tmp_path / "s"), checkpoint_every=5, fingerprint="old") as store:
        store.save(5, state, rng=jax.random.key(0))
    with StageStore(str(tmp_path / "s"), checkpoint_every=5, fingerprint="new") as store:
        with pytest.raises(BoosterInputError, match="configuration changed"):
            store.restore_latest(state)
        store.clear()  # the caller's decision: re-run the stage from scratch
        assert store.restore_latest(state) is None


# ----------------------------------------------------------------------------- final output and DONE


def test_final_done_and_fingerprint(tmp_path, built, monkeypatch):
    state = fresh_state(built)
    store = StageStore(str(tmp_path / "s"), checkpoint_every=5)
    assert not store.is_done("fp1")
    with pytest.raises(BoosterInputError, match="no finished output"):
        store.load_final(state)

    order = []
    real_write = ckpt._write_json_atomic

    def spy(path, obj):
        order.append((os.path.basename(path), os.path.isdir(os.path.join(store.final_dir, "state"))))
        real_write(path, obj)

    monkeypatch.setattr(ckpt, "_write_json_atomic", spy)
    meta = {"config": {"align": {"method": "sft"}}, "config_fingerprint": "fp1", "base_model": "tiny",
            "metrics": {"loss": 1.25}}
    store.save_final(state, meta)
    assert order == [("meta.json", True), ("DONE", True)]  # DONE last, after the state is complete
    assert store.is_done("fp1")
    assert json.load(open(store.done_path))["fingerprint"] == "fp1"

    with pytest.warns(CheckpointWarning, match="configuration changed"):
        assert not store.is_done("fp2")
    loaded, meta_back = store.load_final(ckpt.abstract_like(state))
    assert same(loaded, state) and meta_back == meta

    # re-running under a new config overwrites the output and moves DONE to the new fingerprint
    store.save_final(bumped(state), {**meta, "config_fingerprint": "fp2"})
    assert store.is_done("fp2") and not os.path.exists(store.done_path + ".tmp")
    loaded, _ = store.load_final(state)
    assert same(loaded, bumped(state))

    # a crash between final/ and DONE: the stage does not count as done
    os.remove(store.done_path)
    assert not store.is_done("fp2")
    # a garbled DONE is reported, not trusted
    open(store.done_path, "w").write("{garbled")
    with pytest.warns(CheckpointWarning, match="unreadable"):
        assert not store.is_done("fp2")
    store.clear()
    assert not os.path.exists(store.final_dir) and not os.path.exists(store.done_path)


def test_final_checksum_mismatch_is_an_error(tmp_path, built):
    state = fresh_state(built)
    store = StageStore(str(tmp_path / "s"), checkpoint_every=5)
    store.save_final(state, {"config_fingerprint": "fp"})
    done = json.load(open(store.done_path))
    json.dump({**done, "checksum": "f" * 32}, open(store.done_path, "w"))
    with pytest.raises(BoosterInputError, match="damaged"):
        store.load_final(state)


# ----------------------------------------------------------------------------- the loop


def run_cfg(every, log_every):
    return dataclasses.replace(RunConfig(), checkpoint_every=every, keep_last=3, log_every=log_every)


@pytest.mark.parametrize("log_every", [2, 100])  # 100: only the pre-save check can catch it
def test_nan_loss_stops_the_stage_and_keeps_the_last_good_checkpoint(tmp_path, built, log_every):
    frozen, _, step_fn, _, rng = built
    frozen = {**frozen, "nan_at": jnp.int32(7)}
    store = StageStore(str(tmp_path / "s"), keep_last=3, checkpoint_every=5)
    metrics_path = str(tmp_path / "metrics.jsonl")
    with pytest.raises(TrainingDivergedError) as e:
        run_stage(name="tiny", store=store, program=StepProgram(step_fn, tiny.JIT_KWARGS), frozen=frozen,
                  state=fresh_state(built), streams=tiny.make_streams(), total_steps=12, rng=rng,
                  report=Reporting.for_run(run_cfg(5, log_every), metrics_path=metrics_path, progress=False))
    msg = str(e.value)
    assert isinstance(e.value, FloatingPointError)
    assert "stage 'tiny'" in msg and "at step 7" in msg and "loss=nan" in msg
    assert "step 5" in msg and store.step_dir(5) in msg
    assert store.all_steps() == [5]  # nothing saved at or after the NaN
    restored, record = store.restore_latest(fresh_state(built))
    assert record["step"] == 5 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored))
    logged = [json.loads(l)["step"] for l in open(metrics_path)]
    assert logged == ([2, 4, 6] if log_every == 2 else [])
    store.close()


def test_run_stage_summary_metrics_and_finished_rerun(tmp_path, built):
    frozen, _, step_fn, _, rng = built
    store = StageStore(str(tmp_path / "s"), keep_last=2, checkpoint_every=4)
    metrics_path = str(tmp_path / "m" / "metrics.jsonl")
    kw = dict(name="tiny", store=store, program=StepProgram(step_fn, tiny.JIT_KWARGS), frozen=frozen,
              total_steps=10, rng=rng, report=Reporting.for_run(run_cfg(4, 3), metrics_path=metrics_path,
                                                                tokens_key="align", progress=False))
    streams = tiny.make_streams()
    state, summary = run_stage(state=fresh_state(built), streams=streams, **kw)
    assert int(state.step) == 10 and store.all_steps() == [8, 10]
    lines = [json.loads(l) for l in open(metrics_path)]
    assert [l["step"] for l in lines] == [3, 6, 9, 10]
    assert {"loss", "grad_norm", "steps_per_s", "tokens_per_s", "stage"} <= set(lines[0])
    assert summary["steps"] == 10 and summary["metrics"]["loss"] == pytest.approx(lines[-1]["loss"])
    assert summary["tokens"] == streams["align"].real_tokens and summary["tokens_per_s"] > 0
    # a finished stage run again restores and returns at once, with the same numbers
    state2, summary2 = run_stage(state=fresh_state(built), streams=tiny.make_streams(), **kw)
    assert same(state2, state) and summary2["metrics"] == summary["metrics"]
    assert summary2["tokens"] == summary["tokens"] and summary2["resumed_from_step"] == 10
    assert len(open(metrics_path).readlines()) == 4
    store.close()


# ----------------------------------------------------------------------------- the run directory (issue 15)

import errno  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

from booster_jax import files, rundir  # noqa: E402


def _write_lock(d, **holder):
    json.dump(holder, open(os.path.join(d, rundir.LOCK), "w"))


def test_run_lock_refuses_a_live_owner_and_takes_over_stale_ones(tmp_path):
    d = str(tmp_path / "run")
    os.makedirs(d)
    host = socket.gethostname()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _write_lock(d, pid=sleeper.pid, host=host, started=rundir._start_time(sleeper.pid))
        expected = f"another run (pid {sleeper.pid} on host {host}) is writing {d}; wait for it or use another " \
                   "run.output_dir"
        with pytest.raises(rundir.RunLockedError, match=re.escape(expected)):
            rundir.RunLock(d).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    # the owner died (same host, pid not alive): the lock is stale and taken over
    lock = rundir.RunLock(d)
    lock.acquire()
    assert json.load(open(os.path.join(d, rundir.LOCK)))["pid"] == os.getpid()
    with pytest.raises(rundir.RunLockedError, match=f"pid {os.getpid()} on host"):  # held: a second claim fails
        rundir.RunLock(d).acquire()
    lock.release()
    assert not os.path.exists(os.path.join(d, rundir.LOCK))
    # a recycled pid (alive, but another process since: different start time) does not hold the lock
    _write_lock(d, pid=os.getpid(), host=host, started="not-this-process")
    lock = rundir.RunLock(d)
    lock.acquire()
    lock.release()
    # another host: its pid cannot be checked, so the lock is live until its heartbeat is STALE_AFTER_S old
    _write_lock(d, pid=1, host="some-other-host")
    with pytest.raises(rundir.RunLockedError, match="pid 1 on host some-other-host"):
        rundir.RunLock(d).acquire()
    old = time.time() - rundir.STALE_AFTER_S - 5
    os.utime(os.path.join(d, rundir.LOCK), (old, old))
    lock = rundir.RunLock(d)
    lock.acquire()
    lock.release()


def test_output_dir_check_ignores_another_starting_runs_temp_files(tmp_path):
    """Two runs started at once on one new directory: the one that looks second may see the first's
    half-written marker, lock or write probe; that is a run starting, not a user's directory (the race
    CI hit under load), so the lock decides who refuses, not this check."""
    out = tmp_path / "racing"
    out.mkdir()
    for name in (f"{rundir.MARKER}.tmp-4242", f"{rundir.LOCK}.4242", ".write-test-4242"):
        (out / name).write_text("in flight\n")
    assert rundir.check_output_dir(str(out)) == str(out)
    assert (out / rundir.MARKER).exists()
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.tmp-1").write_text("a user's file\n")  # only our own prefixes are ignored
    with pytest.raises(BoosterInputError, match="notes.tmp-1"):
        rundir.check_output_dir(str(tmp_path / "user"))


def test_output_dir_must_be_ours_writable_and_a_directory(tmp_path, monkeypatch):
    user = tmp_path / "mine"
    user.mkdir()
    for name in ("config.yaml", "report.md", "summaries.json"):
        (user / name).write_text("the user's own\n")
    with pytest.raises(BoosterInputError, match="not a booster-jax run directory") as e:
        rundir.check_output_dir(str(user))
    assert all(n in str(e.value) for n in ("config.yaml", "report.md", "summaries.json"))
    assert sorted(os.listdir(user)) == ["config.yaml", "report.md", "summaries.json"]  # nothing written
    assert all((user / n).read_text() == "the user's own\n" for n in os.listdir(user))

    fresh = tmp_path / "fresh"
    assert rundir.check_output_dir(str(fresh)) == str(fresh)
    assert (fresh / rundir.MARKER).exists()
    (fresh / "summaries.json").write_text("{}")
    rundir.check_output_dir(str(fresh))  # ours: a non-empty run directory is fine

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(BoosterInputError, match="is a file, not a directory"):
        rundir.check_output_dir(str(a_file))
    with pytest.raises(BoosterInputError, match="lies under a file"):
        rundir.check_output_dir(str(a_file / "run"))
    with pytest.raises(BoosterInputError, match="run.output_dir: expected a directory path"):
        rundir.check_output_dir("")

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(rundir.os, "makedirs", denied)
    with pytest.raises(BoosterInputError, match="cannot write there \\(Permission denied\\)"):
        rundir.check_output_dir(str(tmp_path / "ro" / "run"))


def test_claim_run_dir_is_reentrant_and_releases(tmp_path):
    d = str(tmp_path / "run")
    with rundir.claim_run_dir(d):
        with rundir.claim_run_dir(d):  # the pipeline inside run.py's claim
            assert os.path.exists(os.path.join(d, rundir.LOCK))
        assert os.path.exists(os.path.join(d, rundir.LOCK))
    assert not os.path.exists(os.path.join(d, rundir.LOCK))


@pytest.mark.parametrize("bad", ["garbage", "other-config", "binary", "empty"])
def test_a_stage_of_another_or_unreadable_fingerprint_is_moved_aside_never_deleted(tmp_path, built, bad):
    """The stage's records (its step checkpoints) were written under another configuration ("fp-other"),
    so whatever the fingerprint file holds, the directory is not this run's."""
    state = fresh_state(built)
    stage = str(tmp_path / "finetune" / "tag")
    assert rundir.claim_stage_dir(stage, "fp-other") is False  # fresh
    with StageStore(stage, checkpoint_every=5, fingerprint="fp-other") as store:
        save_two(store, state)
    assert rundir.claim_stage_dir(stage, "fp-other") is True  # ours: reuse / resume
    fp_file = os.path.join(stage, rundir.FINGERPRINT)
    content = {"garbage": b"\x00garbage\n", "other-config": b"fp-other", "binary": b"\xff\xfe\x80", "empty": b""}[bad]
    open(fp_file, "wb").write(content)
    with pytest.warns(rundir.StageMovedAsideWarning, match="moved it aside") as w:
        assert rundir.claim_stage_dir(stage, "fp-current") is False
    (old,) = [p for p in os.listdir(tmp_path / "finetune") if p.startswith("tag.old-")]
    old = os.path.join(tmp_path, "finetune", old)
    assert old in str(w[0].message)
    assert sorted(os.listdir(os.path.join(old, "steps"))) == ["10", "5"]  # the good checkpoints are kept
    assert open(os.path.join(old, rundir.FINGERPRINT), "rb").read() == content
    note = open(os.path.join(old, rundir.NOTE)).read()
    assert "Nothing in this directory was reused" in note
    assert os.listdir(stage) == [rundir.FINGERPRINT] and open(fp_file).read() == "fp-current"
    with StageStore(old, checkpoint_every=5, fingerprint="fp-other") as store:  # still restorable
        _, record = store.restore_latest(state)
    assert record["step"] == 10


@pytest.mark.parametrize("bad", ["garbage", "binary", "empty", "missing", "another-value"])
def test_a_damaged_fingerprint_file_is_repaired_from_the_stages_records(tmp_path, built, bad):
    """Issue 29 item 2: only the fingerprint file is damaged; every step checkpoint says it was written under
    this configuration, so the file is rewritten with a warning and the stage resumes from step 10."""
    state = fresh_state(built)
    stage = str(tmp_path / "finetune" / "tag")
    assert rundir.claim_stage_dir(stage, "fp-current") is False
    with StageStore(stage, checkpoint_every=5, fingerprint="fp-current") as store:
        _, b = save_two(store, state)
    fp_file = os.path.join(stage, rundir.FINGERPRINT)
    if bad == "missing":
        os.remove(fp_file)
    else:
        open(fp_file, "wb").write({"garbage": b"\x13garbage\xff"[:-1], "binary": b"\x13garbage\xff",
                                   "empty": b"", "another-value": b"0123456789abcdef"}[bad])
    with pytest.warns(rundir.FingerprintRepairedWarning) as w:
        assert rundir.claim_stage_dir(stage, "fp-current") is True
    msg = str(w[0].message)
    assert "all 2 record(s)" in msg and "rewrote " + fp_file in msg and "resumes from its last good" in msg
    assert open(fp_file).read() == "fp-current"
    assert not [p for p in os.listdir(tmp_path / "finetune") if ".old-" in p]  # nothing moved aside
    with StageStore(stage, checkpoint_every=5, fingerprint="fp-current") as store:
        restored, record = store.restore_latest(state)
    assert record["step"] == 10 and same(restored, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rundir.claim_stage_dir(stage, "fp-current") is True  # repaired: no warning any more


def test_a_damaged_fingerprint_file_with_no_or_mixed_records_still_moves_the_stage_aside(tmp_path, built):
    """Repair needs evidence: a stage with no readable record, or with records of two configurations (a
    diverged stage adopted under new optimizer settings), is moved aside as before."""
    state = fresh_state(built)
    bare = str(tmp_path / "bare")
    rundir.claim_stage_dir(bare, "fp-current")
    open(os.path.join(bare, "metrics.jsonl"), "w").write("{}\n")
    open(os.path.join(bare, rundir.FINGERPRINT), "wb").write(b"\xff")
    with pytest.warns(rundir.StageMovedAsideWarning):
        assert rundir.claim_stage_dir(bare, "fp-current") is False
    mixed = str(tmp_path / "mixed")
    rundir.claim_stage_dir(mixed, "fp-current")
    with StageStore(mixed, checkpoint_every=5, fingerprint="fp-old") as store:
        store.save(5, state, rng=jax.random.key(5))
    with StageStore(mixed, checkpoint_every=5, fingerprint="fp-current", also_accept=("fp-old",)) as store:
        store.save(10, state, rng=jax.random.key(10))
    open(os.path.join(mixed, rundir.FINGERPRINT), "wb").write(b"\xff")
    assert sorted(rundir.fingerprints_in_records(mixed)) == ["fp-current", "fp-old"]
    with pytest.warns(rundir.StageMovedAsideWarning):
        assert rundir.claim_stage_dir(mixed, "fp-current") is False


# ----------------------------------------------------------------------------- atomic outputs (issue 15)

def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "summary.json")
    files.write_json_atomic(path, {"hs": 1.0})

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", no_space)
    with pytest.raises(OSError):
        files.write_json_atomic(path, {"hs": 2.0})
    assert json.load(open(path)) == {"hs": 1.0} and os.listdir(tmp_path) == ["summary.json"]


def test_jsonl_torn_last_line_is_dropped_on_read_and_on_resume(tmp_path, built):
    frozen, _, step_fn, _, rng = built
    path = str(tmp_path / "m" / "metrics.jsonl")
    store = StageStore(str(tmp_path / "s"), keep_last=2, checkpoint_every=4)
    kw = dict(name="tiny", store=store, program=StepProgram(step_fn, tiny.JIT_KWARGS), frozen=frozen, rng=rng,
              report=Reporting.for_run(run_cfg(4, 2), metrics_path=path, progress=False))
    run_stage(state=fresh_state(built), streams=tiny.make_streams(), total_steps=4, **kw)
    with open(path, "a") as fh:  # a run killed while appending its step-6 line
        fh.write('{"loss": 1.5, "stage": "tiny", "st')
    with pytest.warns(UserWarning, match="dropped unreadable line"):
        assert [r["step"] for r in files.read_jsonl(path)] == [2, 4]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_stage(state=fresh_state(built), streams=tiny.make_streams(), total_steps=8, **kw)
    assert [json.loads(line)["step"] for line in open(path)] == [2, 4, 6, 8]  # every line whole, once
    store.close()

    from booster_jax.pipeline import _curve

    track = str(tmp_path / "track.jsonl")
    open(track, "w").write('{"step": 2, "harmful_train_loss": 1.0}\n{"step": 4, "harmful_tr')
    with pytest.warns(UserWarning, match="track.jsonl"):
        assert _curve(track) == [{"step": 2, "harmful_loss": 1.0, "hs": None}]


def test_a_full_disk_stops_with_the_path_and_keeps_the_last_good_checkpoint(tmp_path, built, monkeypatch):
    frozen, _, step_fn, _, rng = built
    store = StageStore(str(tmp_path / "s"), keep_last=3, checkpoint_every=5)
    real_save = store.save

    def save(step, *a, **k):
        if step == 10:
            raise ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space left on device")
        return real_save(step, *a, **k)

    monkeypatch.setattr(store, "save", save)
    with pytest.raises(BoosterInputError) as e:
        run_stage(name="tiny", store=store, program=StepProgram(step_fn, tiny.JIT_KWARGS), frozen=frozen,
                  state=fresh_state(built), streams=tiny.make_streams(), total_steps=12, rng=rng,
                  report=Reporting.for_run(run_cfg(5, 5), progress=False))
    msg = str(e.value)
    assert "the disk is full" in msg and "step 10" in msg and store.steps_dir in msg
    assert "MiB free" in msg and "a checkpoint takes about" in msg
    assert f"last good checkpoint is step 5 ({store.step_dir(5)}) and was kept" in msg
    assert store.all_steps() == [5]
    store.close()


def test_a_shared_cache_dir_waits_for_the_run_writing_it(tmp_path):
    import threading

    shared = str(tmp_path / "cache" / "warmup" / "fp")
    os.makedirs(os.path.dirname(shared))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    json.dump({"pid": sleeper.pid, "host": socket.gethostname(), "started": rundir._start_time(sleeper.pid)},
              open(shared + ".lock", "w"))
    threading.Timer(1.0, sleeper.kill).start()  # the other run finishes after a second
    t0 = time.time()
    try:
        with rundir.shared_dir_lock(shared, poll_s=0.1):
            waited = time.time() - t0
            assert json.load(open(shared + ".lock"))["pid"] == os.getpid()
            rundir.claim_stage_dir(shared, "fp")  # the lock beside the directory is not its content
    finally:
        sleeper.kill()
        sleeper.wait()
    assert waited >= 0.9 and not os.path.exists(shared + ".lock")
    assert os.listdir(shared) == [rundir.FINGERPRINT]


def test_tensorboard_scalars_beside_metrics(tmp_path, built):
    """run.tensorboard=true: every metrics.jsonl line is also a TensorBoard scalar (same step, same value)."""
    import glob
    import struct

    from tensorboardX.proto import event_pb2

    frozen, _, step_fn, _, rng = built
    store = StageStore(str(tmp_path / "s"), keep_last=2, checkpoint_every=4)
    metrics_path = str(tmp_path / "s" / "metrics.jsonl")
    cfg = dataclasses.replace(run_cfg(4, 3), tensorboard=True)
    run_stage(name="tiny", store=store, program=StepProgram(step_fn, tiny.JIT_KWARGS), frozen=frozen,
              state=fresh_state(built), streams=tiny.make_streams(), total_steps=6, rng=rng,
              report=Reporting.for_run(cfg, metrics_path=metrics_path, progress=False))
    store.close()
    logged = {l["step"]: l["loss"] for l in map(json.loads, open(metrics_path))}
    (path,) = glob.glob(str(tmp_path / "s" / "tensorboard" / "events.out.tfevents.*"))
    data, scalars = open(path, "rb").read(), {}
    pos = 0
    while pos < len(data):  # TFRecord framing: length, crc, payload, crc
        (n,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
        pos += 12 + n + 4
        for v in event.summary.value:
            if v.tag == "tiny/loss":
                scalars[event.step] = v.simple_value
    assert sorted(scalars) == sorted(logged) == [3, 6]
    assert all(abs(scalars[k] - logged[k]) < 1e-6 * max(1.0, abs(logged[k])) for k in logged)
