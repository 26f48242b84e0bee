"""Subprocess for the every-checkpoint-damaged test (issue 15 item 2): save three step checkpoints of a
60-leaf state, overwrite every array data file with zeros, restore, print the error.

With many leaves, TensorStore's pending reads of a failed restore finish on Orbax's closed event loop and
each prints a ``RuntimeError: Event loop is closed`` traceback to stderr; ``--unguarded`` turns the
project's guard off to show that this scenario does produce them.

    python -m tests.damaged_restore_worker STAGE_DIR [--unguarded]
"""

import glob
import os
import sys

import jax.numpy as jnp

from booster_jax.errors import BoosterInputError
from booster_jax.train import checkpoint as ckpt


def main(stage_dir: str, guarded: bool) -> None:
    if not guarded:
        ckpt._ignore_closed_loop_callbacks = lambda: None
    state = {f"w{i}": jnp.arange(64 * 256, dtype=jnp.float32).reshape(64, 256) + i for i in range(60)}
    with ckpt.StageStore(stage_dir, keep_last=3, checkpoint_every=1) as store:
        for step in (1, 2, 3):
            store.save(step, state)
    for f in glob.glob(os.path.join(stage_dir, "steps", "*", "state", "**", "d", "*"), recursive=True):
        with open(f, "r+b") as fh:
            fh.write(b"\0" * os.path.getsize(f))
    try:
        ckpt.StageStore(stage_dir, keep_last=3, checkpoint_every=1).restore_latest(state)
    except BoosterInputError as e:
        print(f"BoosterInputError: {e}")
        return
    print("restored a damaged checkpoint")


if __name__ == "__main__":
    main(sys.argv[1], guarded="--unguarded" not in sys.argv[2:])
