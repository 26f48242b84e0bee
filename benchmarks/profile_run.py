#!/usr/bin/env python
"""Where the wall time of a whole run goes: one table of exclusive seconds per phase.

    python benchmarks/profile_run.py                                   # python run.py (the embedded default)
    python benchmarks/profile_run.py configs/real/smollm2_sft.yaml grid.harmful_ratios=[0.1]
    python benchmarks/profile_run.py --cpus 0 ...                      # pin the run to CPU 0 first

Runs the pipeline in this process into a fresh output directory (``run.output_dir`` and the base
evaluation cache are redirected to a temporary folder, so nothing is reused) with timers wrapped
around the functions that do the work. Time is *exclusive*: a phase's seconds exclude the phases
that run inside it (a checkpoint save inside a training stage counts as "checkpoint writes", not
"training steps"), and XLA compilation is taken out of whichever phase triggered it (JAX reports
every backend compile's duration through ``jax.monitoring``). What is left of a training stage is
its steps (the device work, batch assembly and host syncs); "other" is everything no timer covers
(imports, config, data loading, the world build). Prints the table and writes it as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (module, attribute path, phase): the functions timed; nested phases are exclusive
TIMED = [
    ("booster_jax.train.loop", "run_stage", "training steps"),
    ("booster_jax.train.checkpoint", "StageStore.save", "checkpoint writes"),
    ("booster_jax.train.checkpoint", "StageStore.wait", "checkpoint writes"),
    ("booster_jax.train.checkpoint", "StageStore.save_final", "checkpoint writes"),
    ("booster_jax.train.checkpoint", "StageStore.restore_latest", "checkpoint reads"),
    ("booster_jax.eval.evaluate", "generate_answers", "generation (eval)"),
    ("booster_jax.eval.evaluate", "heldout_loss", "held-out loss (eval)"),
    ("booster_jax.eval.judges", "KeywordRefusalJudge.judge", "judge"),
    ("booster_jax.eval.synthetic_judge", "SyntheticJudge.judge", "judge"),
    ("booster_jax.fingerprint", "file_digest", "hashing"),
    ("booster_jax.fingerprint", "data_digest", "hashing"),
    ("booster_jax.fingerprint", "model_fingerprint", "hashing"),
    ("booster_jax.data.template", "tokenize_examples", "tokenizing"),
    ("booster_jax.train.stages", "load_base", "model load"),
]
# functions that build the callable doing the work: the callable they return is timed (the tracking hook
# runs inside a training stage, every track_every steps; its forward passes are not "training steps")
TIMED_FACTORIES = [
    ("booster_jax.train.stages", "harmful_loss_hook", "attack tracking (Fig. 3)"),
    ("booster_jax.train.stages", "harmful_score_probe", "attack tracking (Fig. 3)"),
]


class Profile:
    """Exclusive wall time per phase: a stack of open phases; the innermost one is charged."""

    def __init__(self):
        self.seconds = collections.Counter()
        self.calls = collections.Counter()
        # process CPU seconds per phase, *including* the compiles the phase triggered (JAX reports a
        # compile's wall time only), and the wall seconds of those compiles, so that
        # cpu / (seconds + compile_in) is the phase's CPU/wall with its compiles: ~1 means one core busy
        self.cpu = collections.Counter()
        self.compile_in = collections.Counter()
        self.stack: list[list] = []  # [phase, wall start, CPU start] of its current exclusive slice

    def _charge_top(self, now: float, cpu: float) -> None:
        if self.stack:
            phase, since, cpu_since = self.stack[-1]
            self.seconds[phase] += now - since
            self.cpu[phase] += cpu - cpu_since

    @contextlib.contextmanager
    def phase(self, name: str):
        now, cpu = time.perf_counter(), time.process_time()
        self._charge_top(now, cpu)
        self.stack.append([name, now, cpu])
        self.calls[name] += 1
        try:
            yield
        finally:
            now, cpu = time.perf_counter(), time.process_time()
            self._charge_top(now, cpu)
            self.stack.pop()
            if self.stack:
                self.stack[-1][1:] = [now, cpu]

    def compiled(self, seconds: float) -> None:
        """A compile that just ended: move its seconds from the open phase to "compile"."""
        self.seconds["compile (XLA)"] += seconds
        self.calls["compile (XLA)"] += 1
        if self.stack:
            self.seconds[self.stack[-1][0]] -= seconds
            self.compile_in[self.stack[-1][0]] += seconds

    def wrap(self, fn, name: str):
        @functools.wraps(fn)
        def timed(*a, **kw):
            with self.phase(name):
                return fn(*a, **kw)
        return timed

    def wrap_factory(self, fn, name: str):
        """A function that *returns* the callable doing the work (a hook, a probe): time the callable it
        returns, alone or as the last item of a tuple ((every, hook))."""
        @functools.wraps(fn)
        def timed(*a, **kw):
            with self.phase(name):
                made = fn(*a, **kw)
            if callable(made):
                return self.wrap(made, name)
            if isinstance(made, tuple) and made and callable(made[-1]):
                return (*made[:-1], self.wrap(made[-1], name))
            return made
        return timed


def install(profile: Profile) -> None:
    import importlib

    import jax

    def on_duration(event: str, duration: float, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            profile.compiled(duration)

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    for entries, wrapper in ((TIMED, profile.wrap), (TIMED_FACTORIES, profile.wrap_factory)):
        for module, path, name in entries:
            try:
                owner = importlib.import_module(module)
            except ImportError:
                continue
            *outer, attr = path.split(".")
            for part in outer:
                owner = getattr(owner, part, None)
            if owner is None or not hasattr(owner, attr):
                continue
            setattr(owner, attr, wrapper(getattr(owner, attr), name))
    # modules that imported a timed function by name hold the unwrapped one: patch those names too
    for mod in list(sys.modules.values()):
        if not getattr(mod, "__name__", "").startswith("booster_jax"):
            continue
        for module, path, name in TIMED + TIMED_FACTORIES:
            if "." in path:
                continue
            fn = getattr(sys.modules.get(module), path, None)
            held = getattr(mod, path, None)
            if fn is not None and held is not None and held is not fn and getattr(fn, "__wrapped__", None) is held:
                setattr(mod, path, fn)


def table(profile: Profile, total: float) -> list[tuple[str, float, int, float | None]]:
    """(phase, exclusive wall seconds, calls, CPU/wall of the phase with its compiles or None)."""
    covered = sum(profile.seconds.values())
    rows = sorted(profile.seconds.items(), key=lambda kv: -kv[1])

    def cpu_per_wall(k):
        wall = profile.seconds[k] + profile.compile_in[k]
        return profile.cpu[k] / wall if k in profile.cpu and wall > 0 else None

    return [(k, v, profile.calls[k], cpu_per_wall(k)) for k, v in rows] + [
        ("other (imports, config, data, world)", total - covered, 0, None)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default=os.path.join(ROOT, "configs", "synthetic", "default.yaml"))
    p.add_argument("overrides", nargs="*")
    p.add_argument("--cpus", help="pin the process to these CPUs first, e.g. 0 or 0,1")
    p.add_argument("--json", help="also write the table here")
    p.add_argument("--keep", help="output directory to use (default: a fresh temporary one)")
    ns = p.parse_args(argv)
    if ns.cpus:
        os.sched_setaffinity(0, {int(c) for c in ns.cpus.split(",")})
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    cpu0 = time.process_time()
    profile = Profile()
    import booster_jax.pipeline as pipeline  # noqa: F401  (imports every timed module)
    from booster_jax.config import load_config
    import booster_jax.eval.evaluate  # noqa: F401
    import booster_jax.eval.synthetic_judge  # noqa: F401

    install(profile)
    out = ns.keep or tempfile.mkdtemp(prefix="profile-run-")
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.join(out, "run", ".jax_cache"))  # as run.py does
    cfg = load_config(ns.config, list(ns.overrides) + [f"run.output_dir={out}/run", f"run.cache_dir={out}/cache"])
    from booster_jax.train.pretrain import resolve

    cfg = resolve(cfg, progress=False)
    pipeline.run_pipeline(cfg, progress=False)
    total, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    rows = table(profile, total)
    print(f"\nprofile of {os.path.relpath(ns.config)} {' '.join(ns.overrides)}: {total:.1f} s wall, "
          f"{cpu:.1f} s CPU, load average {load0:.2f} at start, "
          f"{os.getloadavg()[0]:.2f} at end, CPUs {sorted(os.sched_getaffinity(0))}")
    print(f"{'phase':<40}{'seconds':>10}{'share':>8}{'calls':>8}{'CPU/wall':>10}")
    for name, sec, calls, ratio in rows:
        shown = "-" if ratio is None else f"{ratio:.2f}"
        print(f"{name:<40}{sec:>10.1f}{100 * sec / total:>7.1f}%{calls:>8}{shown:>10}")
    print("(CPU/wall: process CPU seconds over wall seconds of the phase, its compiles included; "
          "2.00 = both cores busy)")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump({"config": ns.config, "overrides": ns.overrides, "total_s": total,
                       "cpu_s": cpu,
                       "rows": [{"phase": n, "seconds": s, "calls": c, "cpu_per_wall": r}
                                for n, s, c, r in rows]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
