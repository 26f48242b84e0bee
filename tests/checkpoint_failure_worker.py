"""Subprocess for the checkpoint-failure tests (issue 29 item 1): one failure path of the stage store, run
the way a user meets it, with stderr left to the interpreter until it exits.

    python -m tests.checkpoint_failure_worker SCENARIO STAGE_DIR [--unguarded]

SCENARIO: ``save`` (a step checkpoint's write fails), ``final`` (the stage output's write fails),
``restore`` (every step checkpoint damaged), ``fallback`` (the newest one damaged: resumes from the
older), ``verify`` (values that do not match the saved checksum), ``load_final`` (a damaged stage
output). Each error or warning is printed as one ``error: ...`` / ``warning: ...`` line on stderr, as
``run.py`` prints them; anything else on stderr is noise. ``--unguarded`` turns ``orbax_noise`` off
(the control: the same failure floods stderr).

Two conditions are made deterministic, because the noise they cause is a race otherwise:
- a full disk is a file-size limit (``RLIMIT_FSIZE``: the write fails inside TensorStore with
  "File too large", through Orbax's real asynchronous save), needing no root and no small filesystem;
- slow storage: every array read after the first waits 0.3 s on a TensorStore future completed by a
  timer thread, so when the first (damaged) read fails, the others are still in flight.
"""

from __future__ import annotations

import logging

# logging as run.py sets it up, before JAX, Orbax and absl are imported (the "absl" logger is then a plain
# logging.Logger, and its records name absl's file, not Orbax's, as their caller)
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
for _noisy in ("absl", "jax._src", "orbax"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)

import argparse  # noqa: E402
import glob  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import warnings  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from booster_jax.train import checkpoint as ckpt  # noqa: E402
from booster_jax.train import orbax_noise  # noqa: E402

SCENARIOS = ("save", "final", "restore", "fallback", "verify", "load_final")
_timers: list[threading.Timer] = []


def make_state():
    rs = np.random.RandomState(0)  # incompressible: each leaf is stored out of line, 64 KiB
    return {f"w{i}": jnp.asarray(rs.randn(64, 256).astype(np.float32)) for i in range(8)}


def limit_file_size(max_bytes: int = 32 << 10) -> None:
    """Every later write past ``max_bytes`` of a file fails (EFBIG), as on a full disk."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def slow_reads(delay_s: float = 0.3) -> None:
    """The first array read runs at once; every later one first waits ``delay_s`` on a TensorStore future."""
    import tensorstore as ts
    from orbax.checkpoint._src.serialization import serialization

    real, calls = serialization._read_shard, []

    async def read_shard(**kw):
        calls.append(1)
        if len(calls) > 1:
            promise, future = ts.Promise.new()
            timer = threading.Timer(delay_s, promise.set_result, (None,))
            _timers.append(timer)
            timer.start()
            await future
        return await real(**kw)

    serialization._read_shard = read_shard


def array_files(path: str) -> list[str]:
    """The array data files of a checkpoint (the OCDBT index nodes are the small ones)."""
    found = glob.glob(os.path.join(path, "**", "ocdbt.process_0", "d", "*"), recursive=True)
    return [f for f in found if os.path.getsize(f) > 16 << 10]


def truncate(path: str) -> None:
    """Cut every array data file to 16 bytes: each array in it fails to read (a half file keeps some whole)."""
    for f in array_files(path):
        os.truncate(f, 16)


def flip_a_bit(path: str) -> None:
    f = max(array_files(path), key=os.path.getsize)
    data = bytearray(open(f, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(f, "wb").write(bytes(data))


def run(scenario: str, stage_dir: str) -> str:
    state = make_state()
    store = ckpt.StageStore(stage_dir, keep_last=3, checkpoint_every=1, fingerprint="fp")
    store.save(1, state)
    if scenario == "save":
        limit_file_size()
        store.save(2, {k: v + 1 for k, v in state.items()})
        return "saved"
    if scenario == "final":
        limit_file_size()
        store.save_final(state, {"stage": "tiny"})
        return "saved the final output"
    if scenario == "load_final":
        store.save_final(state, {"stage": "tiny"})
        truncate(store.final_dir)
        slow_reads()
        ckpt.StageStore(stage_dir, fingerprint="fp").load_final(state)
        return "loaded the final output"
    store.save(2, {k: v + 1 for k, v in state.items()})
    store.close()
    damaged = {"restore": [1, 2], "fallback": [2], "verify": [1, 2]}[scenario]
    for step in damaged:
        (flip_a_bit if scenario == "verify" else truncate)(store.step_dir(step))
    slow_reads()
    _, record = ckpt.StageStore(stage_dir, keep_last=3, checkpoint_every=1, fingerprint="fp").restore_latest(state)
    return f"restored step {record['step']}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", choices=SCENARIOS)
    ap.add_argument("stage_dir")
    ap.add_argument("--unguarded", action="store_true")
    ns = ap.parse_args(argv)
    if ns.unguarded:
        orbax_noise.install = lambda: None
    warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=sys.stderr)
    try:
        print(run(ns.scenario, ns.stage_dir))
    except Exception as e:  # noqa: BLE001 - printed as run.py prints a refusal: one line
        print(f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
    for timer in _timers:  # the slow reads' completions land before exit, on the closed event loops
        timer.join()


if __name__ == "__main__":
    main()
