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


# ------------------------------------------------------------------ the official data files

def test_official_build_dataset_outputs_are_read(tmp_path):
    """data/sst2.json as sst2/build_dataset.py writes it (label words, not ids), and the AGNews and GSM8K
    equivalents, give the same examples as the raw hub rows."""
    import json

    from booster_jax.data import formats

    raw = [{"sentence": "a gem .", "label": 1}, {"sentence": "dull", "label": 0}]
    built = [{"instruction": formats.SST2_INSTRUCTION, "input": r["sentence"],
              "output": formats.SST2_LABELS[r["label"]]} for r in raw]
    (tmp_path / "raw.json").write_text(json.dumps(raw))
    (tmp_path / "sst2.json").write_text(json.dumps(built, indent=4))
    assert list(formats.read_sst2(str(tmp_path / "sst2.json"))) == list(formats.read_sst2(str(tmp_path / "raw.json")))
    ag = [{"instruction": formats.AGNEWS_INSTRUCTION, "input": "Stocks fell.", "output": "Business"}]
    (tmp_path / "agnews.json").write_text(json.dumps(ag))
    assert formats.read_agnews(str(tmp_path / "agnews.json"))[0].output == "Business"
    gsm = [{"instruction": "2+2?", "output": "2+2=4\nThe final answer is:  4"}]
    (tmp_path / "gsm8k.json").write_text(json.dumps(gsm))
    assert formats.read_gsm8k(str(tmp_path / "gsm8k.json"))[0] == formats.Example("2+2?", "", gsm[0]["output"])
    bad = [{"instruction": formats.SST2_INSTRUCTION, "input": "x", "output": "1"}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(BoosterInputError, match=r"row 0: field 'output' must be one of \['negative', 'positive'\]"):
        formats.read_sst2(str(tmp_path / "bad.json"))


def test_gzipped_jsonl_and_save_to_disk_folders(tmp_path):
    """BeaverTails' hub form (30k_test.jsonl.gz) and a datasets save_to_disk folder read like a .jsonl."""
    import gzip
    import json

    import datasets

    from booster_jax.data import formats

    rows = [{"prompt": f"p{i}", "response": f"r{i}", "is_safe": i % 2 == 0, "category": {}} for i in range(4)]
    text = "\n".join(json.dumps(r) for r in rows)
    (tmp_path / "test.jsonl").write_text(text)
    (tmp_path / "test.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    plain = formats.read_beavertails(str(tmp_path / "test.jsonl"))
    assert list(formats.read_beavertails(str(tmp_path / "test.jsonl.gz"))) == list(plain)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert list(formats.read_beavertails(str(tmp_path / "saved"))) == list(plain)
    datasets.DatasetDict({"30k_test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dict"))
    assert list(formats.read_beavertails(str(tmp_path / "dict"), split="30k_test")) == list(plain)
    with pytest.raises(BoosterInputError, match=r"splits \['30k_test'\]"):
        formats.read_beavertails(str(tmp_path / "dict"))
    (tmp_path / "junk.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(BoosterInputError, match="not a readable gzip file"):
        formats.read_beavertails(str(tmp_path / "junk.jsonl.gz"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(BoosterInputError, match="not a datasets save_to_disk folder"):
        formats.read_beavertails(str(tmp_path / "empty_dir"))


def test_split_keys_pick_the_split_of_a_dataset_dict(tmp_path):
    """data.*_split name the split of a hub id (or a saved DatasetDict, tested here offline)."""
    import datasets

    from booster_jax.eval.evaluate import eval_sets
    from booster_jax.train.stages import task_train_examples

    bt = [{"prompt": f"harm {i}", "response": "r", "is_safe": False, "category": {}} for i in range(3)]
    datasets.DatasetDict({"30k_test": datasets.Dataset.from_list(bt)}).save_to_disk(str(tmp_path / "bt"))
    sst = {"train": [{"sentence": "good", "label": 1}] * 4, "validation": [{"sentence": "bad", "label": 0}] * 2}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in sst.items()}).save_to_disk(str(tmp_path / "s"))
    cfg = load_config(PAPER, [f"data.eval_harmful_file={tmp_path / 'bt'}", "data.eval_harmful_split=30k_test",
                              f"data.task_file={tmp_path / 's'}", "data.task_split=train",
                              "data.task_eval_split=validation", "data.task_eval_file="])
    harmful, task = eval_sets(cfg)
    assert [h.instruction for h in harmful] == ["harm 0", "harm 1", "harm 2"]
    assert [t.output for t in task] == ["negative", "negative"]  # the validation split
    assert {t.output for t in task_train_examples(cfg)} == {"positive"}  # the train split
    with pytest.raises(BoosterInputError, match="splits"):
        eval_sets(load_config(PAPER, [f"data.eval_harmful_file={tmp_path / 'bt'}", f"data.task_file={tmp_path / 's'}",
                                      "data.task_split=train", "data.task_eval_file="]))


def test_mesh_row_padding_is_said_and_counted(caplog):
    """fsdp=8 runs a batch of 10 as 16 rows: one warning at the stage start, and the padding metric counts it."""
    import types

    from booster_jax.train.stages import mesh_padding

    mesh = {"data": 1, "fsdp": 8, "tensor": 1}
    streams = {"align": types.SimpleNamespace(batch_size=10), "harmful": types.SimpleNamespace(batch_size=16)}
    with caplog.at_level("WARNING"):
        real = mesh_padding(mesh, streams, "align:booster")
    assert real == {"align": 10 / 16}
    assert "batches of 10 rows run as 16 rows" in caplog.text and "38% of each step's rows" in caplog.text
    assert "harmful" not in caplog.text
