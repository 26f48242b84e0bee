"""The paper's real setting: problems with its models and files are found before anything heavy runs."""

import os

import pytest

from booster_jax import pipeline
from booster_jax.config import load_config
from booster_jax.errors import BoosterInputError

from .hf_fixtures import build_hf_model

PAPER = os.path.join(os.path.dirname(__file__), "..", "configs", "paper", "sst2_sft.yaml")


@pytest.fixture
def model_dir(tmp_path):
    build_hf_model("llama_gqa").save_pretrained(tmp_path / "base")
    return str(tmp_path / "base")


@pytest.mark.parametrize("judge_path", ["/no/such/judge", "org-that/does-not-exist"])
def test_judge_path_is_checked_first_and_named(model_dir, judge_path, monkeypatch):
    """The judge's problem names eval.judge_path (not model.path), and is found before the base model
    loads (minutes at 7B) and before the data files are read (none exist here)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(PAPER, [f"model.path={model_dir}", f"eval.judge_path={judge_path}"])
    with pytest.raises(BoosterInputError, match=r"^eval\.judge_path '" + judge_path):
        pipeline.check_inputs(cfg)


def test_model_path_is_checked_before_the_data(tmp_path):
    cfg = load_config(PAPER, [f"model.path={tmp_path}/nothing"])
    with pytest.raises(BoosterInputError, match=r"^model\.path '"):
        pipeline.check_inputs(cfg)


PLAN_ON_8 = """
import json, sys, jax
from booster_jax.config import load_config
from booster_jax.eval.beaver_dam import BeaverDamJudge
from booster_jax import parallel, plan
base, judge_dir, paper = sys.argv[1:4]
cfg = load_config(paper, [f"model.path={base}", f"eval.judge_path={judge_dir}", "mesh.fsdp=8", "mesh.data=1",
                          "eval.judge_dtype=float32", "model.dtype=bfloat16", "model.param_dtype=bfloat16",
                          "data.max_length=64"])
p = plan.make_plan(cfg)
j = BeaverDamJudge(judge_dir, mesh=parallel.mesh_for(cfg))
real = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(j.params))
print(json.dumps({"plan_judge": p["evaluation"]["estimate"]["judge_params"], "real_judge": real,
                  "checks": [s.get("f32_check") for s in p["steps"]]}))
"""


def test_plan_on_8_devices_counts_the_sharded_judge_and_checks_its_estimate(model_dir, tmp_path):
    """The evaluation phase's judge bytes per device are what the sharded judge really holds, and on
    CPU a bf16 plan is checked in float32, where the compiled temporaries match the estimate."""
    import json
    import subprocess
    import sys

    from .test_beaver_dam import build_classifier, byte_tokenizer

    judge_dir = tmp_path / "judge"
    build_classifier().save_pretrained(judge_dir)
    byte_tokenizer().save_pretrained(judge_dir)
    root = os.path.join(os.path.dirname(__file__), "..")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", PLAN_ON_8, model_dir, str(judge_dir), PAPER], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert abs(r["plan_judge"] - r["real_judge"]) <= 0.05 * r["real_judge"], r  # the score head is not planned
    for check in r["checks"]:
        assert check is not None and 0.85 <= check["ratio"] <= 1.15, check
