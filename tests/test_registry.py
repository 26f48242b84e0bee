"""Methods declare what the rest of the code asks about (MethodSpec), so no module outside methods/
tests a method's name; the declarations are what the stages and the planner read."""

import os
import re

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
