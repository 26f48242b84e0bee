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
