"""Every shipped config loads and validates (a typo in configs/ fails here, not an hour into a run)."""

import glob
import os

import pytest

from booster_jax.config import load_config
from booster_jax.methods.base import get_method

ROOT = os.path.join(os.path.dirname(__file__), "..", "configs")
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "**", "*.yaml"), recursive=True))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_config_loads(path):
    cfg = load_config(path)
    from booster_jax.pipeline import expand_grid

    for run in expand_grid(cfg):  # every variant resolves to registered methods
        get_method(run.cfg.align.method, "align")
        get_method(run.cfg.finetune.method, "finetune")


def test_paper_configs_keep_the_papers_protocol():
    for name in ("sst2_booster", "agnews_booster", "gsm8k_booster"):
        c = load_config(os.path.join(ROOT, "paper", f"{name}.yaml"))
        assert (c.align.booster.lam, c.align.booster.alpha, c.align.optim.lr, c.finetune.optim.lr) == (5.0, 0.1, 5e-4, 1e-5)
        assert (c.lora.r, c.lora.alpha, c.data.max_length, c.align.batch_size) == (32, 4.0, 256, 10)
        assert c.align.benign_fraction == 0.0 and c.align.warmup_sft_steps == 0
