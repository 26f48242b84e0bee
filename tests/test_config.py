import json

import pytest
import yaml

from booster_jax.config import (
    Config, apply_overrides, config_fingerprint, config_from_dict, config_to_dict,
    load_config, overrides_the_variants_replace, save_config,
)
from booster_jax.errors import BoosterInputError


def _write(path, data):
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


def test_defaults_are_the_papers():
    c = load_config(None, [])
    assert c == Config()
    assert (c.lora.r, c.lora.alpha, c.lora.dropout) == (32, 4.0, 0.0)
    assert c.lora.targets == ["q_proj", "k_proj", "v_proj"]
    assert (c.align.booster.lam, c.align.booster.alpha, c.align.booster.eps) == (5.0, 0.1, 1e-7)
    assert c.align.booster.perturbed_term and c.align.method == "booster"
    a, f = c.align.optim, c.finetune.optim
    assert (a.lr, a.weight_decay, a.max_grad_norm, a.schedule, a.warmup_steps) == (5e-4, 0.1, 1.0, "constant", 0)
    assert (f.lr, f.weight_decay) == (1e-5, 0.1)
    assert (c.align.epochs, c.align.batch_size, c.align.harmful_batch_size) == (20, 10, 10)
    assert (c.finetune.epochs, c.finetune.batch_size, c.finetune.method) == (20, 10, "sft")
    assert (c.data.align_start, c.data.align_end, c.data.n_finetune, c.data.harmful_ratio) == (5001, 10000, 1000, 0.1)
    assert (c.data.max_length, c.data.n_eval_harmful, c.data.n_eval_task) == (256, 1000, 872)
    assert c.eval.max_new_tokens_harmful == 512 and c.model.dtype == "bfloat16"
    assert (c.align.vaccine.rho, c.align.repnoise.alpha, c.align.repnoise.beta) == (2.0, 0.1, 0.001)
    assert (c.finetune.lisa.align_steps, c.finetune.lisa.finetune_steps) == (100, 900)
    assert c.align.benign_fraction == 0.0 and c.align.warmup_sft_steps == 0


def test_yaml_base_and_overrides(tmp_path):
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "base.yaml", {"align": {"epochs": 3, "booster": {"lam": 2}}, "data": {"max_length": 128}})
    child = _write(tmp_path / "sub" / "child.yaml",
                   {"base": "../base.yaml", "align": {"booster": {"alpha": 0.5}},
                    "finetune": {"optim": {"weight_decay": 0}}})
    c = load_config(child, ["align.booster.lam=1", "data.bucket_lengths=[32,64]",
                            "grid.harmful_ratios=[0,0.1]", "finetune.optim.lr=2e-5", "model.path="])
    assert c.align.epochs == 3 and c.data.max_length == 128          # from base
    assert c.align.booster.alpha == 0.5 and c.align.booster.lam == 1.0  # child, override wins
    assert isinstance(c.align.booster.lam, float)
    assert c.data.bucket_lengths == [32, 64] and c.grid.harmful_ratios == [0.0, 0.1]
    assert c.finetune.optim.lr == 2e-5 and c.finetune.optim.weight_decay == 0.0
    assert c.align.optim.lr == 5e-4  # partial optim section keeps the parent's defaults
    assert c.model.path == ""


def test_every_problem_in_one_message(tmp_path):
    path = _write(tmp_path / "bad.yaml", {
        "align": {"batch_size": "ten", "method": "boster", "booster": {"lam": -1, "alpha": -0.1},
                  "benign_fraction": -0.5, "optim": {"lr": 0}, "epochs": -1},
        "lora": {"r": 0, "targets": ["q_proj", "qkv"]},
        "data": {"harmful_ratio": 1.5, "max_length": 0, "align_start": 10, "align_end": 5,
                 "bucket_lengths": [64, -8, "x"]},
        "eval": {"judge": "gpt4"},
        "finetune": {"method": "dpo", "batch_size": 0},
    })
    with pytest.raises(BoosterInputError) as ei:
        load_config(path, ["align.booster.lamb=2", "noequals"])
    msg = str(ei.value)
    expected = [
        "align.batch_size: expected int, got 'ten'",
        "align.method: expected one of", "did you mean 'booster'",
        "align.booster.lam: expected a value >= 0, got -1.0",
        "align.booster.alpha: expected a value >= 0",
        "align.benign_fraction: expected a value in [0, 1)",
        "align.optim.lr: expected a value > 0",
        "align.epochs: expected a value >= 0",
        "lora.r: expected a value > 0",
        "lora.targets[1]: expected one of",
        "data.harmful_ratio: expected a value in [0, 1], got 1.5",
        "data.max_length: expected a value > 0",
        "data.align_start: expected < data.align_end",
        "data.bucket_lengths[1]: expected a value > 0",
        "data.bucket_lengths[2]: expected int, got 'x'",
        "eval.judge: expected one of",
        "finetune.method: expected one of",
        "finetune.batch_size: expected a value > 0",
        "align.booster.lamb: unknown key (did you mean 'align.booster.lam'?)",
        "override 'noequals'",
    ]
    for e in expected:
        assert e in msg, e
    assert str(path) in msg.splitlines()[0]


def test_unknown_key_suggestions():
    with pytest.raises(BoosterInputError) as ei:
        load_config(None, ["algn.method=sft", "align.lam=1", "align.bach_size=3"])
    msg = str(ei.value)
    assert "algn: unknown key (did you mean 'align'?)" in msg
    assert "align.lam: unknown key (did you mean 'align.booster.lam'?)" in msg
    assert "align.bach_size: unknown key (did you mean 'align.batch_size'?)" in msg


def test_grid_variants_validated_and_applied(tmp_path):
    good = {"grid": {"variants": {"sft": {"align.method": "sft"},
                                  "booster_l1": {"align": {"booster": {"lam": 1}}}}}}
    c = config_from_dict(good)
    assert c.grid.variants["booster_l1"] == {"align.booster.lam": 1}
    v = apply_overrides(c, c.grid.variants["booster_l1"])
    assert v.align.booster.lam == 1.0 and v.align.method == "booster"
    assert apply_overrides(c, c.grid.variants["sft"]).align.method == "sft"
    bad = {"grid": {"variants": {"x": {"align.method": "nope", "align.batch_sz": 3},
                                 "y": {"grid.seeds": [1]}}, "harmful_ratios": [0.1, 2]}}
    with pytest.raises(BoosterInputError) as ei:
        config_from_dict(bad)
    msg = str(ei.value)
    assert "grid.variants.x: align.method: expected one of" in msg
    assert "grid.variants.x: align.batch_sz: unknown key" in msg
    assert "grid.variants.y: a variant may not override grid" in msg
    assert "grid.harmful_ratios[1]: expected a value in [0, 1]" in msg
    with pytest.raises(BoosterInputError, match="align.batch_size"):
        apply_overrides(Config(), {"align.batch_size": -3})


def test_a_command_line_override_that_the_variants_replace(tmp_path, caplog, capsys):
    path = _write(tmp_path / "c.yaml", "grid:\n  variants:\n    sft: {align.method: sft}\n"
                                       "    booster: {align.method: booster, align: {booster: {lam: 1}}}\n")

    def check(*overrides):
        return overrides_the_variants_replace(load_config(path, overrides), overrides)

    # every variant sets align.method, and a variant's value wins: the override would change nothing
    [(key, problem)] = check("align.method=vaccine", "align.epochs=2")
    assert key == "align.method" and problem.startswith(
        "every grid variant sets it (sft: align.method='sft', booster: align.method='booster')")
    assert "grid.variants.sft.align.method=..." in problem and "grid.variants={}" in problem
    # the two ways out it names both work
    assert check("align.method=vaccine", "grid.variants={}") == []
    assert load_config(path, ["align.method=vaccine", "grid.variants={}"]).align.method == "vaccine"
    c = load_config(path, ["grid.variants.booster.align.method=vaccine"])
    assert c.grid.variants["booster"] == {"align.method": "vaccine", "align.booster.lam": 1}
    # a key that only some variants set (or one under a key they set) reaches the others, with a warning
    with caplog.at_level("WARNING", logger="booster_jax.config"):
        assert check("align.booster.lam=5", "align.booster.alpha=0.2") == []
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and warnings[0].startswith(
        "the override align.booster.lam reaches only the grid variants that do not set it: grid variant booster "
        "sets it itself (booster: align.booster.lam=1)")
    # run.py: a command that runs the grid refuses it before any work; plan (the top-level method) takes it
    import run as cli

    assert cli.main(["align", path, "align.method=vaccine", f"run.output_dir={tmp_path}/out"]) == 2
    err = capsys.readouterr().err
    assert "align.method: every grid variant sets it" in err and not (tmp_path / "out").exists()
    assert cli.main(["plan", path, "align.method=vaccine", "plan.compile=false", "plan.devices=1",
                     f"run.output_dir={tmp_path}/plan"]) == 0
    assert "align:vaccine" in capsys.readouterr().out


def test_fingerprint():
    c = Config()
    model_sections = ("model", "lora", "data", "align")
    fp = config_fingerprint(c, model_sections)
    assert fp == config_fingerprint(Config(), model_sections) and len(fp) == 64
    # irrelevant section: same fingerprint; relevant field: different
    assert config_fingerprint(apply_overrides(c, {"finetune.optim.lr": 3e-5}), model_sections) == fp
    assert config_fingerprint(apply_overrides(c, {"run.log_every": 1}), model_sections) == fp
    assert config_fingerprint(apply_overrides(c, {"align.booster.lam": 1}), model_sections) != fp
    # int vs float spelling of the same value is the same config
    assert config_fingerprint(apply_overrides(c, {"align.booster.lam": 5}), model_sections) == fp
    assert config_fingerprint(c, ["align.booster"]) != config_fingerprint(c, ["align.vaccine"])
    assert config_fingerprint(c) != fp


def test_round_trips(tmp_path):
    c = load_config(None, ["align.method=vaccine", "finetune.optim.max_grad_norm=null",
                           "grid.variants={a: {align.epochs: 3}}", "data.bucket_lengths=[16]"])
    d = config_to_dict(c)
    json.dumps(d)
    assert config_from_dict(d) == c
    save_config(c, str(tmp_path / "out" / "cfg.yaml"))
    assert load_config(str(tmp_path / "out" / "cfg.yaml"), []) == c


def test_file_errors(tmp_path):
    with pytest.raises(BoosterInputError, match="cannot read"):
        load_config(str(tmp_path / "missing.yaml"), [])
    loop = _write(tmp_path / "loop.yaml", {"base": "loop.yaml"})
    with pytest.raises(BoosterInputError, match="loops"):
        load_config(loop, [])
    with pytest.raises(BoosterInputError, match="not valid YAML"):
        load_config(_write(tmp_path / "broken.yaml", "a: [1,\n"), [])
    with pytest.raises(BoosterInputError, match="top level"):
        load_config(_write(tmp_path / "list.yaml", "- 1\n"), [])


def test_repeated_keys_are_named_by_their_path_file_and_lines_all_at_once(tmp_path):
    """Issue 29 item 5: a key given twice inside a nested mapping is named by its dotted path (lora.r, not 'r'),
    with the file and both lines, and every repeat is listed together with the config's other problems."""
    base = _write(tmp_path / "base.yaml", "run:\n  seed: 1\n  seed: 2\n")
    child = _write(tmp_path / "c.yaml", "base: base.yaml\nlora:\n  r: 8\n  alpha: 16\n  r: 4\n"
                                        "align:\n  booster:\n    lam: 1\n    lam: 2\n  method: boster\n"
                                        "grid:\n  variants:\n    a: {align.method: sft, align.method: booster}\n")
    with pytest.raises(BoosterInputError) as ei:
        load_config(child, ["lora.alpha=x"])
    msg = str(ei.value)
    assert "6 problems" in msg.splitlines()[0]
    assert f"  lora.r: given twice in {child} (line 3 and line 5); remove one" in msg
    assert f"  align.booster.lam: given twice in {child} (line 8 and line 9)" in msg
    assert f"  grid.variants.a.align.method: given twice in {child} (line 13 and line 13)" in msg
    assert f"  run.seed: given twice in {base} (line 2 and line 3)" in msg
    assert "align.method: expected one of" in msg and "lora.alpha: expected float, got 'x'" in msg
    assert "  r:" not in msg and "'r'" not in msg


def test_every_malformed_override_on_the_command_line_is_listed(capsys):
    """Issue 29 item 5: two (here four) malformed overrides are all listed, with the config's other problems,
    in the one error the rest of the config errors use -- not an argparse usage line naming one of them."""
    import os

    import run as cli

    smoke = os.path.join(os.path.dirname(__file__), "..", "configs", "synthetic", "smoke.yaml")
    assert cli.main(["plan", smoke, "=1", "noequals", "lora..r=3", "lora.alpha=x", "data.n_eval_task=-1"]) == 2
    err = capsys.readouterr().err
    assert "5 problems" in err and "usage:" not in err
    for piece in ("override '=1': expected key=value", "override 'noequals': expected key=value",
                  "override 'lora..r=3': the key 'lora..r' has an empty part", "lora.alpha: expected float",
                  "data.n_eval_task:"):
        assert piece in err, piece
