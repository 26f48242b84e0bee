"""configs/real/study/save_cells.sh records the study's finished stages without their checkpoints, so that they
can be committed and outlive the machine; restore_cells.sh puts the finished evaluations back into a new study
directory. Checked on a hand-made study directory: finished stages are copied (plain files only), unfinished
ones, checkpoints, locks, resume logs and the XLA cache are not; a restore brings back the run files and the
evaluations but no training record, and replaces nothing; a missing directory is named."""

from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "configs", "real", "study", "save_cells.sh")
RESTORE = os.path.join(ROOT, "configs", "real", "study", "restore_cells.sh")


def _write(path, text="x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_copies_finished_stages_only(tmp_path):
    study = tmp_path / "study"
    s10 = study / "s10"
    for name in ("config.yaml", "inputs.json", "summaries.json", ".booster-jax-run", "run.lock"):
        _write(s10 / name)
    _write(s10 / ".jax_cache" / "jit_decode-cache")
    _write(s10 / "eval" / "sft-s10-p0.1" / "summary.json", '{"hs": 35.1}')
    _write(s10 / "eval" / "sft-s10-p0.1" / "samples.jsonl", '{"response": "a"}\n')
    _write(s10 / "eval" / "sft-s10-p0.1" / "fingerprint", "fp-eval")
    _write(s10 / "eval" / "sft-s10-p0.1" / "generations.jsonl")        # the resume log: left out
    _write(s10 / "eval" / "base" / "summary.json")                      # the copy of cache/eval-base: left out
    _write(s10 / "eval" / "booster_paper-s10-p0.1" / "samples.partial.jsonl")   # unfinished: no summary.json
    _write(s10 / "align" / "abc" / "DONE")
    _write(s10 / "align" / "abc" / "metrics.jsonl")
    _write(s10 / "align" / "abc" / "variants.txt")
    _write(s10 / "align" / "abc" / "final" / "lora" / "data")          # a checkpoint: left out
    _write(s10 / "align" / "abc" / "step_50" / "lora" / "data")
    _write(s10 / "align" / "def" / "metrics.jsonl")                    # unfinished alignment
    _write(s10 / "align" / "def" / "step_50" / "lora" / "data")
    _write(s10 / "finetune" / "sft-s10-p0.1" / "DONE")
    _write(s10 / "finetune" / "sft-s10-p0.1" / "track.jsonl")
    _write(study / "s11" / "config.yaml")
    _write(study / "cache" / "eval-base" / "fp1" / "summary.json")
    _write(study / "cache" / "eval-base" / "fp1" / "samples.jsonl")
    _write(study / "cache" / "eval-base" / "fp1.lock")
    _write(study / "cache" / "eval-base" / "fp2" / "fingerprint")      # base evaluation still running
    cells = tmp_path / "cells"
    env = dict(os.environ, STUDY_DIR=str(study), CELLS=str(cells))
    out = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, check=True)
    assert "4 finished stages" in out.stdout
    assert _files(cells) == sorted([
        "cache/eval-base/fp1/samples.jsonl", "cache/eval-base/fp1/summary.json",
        "s10/.booster-jax-run", "s10/config.yaml", "s10/inputs.json", "s10/summaries.json",
        "s10/align/abc/DONE", "s10/align/abc/metrics.jsonl", "s10/align/abc/variants.txt",
        "s10/eval/sft-s10-p0.1/fingerprint", "s10/eval/sft-s10-p0.1/samples.jsonl",
        "s10/eval/sft-s10-p0.1/summary.json",
        "s10/finetune/sft-s10-p0.1/DONE", "s10/finetune/sft-s10-p0.1/track.jsonl",
        "s11/config.yaml",
    ])
    assert (cells / "s10" / "eval" / "sft-s10-p0.1" / "summary.json").read_text() == '{"hs": 35.1}'
    # a rerun after another stage finished adds it and leaves the rest as it was
    _write(s10 / "align" / "def" / "DONE")
    out = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, check=True)
    assert "5 finished stages" in out.stdout
    assert "s10/align/def/DONE" in _files(cells) and "s10/align/def/metrics.jsonl" in _files(cells)


    # on a new machine: the run files and finished evaluations come back, no training record, nothing replaced
    new = tmp_path / "new"
    _write(new / "s11" / "config.yaml", "kept")
    env = dict(os.environ, STUDY_DIR=str(new), CELLS=str(cells))
    out = subprocess.run(["bash", RESTORE], env=env, capture_output=True, text=True, check=True)
    assert "2 finished evaluations" in out.stdout
    assert _files(new) == sorted([
        "cache/eval-base/fp1/samples.jsonl", "cache/eval-base/fp1/summary.json",
        "s10/.booster-jax-run", "s10/config.yaml", "s10/inputs.json", "s10/summaries.json",
        "s10/eval/sft-s10-p0.1/fingerprint", "s10/eval/sft-s10-p0.1/samples.jsonl",
        "s10/eval/sft-s10-p0.1/summary.json", "s11/config.yaml",
    ])
    assert (new / "s11" / "config.yaml").read_text() == "kept"
    assert (new / "s10" / "eval" / "sft-s10-p0.1" / "fingerprint").read_text() == "fp-eval"


def test_missing_cells_dir_is_named(tmp_path):
    env = dict(os.environ, STUDY_DIR=str(tmp_path / "study"), CELLS=str(tmp_path / "nope"))
    out = subprocess.run(["bash", RESTORE], env=env, capture_output=True, text=True)
    assert out.returncode == 2
    assert "CELLS" in out.stderr and "nope" in out.stderr
    assert not (tmp_path / "study").exists()


def test_missing_study_dir_is_named(tmp_path):
    env = dict(os.environ, STUDY_DIR=str(tmp_path / "nope"), CELLS=str(tmp_path / "cells"))
    out = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True)
    assert out.returncode == 2
    assert "STUDY_DIR" in out.stderr and "nope" in out.stderr
    assert not (tmp_path / "cells").exists()
