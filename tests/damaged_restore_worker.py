"""Subprocess for the every-checkpoint-damaged test (issue 15 item 2): save three step checkpoints of a
60-leaf state, overwrite every array data file with zeros, and restore ``--attempts`` copies of that stage
directory, printing each error on one line.

After a failed restore, TensorStore's pending reads can finish on Orbax's already closed event loop, and
each prints a ``RuntimeError: Event loop is closed`` traceback to stderr (hundreds for one stage). It is a
race: measured on the 2-core CI machine, one restore printed them in about 1 of 3 runs under load and in
most runs when idle. ``--unguarded`` turns the project's guard off to see them:

    python -m tests.damaged_restore_worker /tmp/stage --unguarded 2>&1 | grep -c "Event loop is closed"
"""

import argparse
import glob
import os
import shutil

import jax.numpy as jnp

from booster_jax.errors import BoosterInputError
from booster_jax.train import checkpoint as ckpt


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("stage_dir")
    ap.add_argument("--unguarded", action="store_true")
    ap.add_argument("--attempts", type=int, default=1)
    ns = ap.parse_args(argv)
    if ns.unguarded:
        ckpt._ignore_closed_loop_callbacks = lambda: None
    state = {f"w{i}": jnp.arange(64 * 256, dtype=jnp.float32).reshape(64, 256) + i for i in range(60)}
    with ckpt.StageStore(ns.stage_dir, keep_last=3, checkpoint_every=1) as store:
        for step in (1, 2, 3):
            store.save(step, state)
    for f in glob.glob(os.path.join(ns.stage_dir, "steps", "*", "state", "**", "d", "*"), recursive=True):
        with open(f, "r+b") as fh:
            fh.write(b"\0" * os.path.getsize(f))
    for i in range(ns.attempts):
        copy = f"{ns.stage_dir}-{i}"
        shutil.copytree(ns.stage_dir, copy)
        try:
            ckpt.StageStore(copy, keep_last=3, checkpoint_every=1).restore_latest(state)
            print("restored a damaged checkpoint")
        except BoosterInputError as e:
            print(f"BoosterInputError: {e}")


if __name__ == "__main__":
    main()
