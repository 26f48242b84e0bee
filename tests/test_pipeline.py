"""The whole pipeline through run.py on a tiny world and base model: stages, reuse, report, errors."""

import json
import os

import pytest

import run as cli
from booster_jax.config import load_config
from booster_jax.train.pretrain import PretrainRecipe, pretrain_base

SMOKE = os.path.join(os.path.dirname(__file__), "..", "configs", "synthetic", "smoke.yaml")
TINY = PretrainRecipe(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1, steps=4,
                      batch_size=8, warmup_steps=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A world and a 4-step base model pre-trained on it (the recipe runs, reduced)."""
    root = tmp_path_factory.mktemp("world")
    cfg = load_config(SMOKE, [f"world.dir={root}", f"run.output_dir={root}/pre"])
    base = pretrain_base(cfg, TINY, progress=False)
    meta = json.load(open(os.path.join(base, "recipe.json")))
    assert meta["recipe"]["steps"] == 4 and meta["world_seed"] == 0
    assert os.path.exists(os.path.join(base, "model.safetensors")) and os.path.exists(os.path.join(base, "tokenizer.json"))
    return str(root)


def test_end_to_end_then_reuse(world, tmp_path, capsys):
    out = tmp_path / "run"
    args = [SMOKE, f"world.dir={world}", f"run.output_dir={out}", "--no-progress"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "| sft |" in printed and "| booster |" in printed and "Judge: `synthetic`" in printed
    runs = json.load(open(out / "summaries.json"))["runs"]
    assert {(r["method"], r["harmful_ratio"]) for r in runs} == {("sft", 0.0), ("sft", 0.1), ("booster", 0.0),
                                                                 ("booster", 0.1)}
    for r in runs:
        assert 0 <= r["hs_after"] <= 100 and 0 <= r["fa"] <= 100
    curve = [r["curve"] for r in runs if r["harmful_ratio"] == 0.1][0]
    assert [p["step"] for p in curve] == [2, 4]  # finetune.track_every=2, 4 steps
    assert all(0 <= p["hs"] <= 100 for p in curve)  # HS on 8 prompts at each tracked step
    samples = [json.loads(l) for l in open(out / "eval" / "base" / "samples.jsonl")]
    assert sum(s["kind"] == "harmful" for s in samples) == 16 and all("flagged" in s for s in samples
                                                                     if s["kind"] == "harmful")
    assert (out / "report.md").exists()
    done = sorted(str(p) for p in out.glob("*/*/DONE"))
    assert len(done) == 2 + 4  # two alignments, four attacks
    stamps = {p: os.path.getmtime(p) for p in done}
    assert cli.main(args) == 0  # the rerun reuses every finished stage and evaluation
    assert {p: os.path.getmtime(p) for p in done} == stamps
    assert cli.main(["report", SMOKE, f"world.dir={world}", f"run.output_dir={out}"]) == 0


def test_bad_config_is_reported_before_any_work(tmp_path, capsys):
    code = cli.main([SMOKE, f"world.dir={tmp_path}/w", "data.harmful_ratio=2", "align.method=boster",
                     "lora.r=0", "align.bogus=1"])
    err = capsys.readouterr().err
    assert code == 2
    for piece in ("data.harmful_ratio", "align.method", "did you mean 'booster'", "lora.r", "align.bogus"):
        assert piece in err
    assert not os.path.exists(f"{tmp_path}/w")  # nothing was built


def test_real_setting_needs_its_data_files(tmp_path, capsys):
    code = cli.main([SMOKE, f"model.path={tmp_path}", f"run.output_dir={tmp_path}/r"])
    assert code == 2 and "data.alignment_file" in capsys.readouterr().err


def test_missing_config_file(capsys):
    assert cli.main(["no/such.yaml"]) == 2
    assert "no/such.yaml: no such config file" in capsys.readouterr().err


def parse_every_json_file(root) -> set[str]:
    """Every file under ``root`` that Python's lenient parser reads as JSON (or, for *.jsonl, line by line)
    must also parse strictly: no NaN / Infinity, which jq, JavaScript and most parsers reject. Returns the
    relative paths checked."""
    def strict(text):
        return json.loads(text, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(f"{name} in JSON")))

    checked = set()
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            try:
                text = open(path, encoding="utf-8").read()
            except (UnicodeDecodeError, OSError):
                continue
            docs = [line for line in text.splitlines() if line.strip()] if name.endswith(".jsonl") else [text]
            try:
                [json.loads(d) for d in docs]
            except ValueError:
                continue  # not JSON (a config, a report, a binary chunk)
            rel = os.path.relpath(path, root)
            for d in docs:
                try:
                    strict(d)
                except ValueError as e:
                    raise AssertionError(f"{rel}: not strict JSON ({e})") from None
            checked.add(rel)
    return checked


def test_alpaca_task_writes_alpaca_eval_json(world, tmp_path):
    """An instruction-following task is not scored here: its generations go to alpaca_eval's JSON, and FA,
    which cannot be measured, is null (strict JSON; issue 29 item 3) with the reason in the files and report."""
    out = tmp_path / "run"
    benign = os.path.join(world, "benign", "instructions.json")
    args = [SMOKE, f"world.dir={world}", f"run.output_dir={out}", "--no-progress", "data.task=alpaca",
            f"data.task_file={benign}", f"data.task_eval_file={benign}", "data.n_eval_task=5",
            "grid.variants={sft: {align.method: sft}}", "grid.harmful_ratios=[0.1]"]
    assert cli.main(args) == 0
    rows = json.load(open(out / "eval" / "sft-s0-p0.1" / "alpaca_eval_outputs.json"))
    assert len(rows) == 5 and {"instruction", "output", "generator"} <= set(rows[0])

    checked = parse_every_json_file(out)
    for must in ("summaries.json", "inputs.json", "eval/sft-s0-p0.1/summary.json", "eval/base/summary.json",
                 "eval/sft-s0-p0.1/samples.jsonl", "eval/sft-s0-p0.1/generations.jsonl"):
        assert must in checked, sorted(checked)
    assert any(p.endswith("DONE") for p in checked) and any(p.endswith("final/meta.json") for p in checked)
    summary = json.load(open(out / "eval" / "sft-s0-p0.1" / "summary.json"))
    assert summary["fa"] is None and summary["no_answer_task"] is None
    assert "alpaca task is not scored here" in summary["missing"]["fa"] and "hs" not in summary["missing"]
    (run,) = json.load(open(out / "summaries.json"))["runs"]
    assert run["fa"] is None and run["hs_after"] is not None and "alpaca task" in run["missing"]["fa"]
    report = open(out / "report.md").read()
    assert "## Missing values" in report and "`fa` is missing (null in summaries.json) for sft seed 0 p=0.1" in report
    # the files are read back: a rerun reuses the evaluations (null -> NaN) and the report command works
    assert cli.main(args) == 0 and cli.main(["report", *args]) == 0
    assert json.load(open(out / "summaries.json"))["runs"] == [run]


def test_plan_runs_before_the_data_files_exist_and_training_still_needs_them(tmp_path, capsys):
    """Issue 29 item 4: how much memory the 7B run needs is asked before downloading BeaverTails and SST2.
    The plan reads no rows: it runs and names the missing files in notes; a training run still refuses."""
    paper = os.path.join(os.path.dirname(__file__), "..", "configs", "paper", "sst2_booster.yaml")
    files = {k: f"{tmp_path}/not-downloaded/{k}.json" for k in ("alignment_file", "task_file", "task_eval_file",
                                                                "eval_harmful_file")}
    args = [paper, *(f"data.{k}={v}" for k, v in files.items()), f"run.output_dir={tmp_path}/run",
            "plan.devices=8", "plan.device_memory_gb=80", "plan.compile=false"]
    assert cli.main(["plan", *args]) == 0
    captured = capsys.readouterr()
    assert "fits in 80 GB" in captured.out and "error" not in captured.err
    for k, v in files.items():
        assert f"note: data.{k}: no such file: {v} (the plan reads no data; a training run needs it)" in captured.out
    assert cli.main(["align", *args]) == 2
    err = capsys.readouterr().err
    assert "4 problems" in err and all(f"data.{k}: no such file: {v}" in err for k, v in files.items())
    assert not os.path.exists(f"{tmp_path}/run")


def test_finished_evaluations_need_no_training(world, tmp_path, caplog):
    """Evaluations copied to a machine without the checkpoints (or whose checkpoints were deleted): the rerun
    trains nothing whose evaluations are all finished, and exactly what an unfinished evaluation needs."""
    import logging
    import shutil

    first, second = tmp_path / "first", tmp_path / "second"
    args = lambda out: [SMOKE, f"world.dir={world}", f"run.output_dir={out}", "--no-progress"]  # noqa: E731
    assert cli.main(args(first)) == 0
    numbers = lambda out: {(r["method"], r["harmful_ratio"]): {k: v for k, v in r.items() if k != "curve"}  # noqa: E731
                           for r in json.load(open(out / "summaries.json"))["runs"]}
    shutil.copytree(first / "eval", second / "eval")
    shutil.copy(first / ".booster-jax-run", second)  # the run directory's marker: it is a booster-jax run
    partial = second / "finetune" / "sft-s0-p0.1"  # an attack killed here before its evaluation was copied in
    partial.mkdir(parents=True)
    shutil.copy(first / "finetune" / "sft-s0-p0.1" / "track.jsonl", partial)
    with caplog.at_level(logging.INFO, logger="booster_jax.pipeline"):
        assert cli.main(args(second)) == 0
    assert not (second / "align").exists() and sorted(os.listdir(second / "finetune")) == ["sft-s0-p0.1"]
    assert sorted(os.listdir(partial)) == ["track.jsonl"]  # not claimed, not trained
    assert numbers(second) == numbers(first)
    assert all(r["curve"] == [] for r in json.load(open(second / "summaries.json"))["runs"])  # not the unfinished one's
    skipped = [r.getMessage() for r in caplog.records if "not run" in r.getMessage()]
    assert sum(m.startswith("align ") for m in skipped) == 2 and sum(m.startswith("finetune ") for m in skipped) == 4
    from booster_jax.eval.layout import aligned_samples  # the pre-attack answers are found without align/

    found = aligned_samples([str(second)], "booster", 0, 0.1)
    assert found and os.path.relpath(found, second) == os.path.relpath(aligned_samples([str(first)], "booster", 0, 0.1),
                                                                       first)
    shutil.rmtree(partial)

    shutil.rmtree(second / "eval" / "booster-s0-p0.1")  # one attack's evaluation is missing
    assert cli.main(args(second)) == 0
    assert [p.name for p in (second / "finetune").iterdir()] == ["booster-s0-p0.1"]
    (aligned,) = (second / "align").iterdir()
    assert open(aligned / "variants.txt").read() == "booster-s0\n"  # only the alignment that attack starts from
    assert numbers(second) == numbers(first)  # retrained to the same numbers
    runs = json.load(open(second / "summaries.json"))["runs"]
    assert [bool(r["curve"]) for r in runs] == [r["method"] == "booster" and r["harmful_ratio"] == 0.1 for r in runs]
