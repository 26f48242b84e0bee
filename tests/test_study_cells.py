"""configs/real/study/cells.sh: ``save`` records the study's finished stages without their checkpoints, so that
they can be committed and outlive the machine; ``restore`` puts the finished evaluations back into a new study
directory. Checked on a hand-made study directory: finished stages are copied (plain files only), unfinished
ones, checkpoints, locks, backups, resume logs and the XLA cache are not; a restore brings back the run files and the
evaluations but no training record, and replaces nothing; a training stage saved before keeps its first record,
and one retrained to other weights is recorded under reruns/; a bad mode or a missing directory is named."""

from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "configs", "real", "study", "cells.sh")


def _write(path, text="x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _cells(mode, study, cells, check=True):
    env = dict(os.environ, STUDY_DIR=str(study), CELLS=str(cells))
    return subprocess.run(["bash", SCRIPT, *([mode] if mode else [])], env=env, capture_output=True, text=True,
                          check=check)


def _study(study):
    """One seed part-way through its grid, a seed just started, and the base evaluation."""
    s10 = study / "s10"
    for name in ("config.yaml", "inputs.json", "summaries.json", ".booster-jax-run", "run.lock",
                 "summaries-sft-p0_0.2.json"):  # the last: a part's summaries (run_parts.sh)
        _write(s10 / name)
    _write(s10 / ".summaries-primary.json.bak")                          # run_parts.sh's backup: left out
    _write(s10 / ".jax_cache" / "jit_decode-cache")
    _write(s10 / "eval" / "sft-s10-p0.1" / "summary.json", '{"hs": 35.1}')
    _write(s10 / "eval" / "sft-s10-p0.1" / "samples.jsonl", '{"response": "a"}\n')
    _write(s10 / "eval" / "sft-s10-p0.1" / "fingerprint", "fp-eval")
    _write(s10 / "eval" / "sft-s10-p0.1" / "generations.jsonl")        # the resume log: left out
    _write(s10 / "eval" / "base" / "summary.json")                      # the copy of cache/eval-base: left out
    _write(s10 / "eval" / "booster_paper-s10-p0.1" / "generations.jsonl")   # unfinished: no summary.json
    for name in ("DONE", "metrics.jsonl", "variants.txt"):
        _write(s10 / "align" / "abc" / name)
    _write(s10 / "align" / "abc" / "final" / "state" / "d")            # checkpoints: left out
    _write(s10 / "align" / "abc" / "steps" / "50" / "state" / "d")
    _write(s10 / "align" / "def" / "metrics.jsonl")                    # unfinished alignment
    _write(s10 / "finetune" / "sft-s10-p0.1" / "DONE")
    _write(s10 / "finetune" / "sft-s10-p0.1" / "track.jsonl")
    _write(study / "s11" / "config.yaml")
    _write(study / "cache" / "eval-base" / "fp1" / "summary.json")
    _write(study / "cache" / "eval-base" / "fp1" / "samples.jsonl")
    _write(study / "cache" / "eval-base" / "fp1.lock")
    _write(study / "cache" / "eval-base" / "fp2" / "fingerprint")      # base evaluation still running


RUN_FILES = ["s10/.booster-jax-run", "s10/config.yaml", "s10/inputs.json", "s10/summaries-sft-p0_0.2.json",
             "s10/summaries.json", "s11/config.yaml"]
EVALS = ["cache/eval-base/fp1/samples.jsonl", "cache/eval-base/fp1/summary.json",
         "s10/eval/sft-s10-p0.1/fingerprint", "s10/eval/sft-s10-p0.1/samples.jsonl",
         "s10/eval/sft-s10-p0.1/summary.json"]
TRAINING = ["s10/align/abc/DONE", "s10/align/abc/metrics.jsonl", "s10/align/abc/variants.txt",
            "s10/finetune/sft-s10-p0.1/DONE", "s10/finetune/sft-s10-p0.1/track.jsonl"]


def test_save_copies_finished_stages_only_and_restore_brings_back_the_evaluations(tmp_path):
    study, cells = tmp_path / "study", tmp_path / "cells"
    _study(study)
    assert "4 finished stages" in _cells("save", study, cells).stdout
    assert _files(cells) == sorted(RUN_FILES + EVALS + TRAINING)
    assert (cells / "s10" / "eval" / "sft-s10-p0.1" / "summary.json").read_text() == '{"hs": 35.1}'
    # a rerun after another stage finished adds it (the two evaluations are copied again, the saved training
    # stages are not: same weights)
    _write(study / "s10" / "align" / "def" / "DONE")
    assert "3 finished stages" in _cells("save", study, cells).stdout
    assert {"s10/align/def/DONE", "s10/align/def/metrics.jsonl"} <= set(_files(cells))
    # on a new machine: the run files and finished evaluations come back, no training record, nothing replaced
    new = tmp_path / "new"
    _write(new / "s11" / "config.yaml", "kept")
    assert "2 finished stages" in _cells("restore", new, cells).stdout
    assert _files(new) == sorted(RUN_FILES + EVALS)
    assert (new / "s11" / "config.yaml").read_text() == "kept"
    assert (new / "s10" / "eval" / "sft-s10-p0.1" / "fingerprint").read_text() == "fp-eval"


def _done(checksum):
    return '{\n "checksum": "%s",\n "fingerprint": "abc",\n "format": 1,\n "time": 1\n}' % checksum


def test_a_stage_trained_again_keeps_its_first_record_and_other_weights_go_to_reruns(tmp_path):
    study, cells = tmp_path / "study", tmp_path / "cells"
    stage = study / "s10" / "align" / "abc"
    _write(stage / "DONE", _done("0e92edaef34b256c5f3451ac6f9f0000"))
    _write(stage / "metrics.jsonl", "first")
    _cells("save", study, cells)
    saved = cells / "s10" / "align" / "abc"
    # a new machine trains the same weights again (its timings differ): the first record stays, nothing added
    _write(stage / "DONE", _done("0e92edaef34b256c5f3451ac6f9f0000").replace('"time": 1', '"time": 2'))
    _write(stage / "metrics.jsonl", "same weights, other timings")
    _cells("save", study, cells)
    assert (saved / "metrics.jsonl").read_text() == "first" and '"time": 1' in (saved / "DONE").read_text()
    assert not (cells / "reruns").exists()
    # ... or other weights (another CPU's rounding): recorded beside, under reruns/, the first record kept
    _write(stage / "DONE", _done("e332c93415ff461a88f39975d1b40f70"))
    _write(stage / "metrics.jsonl", "rerun")
    _cells("save", study, cells)
    assert (saved / "metrics.jsonl").read_text() == "first"
    rerun = cells / "reruns" / "s10" / "align" / "abc-e332c934"
    assert (rerun / "metrics.jsonl").read_text() == "rerun" and "e332c934" in (rerun / "DONE").read_text()
    # restore brings back no training record, first or rerun
    new = tmp_path / "new"
    _cells("restore", new, cells)
    assert not (new / "s10" / "align").exists() and not (new / "reruns").exists()


def test_a_bad_mode_or_a_missing_directory_is_named(tmp_path):
    out = _cells(None, tmp_path / "study", tmp_path / "cells", check=False)
    assert out.returncode == 2 and "save or restore" in out.stderr
    out = _cells("save", tmp_path / "nope", tmp_path / "cells", check=False)
    assert out.returncode == 2 and "STUDY_DIR" in out.stderr and "nope" in out.stderr
    out = _cells("restore", tmp_path / "study", tmp_path / "nope", check=False)
    assert out.returncode == 2 and "CELLS" in out.stderr and "nope" in out.stderr
    assert not (tmp_path / "study").exists() and not (tmp_path / "cells").exists()
