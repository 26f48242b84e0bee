"""An evaluation killed mid-way (SIGKILL) resumes without regenerating the prompts it had finished."""

import json
import os
import signal
import subprocess
import sys
import time

from booster_jax.eval.resumable import GenerationLog, resumable_answers

ROOT = os.path.join(os.path.dirname(__file__), "..")

WORKER = """
import sys, time, json
from booster_jax.eval.resumable import GenerationLog, resumable_answers
path, calls = sys.argv[1], sys.argv[2]
prompts = [f"p{i}" for i in range(20)]

def slow(ps):
    with open(calls, "a") as f:
        f.write(json.dumps(ps) + "\\n")
    time.sleep(0.4)  # a chunk of generation
    return [p.upper() for p in ps]

print(json.dumps(resumable_answers("harmful", prompts, slow, GenerationLog(path, "fp1"), chunk=4, name="t")))
"""


def _run(args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-c", WORKER, *args], env=env, stdout=subprocess.PIPE, text=True)


def test_sigkill_mid_evaluation_then_resume(tmp_path):
    path, calls = str(tmp_path / "generations.jsonl"), str(tmp_path / "calls.jsonl")
    p = _run([path, calls])
    deadline = time.time() + 60
    while time.time() < deadline:  # kill once two chunks (8 answers) are on disk
        if os.path.exists(path) and sum(1 for _ in open(path)) >= 1 + 8:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=10)
    saved = sum(1 for _ in open(path)) - 1
    assert 8 <= saved < 20
    open(calls, "w").close()
    p = _run([path, calls])
    out, _ = p.communicate(timeout=60)
    assert json.loads(out.strip().splitlines()[-1]) == [f"P{i}" for i in range(20)]
    again = [q for line in open(calls) for q in json.loads(line)]
    assert sorted(again, key=lambda q: int(q[1:])) == [f"p{i}" for i in range(saved, 20)]  # nothing redone


def test_torn_line_and_other_fingerprint(tmp_path):
    path = str(tmp_path / "g.jsonl")
    log = GenerationLog(path, "fp1")
    log.append("task", 0, ["a", "b"])
    with open(path, "a") as f:
        f.write('{"kind": "task", "i": 2, "ans')  # a torn line from a kill mid-write
    asked = []

    def gen(ps):
        asked.extend(ps)
        return [p + "!" for p in ps]

    assert resumable_answers("task", ["x", "y", "z"], gen, GenerationLog(path, "fp1"), chunk=8) == ["a", "b", "z!"]
    assert asked == ["z"]
    assert GenerationLog(path, "fp1").done[("task", 2)] == "z!"  # the row after the torn line was kept
    asked.clear()
    assert resumable_answers("task", ["x", "y"], gen, GenerationLog(path, "fp2"), chunk=8) == ["x!", "y!"]
    assert asked == ["x", "y"]  # another configuration's answers are never reused
    assert any(n.startswith("g.jsonl.old-") for n in os.listdir(tmp_path))  # ... nor deleted


def test_settings_that_cannot_change_numbers_keep_the_evaluation():
    """eval.chunk_prompts and eval.keep_judge_loaded are not in the evaluation's fingerprint; every other
    eval setting (here the answer length) is."""
    from booster_jax import fingerprint
    from booster_jax.config import load_config
    from booster_jax.eval.evaluate import eval_inputs

    smoke = os.path.join(ROOT, "configs", "synthetic", "smoke.yaml")

    def fp(*overrides):
        return fingerprint.combine(eval_inputs(load_config(smoke, list(overrides)), "model"))

    assert fp() == fp("eval.chunk_prompts=7", "eval.keep_judge_loaded=true")
    assert fp() != fp("eval.max_new_tokens_task=5")
