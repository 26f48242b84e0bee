"""A stage killed with SIGKILL mid-run and started again ends bitwise equal to an uninterrupted run."""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from booster_jax.rundir import FingerprintRepairedWarning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY, LOG_EVERY = 40, 5, 4


def worker_cmd(out, sleep):
    return [sys.executable, "-m", "tests.resume_worker", "--out", str(out), "--steps", str(STEPS),
            "--every", str(EVERY), "--log-every", str(LOG_EVERY), "--sleep", str(sleep)]


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    # the later runs reuse the first one's compiled step (same executable, so also a fair comparison)
    e["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax_cache")
    e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    e["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    e["JAX_PLATFORMS"] = "cpu"
    return e


def run(cmd, env, timeout=120):
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def result(out):
    with np.load(os.path.join(out, "result.npz")) as z:
        leaves = [z[f"arr_{i}"] for i in range(len(z.files))]
    with open(os.path.join(out, "result.json")) as fh:
        return leaves, json.load(fh)


def read_progress(out):
    try:
        with open(os.path.join(out, "progress")) as fh:
            return int(fh.read() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def test_sigkill_mid_stage_then_rerun_matches_uninterrupted_run(tmp_path, env):
    ref, victim = tmp_path / "ref", tmp_path / "victim"
    ref.mkdir()
    victim.mkdir()
    run(worker_cmd(ref, 0.0), env)  # uninterrupted (and fills the compilation cache)

    # the same command, slowed by a per-step sleep, killed between checkpoints in mid-stage
    cmd = worker_cmd(victim, 0.05)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while read_progress(victim) < 13:
            assert proc.poll() is None, "worker exited before it could be killed"
            assert time.time() < deadline, "worker made no progress"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    killed_at = read_progress(victim)
    assert proc.returncode == -signal.SIGKILL and killed_at < STEPS
    assert not os.path.exists(victim / "result.npz")

    p = run(cmd, env)  # started again with the same command: resumes, does not start over
    resumed = [line for line in p.stderr.splitlines() if "resuming from step" in line]
    assert len(resumed) == 1, p.stderr[-2000:]
    resumed_from = int(resumed[0].split("resuming from step ")[1].split("/")[0])
    assert resumed_from % EVERY == 0 and 10 <= resumed_from <= killed_at

    ref_leaves, ref_info = result(ref)
    got_leaves, got_info = result(victim)
    assert len(ref_leaves) == len(got_leaves)
    for a, b in zip(ref_leaves, got_leaves):  # trainable, optimizer state and step: bit for bit
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert got_info["step"] == ref_info["step"] == STEPS
    assert got_info["streams"] == ref_info["streams"]  # both stream positions (and token counters)
    assert got_info["rng"] == ref_info["rng"]
    assert got_info["summary"]["tokens"] == ref_info["summary"]["tokens"]
    assert got_info["summary"]["resumed_from_step"] == resumed_from

    # the metrics log has each log step exactly once (lines past the checkpoint were dropped)
    steps = [json.loads(line)["step"] for line in open(victim / "metrics.jsonl")]
    assert steps == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    ref_lines = {json.loads(l)["step"]: json.loads(l) for l in open(ref / "metrics.jsonl")}
    for line in open(victim / "metrics.jsonl"):  # windows that did not straddle the resume are identical
        rec = json.loads(line)
        if rec["step"] - LOG_EVERY >= resumed_from:
            assert rec["loss"] == ref_lines[rec["step"]]["loss"]


# ----------------------------------------------------------------------------- a diverged stage (issue 15)

def _diverging_stage(tmp_path, lr, fingerprint, resume_diverged=False, steps=12):
    """The tiny model through ``stages.train`` (the pipeline's stage runner), whose loss turns NaN once any
    LoRA weight has moved more than 0.27 from its start: Adam moves about ``lr`` per step, so lr=0.05
    diverges at step 7 (after the step-5 checkpoint) and lr=1e-3 never does."""
    import jax
    import jax.numpy as jnp

    from booster_jax.config import load_config
    from booster_jax.methods.base import Forward
    from booster_jax.models.llama import make_model
    from booster_jax.models.lora import init_lora
    from booster_jax.train import stages
    from tests import resume_worker as tiny

    cfg = load_config(None, ["align.method=sft", f"align.optim.lr={lr}", "run.checkpoint_every=5",
                             "run.log_every=1", "run.keep_last=3",
                             f"run.resume_diverged={str(resume_diverged).lower()}"])
    forward = Forward(make_model(tiny.CFG, tiny.SPEC))
    lora0 = init_lora(jax.random.key(1), tiny.CFG, tiny.SPEC)

    def poisoned(trainable, frozen, batch, **kw):
        moved = jnp.max(jnp.stack([jnp.max(jnp.abs(x - y)) for x, y in zip(jax.tree.leaves(trainable),
                                                                            jax.tree.leaves(lora0))]))
        return forward(trainable, frozen, batch, **kw) + jnp.where(moved > 0.27, jnp.nan, 0.0)

    frozen, *_ = tiny.build()
    spec = stages.TrainSpec("align", "align", steps, 0, str(tmp_path / "align" / "stage"), fingerprint,
                            progress=False)
    return stages.train(cfg, spec, poisoned, frozen["params"], lora0, tiny.make_streams())


def test_nan_stop_says_what_a_rerun_does_and_resume_diverged_continues_with_new_optimizer(tmp_path, capfd):
    from booster_jax.train.loop import TrainingDivergedError
    from booster_jax.train.stages import DIVERGED

    stage = tmp_path / "align" / "stage"
    with pytest.raises(TrainingDivergedError) as e:
        _diverging_stage(tmp_path, 0.05, "fp-lr0.05")
    msg = str(e.value)
    assert "at step 7" in msg and "step 5" in msg
    assert "with the same settings it resumes from step 5" in msg
    assert "with changed optimizer settings" in msg and "starts this stage over from step 0" in msg
    assert "run.resume_diverged=true" in msg
    assert json.load(open(stage / DIVERGED))["step"] == 5

    # the option: same stage, lower learning rate (another fingerprint), continues from step 5
    capfd.readouterr()
    _diverging_stage(tmp_path, 1e-3, "fp-lr0.001", resume_diverged=True)
    err = capfd.readouterr().err
    assert "resuming from step 5/12" in err
    assert json.load(open(stage / "DONE"))["fingerprint"] == "fp-lr0.001"
    assert not (stage / DIVERGED).exists() and "diverged under fingerprint fp-lr0.05" in (stage / "NOTE.txt").read_text()
    meta = json.load(open(stage / "final" / "meta.json"))
    assert meta["summary"]["resumed_from_step"] == 5 and meta["summary"]["steps"] == 12
    steps = [json.loads(line)["step"] for line in open(stage / "metrics.jsonl")]
    assert steps == list(range(1, 13))  # 1-5 from the diverged run, 6-12 with the new settings


def test_a_diverged_stage_rerun_with_new_optimizer_starts_over_and_keeps_the_old_one(tmp_path, capfd):
    from booster_jax.train.loop import TrainingDivergedError
    from booster_jax.train.stages import DIVERGED

    with pytest.raises(TrainingDivergedError):
        _diverging_stage(tmp_path, 0.05, "fp-lr0.05")
    capfd.readouterr()
    _diverging_stage(tmp_path, 1e-3, "fp-lr0.001")  # what the message says: a fresh stage from step 0
    assert "resuming from step" not in capfd.readouterr().err
    (old,) = [p for p in os.listdir(tmp_path / "align") if p.startswith("stage.old-")]
    assert (tmp_path / "align" / old / DIVERGED).exists() and (tmp_path / "align" / old / "steps" / "5").exists()
    meta = json.load(open(tmp_path / "align" / "stage" / "final" / "meta.json"))
    assert meta["summary"]["resumed_from_step"] == 0


# ----------------------------------------------------------------------------- the command line (issue 15)

SMOKE = os.path.join(ROOT, "configs", "synthetic", "smoke.yaml")


def test_empty_output_dir_and_non_utf8_config_are_clear_errors(tmp_path, capsys):
    import run as cli

    assert cli.main([SMOKE, "run.output_dir=", f"world.dir={tmp_path}/w"]) == 2
    err = capsys.readouterr().err
    assert "run.output_dir: expected a non-empty value" in err and "Traceback" not in err
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("run: {output_dir: r\u00e9sultats}\n".encode("latin-1"))
    assert cli.main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: not UTF-8 text (byte 0xe9 at offset" in err and "Traceback" not in err
    assert not os.path.exists(f"{tmp_path}/w")


def test_misspelt_command_gets_did_you_mean(capsys):
    import run as cli

    with pytest.raises(SystemExit) as e:
        cli.main(["evalute", SMOKE])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown command 'evalute' (did you mean evaluate?)" in err and "expected key=value" not in err
    with pytest.raises(SystemExit):
        cli.main(["trian", SMOKE])
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_every_problem_is_reported_at_once(tmp_path, capsys):
    import jax

    import run as cli

    too_many = jax.device_count() + 1
    code = cli.main([SMOKE, f"world.dir={tmp_path}/w", "lora.r=0", f"data.alignment_file={tmp_path}/nope.json",
                     f"mesh.data={too_many}"])
    err = capsys.readouterr().err
    assert code == 2 and "3 problems" in err
    assert "lora.r" in err and f"data.alignment_file: no such file: {tmp_path}/nope.json" in err
    assert f"mesh.data={too_many}" in err and "available" in err
    assert not os.path.exists(f"{tmp_path}/w")  # nothing was built


def test_a_users_own_directory_is_not_written(tmp_path, capsys):
    import run as cli

    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("config.yaml", "report.md", "summaries.json"):
        (mine / name).write_text("mine\n")
    assert cli.main([SMOKE, f"world.dir={tmp_path}/w", f"run.output_dir={mine}"]) == 2
    err = capsys.readouterr().err
    assert "not a booster-jax run directory" in err and "config.yaml, report.md, summaries.json" in err
    assert sorted(os.listdir(mine)) == ["config.yaml", "report.md", "summaries.json"]
    assert all((mine / n).read_text() == "mine\n" for n in os.listdir(mine))
    assert not os.path.exists(f"{tmp_path}/w")


# ----------------------------------------------------------------------------- whole runs (issue 15)

ONE_RUN = ["grid.variants={sft: {align.method: sft}}", "grid.harmful_ratios=[0.1]", "data.n_eval_benign=4", "--no-progress"]


@pytest.fixture(scope="module")
def smoke_world(tmp_path_factory):
    from booster_jax.config import load_config
    from booster_jax.train.pretrain import pretrain_base
    from tests.test_pipeline import TINY

    root = tmp_path_factory.mktemp("world15")
    pretrain_base(load_config(SMOKE, [f"world.dir={root}", f"run.output_dir={root}/pre"]), TINY, progress=False)
    return str(root)


def smoke_cmd(world, out):
    return [sys.executable, "run.py", SMOKE, f"world.dir={world}", f"run.output_dir={out}", *ONE_RUN]


def stage_logs(out):
    """{relative path: [rows]} of every stage's metrics.jsonl and track.jsonl, without the timing fields."""
    logs = {}
    for dirpath, _, names in os.walk(out):
        for name in names:
            if name in ("metrics.jsonl", "track.jsonl"):
                rows = [json.loads(line) for line in open(os.path.join(dirpath, name))]
                logs[os.path.relpath(os.path.join(dirpath, name), out)] = [
                    {k: v for k, v in r.items() if k not in ("steps_per_s", "tokens_per_s")} for r in rows]
    return logs


@pytest.fixture(scope="module")
def solo(smoke_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("solo") / "run"
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    run(smoke_cmd(smoke_world, out), env, timeout=600)
    return str(out)


@pytest.mark.slow
def test_two_runs_on_one_output_dir_one_refuses_cleanly_and_nothing_is_mixed(smoke_world, solo, tmp_path):
    out = tmp_path / "shared"
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen(smoke_cmd(smoke_world, out), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    codes = sorted(rc for rc, _, _ in results)
    assert codes == [0, 2], [err[-2000:] for _, _, err in results]
    loser = next(err for rc, _, err in results if rc == 2)
    winner_pid = next(p.pid for p, (rc, _, _) in zip(procs, results) if rc == 0)
    assert re.search(rf"another run \(pid {winner_pid} on host \S+\) is writing {re.escape(str(out))}; wait for it "
                     r"or use another run.output_dir", loser), loser[-2000:]
    assert "Traceback" not in loser
    assert not (out / "run.lock").exists()  # released by the winner

    summary = lambda d: json.load(open(os.path.join(d, "summaries.json")))  # noqa: E731
    assert summary(out) == summary(solo)
    assert stage_logs(out) == stage_logs(solo)  # every log line once, as in the solo run
    done = {p: os.path.getmtime(p) for p in glob.glob(str(out / "*" / "*" / "DONE"))}
    run(smoke_cmd(smoke_world, out), env, timeout=600)  # a rerun afterwards: reuses all, still the solo result
    assert {p: os.path.getmtime(p) for p in done} == done
    assert summary(out) == summary(solo) and stage_logs(out) == stage_logs(solo)


@pytest.mark.slow
def test_damaged_summaries_are_redone_and_a_damaged_fingerprint_file_is_repaired(smoke_world, solo, tmp_path, capsys):
    import run as cli

    out = tmp_path / "run"
    shutil.copytree(solo, out)
    args = [SMOKE, f"world.dir={smoke_world}", f"run.output_dir={out}", *ONE_RUN]
    whole = open(out / "summaries.json").read()
    (out / "summaries.json").write_text(whole[: len(whole) // 2])  # truncated
    assert cli.main(["report", *args]) == 2
    err = capsys.readouterr().err
    assert f"{out}/summaries.json: unreadable (JSONDecodeError" in err and "run the pipeline again" in err

    tag = "sft-s0-p0.1"
    summary = out / "eval" / tag / "summary.json"
    summary.write_text(summary.read_text()[:40])
    (out / "finetune" / tag / "fingerprint").write_bytes(b"\x13garbage\xff")
    done = out / "finetune" / tag / "DONE"
    done_stamp = os.path.getmtime(done)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(args) == 0
    messages = [str(w.message) for w in caught]
    assert any(f"{summary}: unreadable evaluation summary" in m for m in messages), messages
    # issue 29 item 2: only the fingerprint file was damaged; the stage's records (DONE, step checkpoints)
    # all name this configuration, so the file is repaired and the finished attack is reused, not redone
    assert any(isinstance(w.message, FingerprintRepairedWarning) and f"finetune/{tag}" in str(w.message)
               for w in caught), messages
    assert not glob.glob(str(out / "finetune" / f"{tag}.old-*"))
    assert open(out / "finetune" / tag / "fingerprint").read() == json.load(open(done))["fingerprint"]
    assert os.path.getmtime(done) == done_stamp
    assert json.load(open(out / "summaries.json")) == json.load(open(os.path.join(solo, "summaries.json")))
    assert cli.main(["report", *args]) == 0


@pytest.mark.slow
def test_another_config_in_a_finished_run_keeps_the_first_runs_stages(smoke_world, solo, tmp_path):
    import run as cli

    out = tmp_path / "run"
    shutil.copytree(solo, out)
    tag = "sft-s0-p0.1"
    first_eval = json.load(open(out / "eval" / tag / "summary.json"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main([SMOKE, f"world.dir={smoke_world}", f"run.output_dir={out}", *ONE_RUN,
                         "finetune.optim.lr=2e-3"]) == 0
    (old_ft,) = glob.glob(str(out / "finetune" / f"{tag}.old-*"))
    (old_eval,) = glob.glob(str(out / "eval" / f"{tag}.old-*"))
    assert os.path.exists(os.path.join(old_ft, "DONE")) and "another configuration" in open(
        os.path.join(old_ft, "NOTE.txt")).read()
    assert json.load(open(os.path.join(old_eval, "summary.json"))) == first_eval
    assert json.load(open(out / "finetune" / tag / "final" / "meta.json"))["config"]["finetune"]["optim"]["lr"] == 2e-3
    (old_cfg,) = glob.glob(str(out / "config.yaml.old-*"))
    assert "0.001" in open(old_cfg).read() and "0.002" in open(out / "config.yaml").read()
