"""Methods declare what the rest of the code asks about (MethodSpec), so no module outside methods/
tests a method's name; the declarations are what the stages and the planner read."""

import os
import re

import numpy as np

from booster_jax.config import ALIGN_METHODS, FINETUNE_METHODS, load_config
from booster_jax.methods.base import METHODS, get_method, method_config
from booster_jax.train.stages import continues_alignment_lora

ROOT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "booster_jax")
NAMES = "|".join(sorted({n for _, n in METHODS} | set(ALIGN_METHODS) | set(FINETUNE_METHODS)))
NAME_TEST = re.compile(rf"""(==|!=)\s*["']({NAMES})["']|startswith\(\s*["']({NAMES})|\bin\s*\(\s*["']({NAMES})["']""")


def test_config_choices_are_the_registered_methods():
    get_method("sft", "align")  # registers the built-ins
    assert set(ALIGN_METHODS) == {n for st, n in METHODS if st == "align"}
    assert set(FINETUNE_METHODS) == {n for st, n in METHODS if st == "finetune"}


def test_no_module_outside_methods_tests_a_method_name():
    hits = []
    for d, _, files in os.walk(ROOT):
        if os.path.relpath(d, ROOT).split(os.sep)[0] == "methods":
            continue
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                for i, line in enumerate(open(path, encoding="utf-8"), 1):
                    if NAME_TEST.search(line):
                        hits.append(f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()}")
    assert not hits, "method names tested outside methods/:\n" + "\n".join(hits)


def test_every_booster_variant_runs_its_passes_in_the_engine_and_keeps_its_lora():
    for name in ("booster", "booster_vaccine"):
        spec = get_method(name, "align")
        assert spec.scanned_passes and spec.passes >= 3 and spec.continues_lora
    for name in ("sft", "vaccine", "repnoise"):
        assert not get_method(name, "align").continues_lora
    assert not get_method("sft", "align").sft_warm_start and get_method("booster", "align").sft_warm_start
    cfg = load_config(None, ["align.method=booster_vaccine"])
    assert continues_alignment_lora(cfg)
    assert not continues_alignment_lora(load_config(None, ["align.method=vaccine"]))
    assert continues_alignment_lora(load_config(None, ["align.method=vaccine", "finetune.continue_alignment_lora=always"]))


def test_method_config_reads_the_declared_sections():
    cfg = load_config(None, ["align.booster.lam=3", "align.vaccine.rho=4"])
    sec = method_config(get_method("booster_vaccine", "align"), cfg.align)
    assert (sec.booster.lam, sec.vaccine.rho) == (3.0, 4.0)
    assert method_config(get_method("booster", "align"), cfg.align) is cfg.align.booster
    assert method_config(get_method("sft", "align"), cfg.align) is None


def test_plan_counts_passes_from_the_spec():
    from booster_jax.plan import make_plan

    for method, plain in (("booster_vaccine", False), ("vaccine", True)):
        p = make_plan(load_config(None, [f"align.method={method}", "plan.compile=false"]))
        align = p["steps"][0]
        assert ("all_passes_total" in align) == plain, method


def test_an_unknown_parameter_is_an_error_not_a_replica():
    import pytest

    from booster_jax import parallel
    from booster_jax.errors import BoosterInputError

    tree = {"layers": {"self_attn": {"q_proj": {"kernel": np.zeros((2, 8, 8))}, "new_proj": {"kernel": np.zeros((2, 8, 8))}}}}
    with pytest.raises(BoosterInputError, match="layers/self_attn/new_proj/kernel"):
        parallel.tree_specs(tree, {"data": 1, "fsdp": 2, "tensor": 1})
    assert parallel.tree_specs({"step": np.zeros(())}, {"data": 1, "fsdp": 2, "tensor": 1})["step"] == parallel.P()
    # not a projection either: a layer norm the schema does not name (a Qwen3-style q_norm), and a head
    for path, shape in ((("layers", "self_attn", "q_norm", "scale"), (2, 8)), (("value_head", "kernel"), (8, 1)),
                        (("layers", "mlp", "q_proj", "kernel"), (2, 8, 8))):  # q_proj in the wrong block
        tree = {"params": {path[0]: {}}}
        node = tree["params"]
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = np.zeros(shape)
        if path[0] in parallel.ROOTS:
            with pytest.raises(BoosterInputError, match="/".join(path)):
                parallel.tree_specs(tree, {"data": 1, "fsdp": 2, "tensor": 1})
        from booster_jax.models.hf import hf_tensor_name
        with pytest.raises(BoosterInputError, match="not in the model's schema"):
            hf_tensor_name(path)


def test_plan_refuses_a_mesh_that_leaves_a_big_parameter_whole():
    import pytest

    from booster_jax.errors import BoosterInputError
    from booster_jax.plan import make_plan

    # Llama-2 + [PAD]: 32001 vocabulary rows do not divide tensor=2, and D has no fsdp split to fall back on
    cfg = load_config(None, ["model.path=meta-llama/Llama-2-7b-hf", "mesh.data=1", "mesh.tensor=2",
                             "plan.devices=2", "plan.compile=false"])
    with pytest.raises(BoosterInputError, match="embed_tokens/embedding"):
        make_plan(cfg)
    make_plan(load_config(None, ["model.path=meta-llama/Llama-2-7b-hf", "mesh.fsdp=2", "plan.devices=2",
                                 "plan.compile=false"]))
