"""`run.py export`: a finished stage as a PEFT adapter and as a merged HF checkpoint, each checked
against our own forward pass on the same weights (fp32, 1e-4 on logits)."""

import os

import numpy as np
import pytest
import torch

import run as cli
from booster_jax.config import load_config
from booster_jax.train.pretrain import PretrainRecipe, pretrain_base
from booster_jax.errors import BoosterInputError

SMOKE = os.path.join(os.path.dirname(__file__), "..", "configs", "synthetic", "smoke.yaml")
TINY = PretrainRecipe(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1, steps=4,
                      batch_size=8, warmup_steps=1)
GRID = ["grid.variants={sft: {align.method: sft}, booster: {align.method: booster}}", "grid.harmful_ratios=[0.1]",
        "eval.enabled=false"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny world, its base model, and a run whose alignments and attacks are finished."""
    root = tmp_path_factory.mktemp("export")
    pretrain_base(load_config(SMOKE, [f"world.dir={root}", f"run.output_dir={root}/pre"]), TINY, progress=False)
    args = [f"world.dir={root}", f"run.output_dir={root}/run", *GRID]
    assert cli.main(["finetune", SMOKE, *args, "--no-progress"]) == 0
    return root, args


def _ours(cfg_args, stage, variant, ids, mask):
    """Our logits for a finished stage's weights (frozen + LoRA), straight from the stage store."""
    from booster_jax.export import stage_weights
    from booster_jax.train import pretrain, stages

    cfg = pretrain.resolve(load_config(SMOKE, cfg_args), progress=False)
    base = stages.load_base(cfg)
    frozen, lora, _ = stage_weights(cfg, base, stage, variant=variant)
    forward = stages.forward_for(cfg, base)
    return np.asarray(forward(lora, frozen, {"input_ids": ids, "attention_mask": mask})), base


def _batch(vocab):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocab, (3, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    return ids * mask, mask


def test_merged_export_loads_in_transformers(finished, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, args = finished
    out = tmp_path / "merged"
    assert cli.main(["export", SMOKE, *args, "--stage", "finetune", "--variant", "sft", "--format", "merged",
                     "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out).float().eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token is not None and model.config.vocab_size == len(tok)
    ids, mask = _batch(model.config.vocab_size)
    ours, _ = _ours(args, "finetune", "sft", ids, mask)
    with torch.no_grad():
        theirs = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                       attention_mask=torch.as_tensor(mask, dtype=torch.long)).logits.numpy()
    real = mask.astype(bool)
    assert np.abs(ours[real] - theirs[real]).max() < 1e-4


def test_peft_export_of_the_booster_attack_loads_in_peft(finished, tmp_path):
    """Booster's attack continues the alignment LoRA on the base weights: the adapter is the whole story."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, args = finished
    out = tmp_path / "adapter"
    assert cli.main(["export", SMOKE, *args, "--stage", "finetune", "--variant", "booster", "--out", str(out)]) == 0
    ids, mask = _batch(100)
    ours, base = _ours(args, "finetune", "booster", ids, mask)
    model = AutoModelForCausalLM.from_pretrained(base.model_dir).float()
    model.resize_token_embeddings(len(base.tokenizer))  # the run's [PAD] row is unused by these ids
    model = PeftModel.from_pretrained(model, str(out)).eval()
    with torch.no_grad():
        theirs = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                       attention_mask=torch.as_tensor(mask, dtype=torch.long)).logits.numpy()
    real = mask.astype(bool)
    assert np.abs(ours[real][:, :100] - theirs[real][:, :100]).max() < 1e-4


def test_export_refusals_are_clear(finished, tmp_path, capsys):
    root, args = finished
    # SFT's attack trains a fresh LoRA on the alignment-merged weights: an adapter alone would be wrong.
    assert cli.main(["export", SMOKE, *args, "--stage", "finetune", "--variant", "sft", "--out",
                     str(tmp_path / "a")]) == 2
    assert "use --format merged" in capsys.readouterr().err
    assert cli.main(["export", SMOKE, *args, "--out", str(tmp_path / "b")]) == 2  # two variants in the grid
    assert "--variant sft --seed 0" in capsys.readouterr().err
    # A stage never run is an error, not a training run.
    assert cli.main(["export", SMOKE, *args, "--variant", "sft", "align.max_steps=5",
                     "--out", str(tmp_path / "c")]) == 2
    assert "the stage is not finished; run `python run.py align CONFIG` first" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert cli.main(["export", SMOKE, *args, "--variant", "sft"]) == 2
    assert "export needs --out DIR" in capsys.readouterr().err
