"""Typed run configuration: dataclasses whose defaults are the paper's protocol.

`load_config` is a pure function of YAML files and `key=value` strings: every
problem (unknown key, wrong type, out-of-range value, bad grid variant) is
collected and raised as one `BoosterInputError` before any model or data is
touched, so a long run never dies on a typo an hour in.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import logging
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import yaml

from booster_jax.errors import BoosterInputError
from booster_jax.models.schema import DTYPE_NAMES, LORA_TARGETS

log = logging.getLogger(__name__)

ALIGN_METHODS = ("sft", "booster", "vaccine", "repnoise", "booster_vaccine")
FINETUNE_METHODS = ("sft", "lisa")
TASKS = ("sst2", "agnews", "gsm8k", "alpaca")
JUDGES = ("beaver_dam", "synthetic", "keyword-refusal")
SCHEDULES = ("constant", "linear", "cosine")

# Range checks: (what was expected, predicate). Applied element-wise to lists.
POS = ("a value > 0", lambda v: v > 0)
NONNEG = ("a value >= 0", lambda v: v >= 0)
UNIT = ("a value in [0, 1]", lambda v: 0 <= v <= 1)
UNIT_OPEN = ("a value in [0, 1)", lambda v: 0 <= v < 1)
DEVICES = ("-1 (all remaining devices) or a value >= 1", lambda v: v == -1 or v >= 1)
ROW_OR_SAME = ("a row number >= 0, or -1 (the alignment rows)", lambda v: v >= -1)
GRAD_NORM = ("a value >= 0 or null (0/null = no clipping)", lambda v: v is None or v >= 0)


def _f(default, check=None, choices=None, nonempty=False):
    """A dataclass field carrying its validation rule in metadata (``choices`` may be a callable returning them)."""
    meta = {"check": check, "choices": choices, "nonempty": nonempty}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


setting = _f  # the public name: a method's own config section declares its fields with it (docs/extending.md)


def method_names(stage: str) -> tuple[str, ...]:
    """The methods ``{stage}.method`` may name: the built-in ones, then those registered from plugins."""
    return (ALIGN_METHODS if stage == "align" else FINETUNE_METHODS) + tuple(EXTENSION_METHODS[stage])


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""  # local HF dir or hub id; "" = the embedded synthetic world
    dtype: str = _f("bfloat16", choices=DTYPE_NAMES)  # compute dtype
    param_dtype: str = _f("bfloat16", choices=DTYPE_NAMES)
    add_pad_token: bool = True  # add [PAD], new embedding rows = mean (official code)
    scan_layers: bool = True
    # what the backward pass keeps of each layer: none (everything), full (recompute each layer),
    # dots (keep the projections' outputs, recompute the rest); booster_jax/models/llama.py REMAT_POLICIES
    remat: str = _f("none", choices=("none", "full", "dots"))


@dataclass(frozen=True)
class LoraConfig:
    r: int = _f(32, POS)
    alpha: float = _f(4.0, POS)
    dropout: float = _f(0.0, UNIT_OPEN)
    targets: list[str] = _f(["q_proj", "k_proj", "v_proj"], choices=LORA_TARGETS, nonempty=True)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW; the lr default is the alignment one (fine-tuning overrides it)."""
    lr: float = _f(5e-4, POS)
    weight_decay: float = _f(0.1, NONNEG)
    max_grad_norm: float | None = _f(1.0, GRAD_NORM)
    schedule: str = _f("constant", choices=SCHEDULES)
    warmup_steps: int = _f(0, NONNEG)
    b1: float = _f(0.9, UNIT_OPEN)
    b2: float = _f(0.999, UNIT_OPEN)
    eps: float = _f(1e-8, POS)
    # HF gradient_accumulation_steps: the optimizer steps once per this many micro-batches (of batch_size
    # rows each) on their mean gradient; stage steps, epochs and logs still count micro-batches
    accumulate_steps: int = _f(1, POS)


@dataclass(frozen=True)
class BoosterConfig:
    lam: float = _f(5.0, NONNEG)
    alpha: float = _f(0.1, NONNEG)
    perturbed_term: bool = True  # False = the paper's ablation without -lam * g2
    eps: float = _f(1e-7, POS)


@dataclass(frozen=True)
class VaccineConfig:
    rho: float = _f(2.0, NONNEG)


@dataclass(frozen=True)
class RepNoiseConfig:
    # official script/alignment/repNoise.sh: alpha=0.1 (passed as --rho), beta=0.001 (--lamb)
    alpha: float = _f(0.1, NONNEG)  # gradient-ascent coefficient
    beta: float = _f(0.001, NONNEG)  # noise coefficient
    # official quirk: the harmful CE targets are ids * (bfloat16 mask), so ids > 256 are rounded to
    # bfloat16 (e.g. 29871 -> 29824); false = exact ids (see methods/repnoise.py)
    bf16_label_rounding: bool = True


@dataclass(frozen=True)
class LisaConfig:
    rho: float = _f(0.01, NONNEG)  # proximal coefficient (official script/finetune/lisa_poison_ratio.sh: RHO=0.01)
    align_steps: int = _f(100, NONNEG)  # official bi-state step counts
    finetune_steps: int = _f(900, NONNEG)
    # the proximal term is off for the first proximal_warmup * (stage steps) steps (official ADMMTrainer: 0.1)
    proximal_warmup: float = _f(0.1, UNIT)


@dataclass(frozen=True)
class AlignConfig:
    method: str = _f("booster", choices=lambda: method_names("align"))
    epochs: int = _f(20, NONNEG)
    max_steps: int = _f(0, NONNEG)  # 0 = epochs decide
    batch_size: int = _f(10, POS)
    optim: OptimConfig = _f(OptimConfig(lr=5e-4))
    booster: BoosterConfig = _f(BoosterConfig())
    vaccine: VaccineConfig = _f(VaccineConfig())
    repnoise: RepNoiseConfig = _f(RepNoiseConfig())
    warmup_sft_steps: int = _f(0, NONNEG)  # deviation: plain SFT steps before the method
    # at the switch from the warm start to the method: "reset" the AdamW state (moments, step count) or "keep" it
    warmup_optimizer: str = _f("reset", choices=("reset", "keep"))
    # deviation (0 = paper): the share of each alignment batch that is benign instruction data (on average:
    # round(f / (1 - f) * #refusals) benign examples drawn once with data.seed and shuffled in; 0.5 = as many
    # benign examples as refusals, half of each batch)
    benign_fraction: float = _f(0.0, UNIT_OPEN)
    # with benign_fraction: drop the benign rows whose response the run's judge (eval.judge) flags as harmful
    benign_filter: bool = False
    harmful_batch_size: int = _f(10, POS)


@dataclass(frozen=True)
class FinetuneConfig:
    method: str = _f("sft", choices=lambda: method_names("finetune"))
    epochs: int = _f(20, NONNEG)
    max_steps: int = _f(0, NONNEG)
    batch_size: int = _f(10, POS)
    optim: OptimConfig = _f(OptimConfig(lr=1e-5))
    lisa: LisaConfig = _f(LisaConfig())
    # auto: methods that declare it (MethodSpec.continues_lora: Booster, Booster + Vaccine) continue their alignment LoRA, others merge it
    # into the base and train a fresh LoRA (as the official code).
    continue_alignment_lora: str = _f("auto", choices=("auto", "always", "never"))
    # every k steps, the loss on the attack's harmful samples (the paper's Fig. 3); 0 = off
    track_every: int = _f(0, NONNEG)
    # with track_every: also the HS on the first k unseen harmful prompts at those steps; 0 = off
    track_hs_prompts: int = _f(0, NONNEG)


@dataclass(frozen=True)
class DataConfig:
    alignment_file: str = ""  # refusal-format json; "" = synthetic world
    align_start: int = _f(5001, NONNEG)
    align_end: int = _f(10000, POS)
    # Row roles in the refusal file; the defaults are the official layout (booster_jax/data/mixture.py).
    harmful_start: int = _f(-1, ROW_OR_SAME)  # Booster's harmful set: rows harmful_start..harmful_end-1;
    harmful_end: int = _f(-1, ROW_OR_SAME)  # -1 = the alignment rows' prompt/response pairs (official)
    attack_start: int = _f(1, NONNEG)  # the attack's harmful rows start here (official: 0 < i < int(p*n))
    attack_order: str = _f("in_order", choices=("in_order", "sampled"))  # sampled: with data.seed
    attack_pool_end: int = _f(0, NONNEG)  # sampled: from rows attack_start..attack_pool_end-1 (0 = file end)
    task_order: str = _f("first", choices=("first", "sampled"))  # the attack's benign task rows (official: first)
    task: str = _f("sst2", choices=TASKS)
    task_file: str = ""
    task_eval_file: str = ""
    eval_harmful_file: str = ""
    # the split to read when a file above is a hub dataset id ("" = a local file or folder), e.g.
    # eval_harmful_file: PKU-Alignment/BeaverTails with eval_harmful_split: 30k_test; the task's evaluation
    # reads task_eval_split, else task_split
    alignment_split: str = ""
    task_split: str = ""
    task_eval_split: str = ""
    eval_harmful_split: str = ""
    n_finetune: int = _f(1000, POS)
    harmful_ratio: float = _f(0.1, UNIT)
    n_eval_harmful: int = _f(1000, NONNEG)
    n_eval_task: int = _f(872, NONNEG)
    n_eval_benign: int = _f(200, NONNEG)  # safe prompts of the eval file: the over-refusal rate
    max_length: int = _f(256, POS)
    template: str = _f("alpaca", choices=("alpaca", "chat"))  # chat = the tokenizer's chat template
    bucket_lengths: list[int] = _f([64, 128, 256], POS, nonempty=True)
    # less padding (both off = the official random sampler; data/batches.py says what each changes):
    group_by_length: bool = False  # HF group_by_length: batches of similar lengths, same examples per step
    pack: bool = False  # pack the fine-tuning (task) stream's examples into rows of pack_length tokens
    pack_length: int = _f(0, NONNEG)  # 0 = the largest bucket
    skip_bad_rows: bool = False
    benign_file: str = ""  # instruction file for align.benign_fraction
    drop_last: bool = False  # drop each epoch's last partial batch (HF dataloader_drop_last); official: keep
    # over-refusal prompts: "" = the safe rows of eval_harmful_file; else a file of prompts (rows with a
    # string 'prompt' or 'instruction' (+ optional 'input'), e.g. an instruction file)
    eval_benign_file: str = ""
    seed: int = 42


@dataclass(frozen=True)
class EvalConfig:
    judge: str = _f("beaver_dam", choices=JUDGES)
    judge_path: str = ""
    # the BeaverDam judge's weights: auto = bfloat16 on an accelerator, float32 on CPU
    judge_dtype: str = _f("auto", choices=("auto", "float32", "bfloat16"))
    # false: the judge is loaded for each evaluation and released after it, never beside training
    keep_judge_loaded: bool = False
    # answers are saved every this many prompts, so a killed evaluation resumes without redoing them
    chunk_prompts: int = _f(64, POS)
    max_new_tokens_harmful: int = _f(512, POS)
    max_new_tokens_task: int = _f(64, POS)
    batch_size: int = _f(16, POS)
    enabled: bool = True


@dataclass(frozen=True)
class MeshConfig:
    data: int = _f(-1, DEVICES)
    fsdp: int = _f(1, POS)
    tensor: int = _f(1, POS)


@dataclass(frozen=True)
class PlanConfig:
    """``python run.py plan``: memory per device for a (possibly hypothetical) mesh; no weights are read."""
    devices: int = _f(0, NONNEG)  # 0 = the devices this process sees
    device_memory_gb: float = _f(0.0, NONNEG)  # 0 = the local device's limit when JAX reports one
    compile: bool = True  # also compile the steps for memory_analysis() when the mesh fits the local devices


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = _f("runs/default", nonempty=True)
    seed: int = 42
    checkpoint_every: int = _f(100, NONNEG)  # steps; 0 = only at the end
    keep_last: int = _f(2, POS)
    log_every: int = _f(10, POS)
    # results shared by output directories, keyed by content fingerprint: the base model's evaluation, SFT
    # warm-start steps, file digests. "" = a "cache" directory next to output_dir; cache: false = none
    cache_dir: str = ""
    cache: bool = True
    # continue a stage stopped by a NaN/inf from its last good checkpoint although its optimizer
    # settings changed (they are part of the stage fingerprint, so otherwise it starts over)
    resume_diverged: bool = False
    # also write each logged metric as a TensorBoard scalar under <stage dir>/tensorboard (needs tensorboardX)
    tensorboard: bool = False
    # defenses from outside the package (booster_jax/plugins.py): .py files (a path in a YAML file is relative
    # to that file) or module names, imported before the config is checked; docs/extending.md
    plugins: list[str] = _f([])


@dataclass(frozen=True)
class GridConfig:
    # name -> {dotted key: value}; empty = the base config alone
    variants: dict[str, dict[str, Any]] = _f({})
    harmful_ratios: list[float] = _f([0.1], UNIT, nonempty=True)
    seeds: list[int] = _f([42], nonempty=True)


@dataclass(frozen=True)
class WorldConfig:
    """The embedded synthetic world, used when model.path is empty."""
    dir: str = "runs/world"  # where its data files are generated (shared by runs)
    seed: int = 0  # the committed base model belongs to seed 0; another seed pre-trains a new one


@dataclass(frozen=True)
class Config:
    """The whole run, one section per part; every default is the paper's value (``load_config`` builds it)."""
    model: ModelConfig = _f(ModelConfig())
    lora: LoraConfig = _f(LoraConfig())
    data: DataConfig = _f(DataConfig())
    align: AlignConfig = _f(AlignConfig())
    finetune: FinetuneConfig = _f(FinetuneConfig())
    eval: EvalConfig = _f(EvalConfig())
    mesh: MeshConfig = _f(MeshConfig())
    run: RunConfig = _f(RunConfig())
    grid: GridConfig = _f(GridConfig())
    world: WorldConfig = _f(WorldConfig())
    plan: PlanConfig = _f(PlanConfig())


# ---------------------------------------------------------------- sections declared by plugin methods

# Methods registered from outside the package (methods.base.register adds them): stage -> names, and
# the config section each declares: stage -> {section name: frozen dataclass}. The schema grows by these.
EXTENSION_METHODS: dict[str, list[str]] = {"align": [], "finetune": []}
EXTENSION_SECTIONS: dict[str, dict[str, type]] = {"align": {}, "finetune": {}}
EXTENSION_SOURCES: set[str] = set()  # the files those methods were registered from
_STAGE_CLASSES = {"align": AlignConfig, "finetune": FinetuneConfig}
_SUPPORTED = (bool, int, float, str)


def _section_problems(stage: str, section: str, cls) -> list[str]:
    """What is wrong with a method's declared config section (empty = nothing)."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", section or ""):
        return [f"config_section {section!r}: expected a lower-case identifier (it is the key {stage}.<section>)"]
    if section in {f.name for f in dataclasses.fields(_STAGE_CLASSES[stage])}:
        return [f"config_section {section!r}: {stage}.{section} is a built-in key; choose another name"]
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        return [f"config_class {cls!r}: expected a dataclass (@dataclasses.dataclass(frozen=True))"]
    probs = [] if cls.__dataclass_params__.frozen else [f"config_class {cls.__name__}: expected frozen=True "
                                                          "(a config never changes once checked)"]
    try:
        hints = typing.get_type_hints(cls)
    except Exception as e:  # noqa: BLE001 - an annotation that does not resolve
        return probs + [f"config_class {cls.__name__}: its annotations do not resolve ({e})"]
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            probs.append(f"{stage}.{section}.{f.name}: expected a default value (every setting has one)")
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if not (tp in _SUPPORTED or typing.get_origin(tp) is list and inner and inner[0] in _SUPPORTED
                or typing.get_origin(tp) in (typing.Union, types.UnionType) and len(inner) == 1
                and inner[0] in _SUPPORTED):
            probs.append(f"{stage}.{section}.{f.name}: type {tp!r} is not one a config reads; expected bool, "
                         "int, float, str, a list of one of them, or one of them | None")
    return probs


def add_method(stage: str, name: str, section: str = "", cls=None, replace: bool = False, source: str = "") -> None:
    """Make a plugin method's name (and its own section, ``{stage}.{section}``, read as ``cls``) part of
    the schema. ``replace``: the same plugin registers again (its file was edited and imported anew);
    ``source``: the file that registered it."""
    if section and cls is not None:
        if section in EXTENSION_SECTIONS[stage] and not replace:
            raise BoosterInputError(f"config_section {section!r}: {stage}.{section} is declared already by "
                                    "another plugin method; choose another name")
        probs = _section_problems(stage, section, cls)
        if probs:
            raise BoosterInputError(f"method {name!r}: bad config section: " + "; ".join(probs))
        EXTENSION_SECTIONS[stage][section] = cls
    if name not in EXTENSION_METHODS[stage]:
        EXTENSION_METHODS[stage].append(name)
    if source:
        EXTENSION_SOURCES.add(source)
    _SCHEMAS.clear()


_SCHEMAS: dict[tuple, type] = {}


def schema() -> type:
    """``Config``, or a subclass whose align / finetune sections hold the plugin methods' own sections."""
    key = tuple((st, n, c) for st in ("align", "finetune") for n, c in EXTENSION_SECTIONS[st].items())
    if not key:
        return Config
    if key not in _SCHEMAS:
        stage_classes = {}
        for st, base in _STAGE_CLASSES.items():
            fields = [(n, c, field(default_factory=c)) for n, c in EXTENSION_SECTIONS[st].items()]
            stage_classes[st] = dataclasses.make_dataclass(base.__name__, fields, bases=(base,), frozen=True,
                                                           namespace={"__module__": __name__}) if fields else base
        _SCHEMAS[key] = dataclasses.make_dataclass(
            "Config", [(st, c, field(default_factory=c)) for st, c in stage_classes.items()], bases=(Config,),
            frozen=True, namespace={"__module__": __name__})
    return _SCHEMAS[key]


def extension_sections(stage: str) -> tuple[str, ...]:
    """The sections plugin methods added to ``stage`` (they stay out of other methods' fingerprints)."""
    return tuple(EXTENSION_SECTIONS[stage])


# ---------------------------------------------------------------- coercion

_BAD = object()  # marks a value that failed coercion (already reported)


class _Problems:
    def __init__(self):
        self.lines: list[str] = []
        self.keys: set[str] = set()  # keys that fell back to their default

    def add(self, key: str, msg: str) -> None:
        self.lines.append(f"{key}: {msg}")
        self.keys.add(key.split("[")[0])

    def amend(self, key: str, note: str) -> None:
        """Add ``note`` to the problem already reported for ``key``: what likely caused it."""
        self.lines = [f"{line} ({note})" if line.startswith(key + ": ") else line for line in self.lines]

    def raise_if_any(self, source: str) -> None:
        if self.lines:
            where = f" ({source})" if source else ""
            n = len(self.lines)
            head = f"invalid configuration{where}: {n} problem{'s' * (n != 1)}"
            raise BoosterInputError("\n".join([head] + ["  " + l for l in self.lines]))


def _all_paths(cls, prefix="") -> list[str]:
    """Every dotted key of the schema, sections included."""
    out = []
    for name, tp in typing.get_type_hints(cls).items():
        out.append(prefix + name)
        if dataclasses.is_dataclass(tp):
            out += _all_paths(tp, prefix + name + ".")
    return out


def _suggest(name: str, siblings: Iterable[str], prefix: str) -> str:
    close = difflib.get_close_matches(name, list(siblings), n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    # the right name in the wrong section, e.g. align.lam -> align.booster.lam
    elsewhere = [p for p in _all_paths(schema()) if p.rsplit(".", 1)[-1] == name]
    elsewhere.sort(key=lambda p: not p.startswith(prefix))  # same section first
    return f" (did you mean {' or '.join(map(repr, elsewhere[:3]))}?)" if elsewhere else ""


def _flatten(d: Mapping, prefix="") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _coerce(v, tp, key: str, probs: _Problems):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(v, tp, key + ".", probs)
    if origin in (typing.Union, types.UnionType):  # Optional[X]
        if v is None:
            return None
        return _coerce(v, next(a for a in args if a is not type(None)), key, probs)
    if origin is list:
        if not isinstance(v, (list, tuple)):
            probs.add(key, f"expected a list, got {v!r}")
            return _BAD
        return [_coerce(x, args[0], f"{key}[{i}]", probs) for i, x in enumerate(v)]
    if origin is dict:  # grid.variants: name -> {dotted key: value}
        if not isinstance(v, Mapping):
            probs.add(key, f"expected a mapping of name -> overrides, got {v!r}")
            return _BAD
        out = {}
        for name, ov in v.items():
            if not isinstance(ov, Mapping) and ov is not None:
                probs.add(f"{key}.{name}", f"expected a mapping of dotted overrides, got {ov!r}")
            elif not re.fullmatch(r"[A-Za-z0-9_.+-]+", str(name)):
                probs.add(f"{key}.{name}", "variant names must be usable as directory names")
            else:
                out[str(name)] = _flatten(ov or {})
        return out
    if tp is Any:
        return v
    ok = _scalar(v, tp)
    if ok is _BAD:
        probs.add(key, f"expected {getattr(tp, '__name__', tp)}, got {v!r}")
    return ok


def _scalar(v, tp):
    """v as bool/int/float/str, or _BAD. Never reads True as 1."""
    if tp is bool or isinstance(v, bool):
        return v if tp is bool and isinstance(v, bool) else _BAD
    if tp is int:
        if isinstance(v, float) and v.is_integer() or isinstance(v, str) and re.fullmatch(r"\s*[-+]?\d+\s*", v):
            return int(v)
        return v if isinstance(v, int) else _BAD
    if tp is float and isinstance(v, (int, float, str)):
        try:  # YAML 1.1 reads "1e-5" as a string
            x = float(v)
        except ValueError:
            return _BAD
        return x if math.isfinite(x) else _BAD
    if tp is str:  # a bare number is a fine path or name
        return v if isinstance(v, str) else (str(v) if isinstance(v, (int, float)) else _BAD)
    return _BAD


def _check(value, f: dataclasses.Field, key: str, probs: _Problems) -> bool:
    n_before = len(probs.lines)
    meta = f.metadata
    items = value if isinstance(value, list) else [value]
    if meta.get("nonempty") and not (value.strip() if isinstance(value, str) else value):
        probs.add(key, "expected a non-empty value" if isinstance(value, str) else "expected a non-empty list")
    for i, x in enumerate(items):
        if x is _BAD:  # already reported; still range-check its neighbours
            continue
        k = f"{key}[{i}]" if isinstance(value, list) else key
        choices = meta["choices"]() if callable(meta.get("choices")) else meta.get("choices")
        if choices and x not in choices:
            close = difflib.get_close_matches(str(x), choices, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            probs.add(k, f"expected one of {', '.join(choices)}, got {x!r}{hint}")
        if meta.get("check") and not meta["check"][1](x):
            probs.add(k, f"expected {meta['check'][0]}, got {x!r}")
    return len(probs.lines) == n_before


# keys that changed meaning or name: the message says what to write instead
RENAMED = {
    "align.benign_mix": "renamed align.benign_fraction, the share of each alignment batch that is benign: "
                        "benign_mix m is benign_fraction m / (1 + m), so benign_mix 1.0 is benign_fraction 0.5",
}


def _build(raw, cls, prefix: str, probs: _Problems):
    """Build dataclass `cls` from a mapping, reporting every problem into `probs`."""
    if not isinstance(raw, Mapping):
        probs.add(prefix.rstrip("."), f"expected a mapping, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in raw:
        if prefix + str(k) in RENAMED:
            probs.add(prefix + str(k), RENAMED[prefix + str(k)])
        elif k not in names:
            probs.add(prefix + str(k), "unknown key" + _suggest(str(k), names, prefix))
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue  # dataclass default
        key = prefix + f.name
        value = _coerce(raw[f.name], hints[f.name], key, probs)
        bad_item = isinstance(value, list) and any(x is _BAD for x in value)
        if value is not _BAD and _check(value, f, key, probs) and not bad_item:
            kwargs[f.name] = value  # else keep the default so later checks stay sane
    return cls(**kwargs)


def _cross_checks(cfg: Config, probs: _Problems) -> None:
    d = cfg.data
    if d.align_start >= d.align_end and not {"data.align_start", "data.align_end"} & probs.keys:
        probs.add("data.align_start", f"expected < data.align_end ({d.align_end}), got {d.align_start}")
    if (d.harmful_start == -1) != (d.harmful_end == -1):
        probs.add("data.harmful_start", "set data.harmful_start and data.harmful_end together (-1 for both = the "
                                        f"alignment rows), got {d.harmful_start} and {d.harmful_end}")
    elif d.harmful_start >= 0 and d.harmful_start >= d.harmful_end:
        probs.add("data.harmful_start", f"expected < data.harmful_end ({d.harmful_end}), got {d.harmful_start}")
    if d.attack_order == "in_order" and d.attack_pool_end:
        probs.add("data.attack_pool_end", "only used with data.attack_order: sampled")
    if d.pack and d.pack_length and d.pack_length < max(d.bucket_lengths):
        probs.add("data.pack_length", f"expected 0 or >= the largest bucket ({max(d.bucket_lengths)}): a packed row "
                  f"must hold any example, got {d.pack_length}")
    if len(set(cfg.lora.targets)) != len(cfg.lora.targets):
        probs.add("lora.targets", f"expected no duplicates, got {cfg.lora.targets}")
    for name, ov in cfg.grid.variants.items():
        if any(k == "grid" or k.startswith("grid.") for k in ov):
            probs.add(f"grid.variants.{name}", "a variant may not override grid.*")
            continue
        if "run.plugins" in ov:
            probs.add(f"grid.variants.{name}", "a variant may not override run.plugins (plugins are imported once, "
                                               "before the grid is expanded); list them in the top-level run.plugins")
            continue
        sub = _Problems()
        base = config_to_dict(cfg)
        base["grid"]["variants"] = {}  # a variant is checked alone, not recursively
        base["run"]["plugins"] = []  # imported (or reported) once, for the whole config
        _set_all(base, ov, sub)
        _from_raw(base, sub)
        for line in sub.lines:
            probs.add(f"grid.variants.{name}", line)


# ---------------------------------------------------------------- public API

def config_to_dict(cfg) -> dict:
    """Plain nested dict (lists, not tuples) that JSON and YAML can write."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _set_path(raw: dict, dotted: str, value, probs: _Problems) -> None:
    parts = dotted.split(".")
    node = raw
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            probs.add(dotted, f"'{'.'.join(parts[:i + 1])}' is a value, not a section")
            return
        node = nxt
    node[parts[-1]] = copy.deepcopy(value)


def _set_all(raw: dict, overrides: Mapping[str, Any], probs: _Problems) -> None:
    for k, v in overrides.items():
        _set_path(raw, str(k), v, probs)


def _load_plugins(raw: Mapping, probs: _Problems) -> list[str]:
    """Import ``run.plugins`` (and installed entry points) before the schema is read: their methods and
    sections must exist for the config to be checked. A malformed list is left to ``_build`` to report.
    Returns the plugin names it imported from."""
    from booster_jax import plugins

    names = raw.get("run", {}).get("plugins") if isinstance(raw.get("run"), Mapping) else None
    names = names if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names) else []
    for key, msg in plugins.load(names):
        probs.add(key, msg)
    return list(names)


def _explain_unknown_methods(raw: Mapping, plugin_names: list[str], probs: _Problems) -> None:
    """An unknown ``{stage}.method`` gets its two usual causes added when they hold: the name is the other
    stage's method, or a plugin file imported fine but registered no method (its ``register`` call never ran)."""
    from booster_jax import plugins

    silent = [n for n in plugin_names if plugins.is_file(n) and plugins.imported(n)
              and os.path.realpath(n) not in EXTENSION_SOURCES]
    for stage, other in (("align", "finetune"), ("finetune", "align")):
        if f"{stage}.method" not in probs.keys:
            continue
        section = raw.get(stage)
        name = section.get("method") if isinstance(section, Mapping) else None
        notes = []
        if isinstance(name, str) and name in method_names(other):
            notes.append(f"{name!r} is a{'n' * (other == 'align')} {other} method: {other}.method={name}")
        if silent:
            notes.append(f"run.plugins: {', '.join(silent)} registered no method; a defense file calls "
                         "booster_jax.register(MethodSpec(...)), docs/extending.md")
        if notes:
            probs.amend(f"{stage}.method", "; ".join(notes))


def _from_raw(raw: Mapping, probs: _Problems) -> Config:
    plugin_names = _load_plugins(raw, probs)
    # Merge onto the full defaults so a partial section keeps its parent's
    # defaults (finetune.optim.lr stays 1e-5 when only weight_decay is given).
    cls = schema()
    cfg = _build(_merge(config_to_dict(cls()), raw), cls, "", probs)
    _explain_unknown_methods(raw, plugin_names, probs)
    _cross_checks(cfg, probs)  # bad values fell back to defaults, so this is safe
    return cfg


def config_from_dict(data: Mapping, source: str = "") -> Config:
    """Validated Config from a (possibly partial) nested dict; missing keys = defaults."""
    probs = _Problems()
    cfg = _from_raw(data, probs)
    probs.raise_if_any(source)
    return cfg


def apply_overrides(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    """New validated Config with {dotted key: value} applied (expands grid variants)."""
    probs = _Problems()
    raw = config_to_dict(cfg)
    _set_all(raw, overrides, probs)
    new = _from_raw(raw, probs)
    probs.raise_if_any("overrides")
    return new


def _merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, Mapping) else v
    return out


def _repeated_keys(node, prefix: str = "") -> list[tuple[str, int, int]]:
    """(dotted path, first line, repeated line) of every key given twice in one mapping, at any depth
    (PyYAML keeps the last value silently). Lines are 1-based."""
    found = []
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            path = f"{prefix}.{key}" if prefix and key is not None else (key or prefix)
            if key is not None and key != "<<":
                line = key_node.start_mark.line + 1
                if key in first:
                    found.append((path, first[key], line))
                else:
                    first[key] = line
            found += _repeated_keys(value_node, path)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found += _repeated_keys(item, f"{prefix}[{i}]")
    return found


def _read_yaml(path: str, probs: _Problems, seen: tuple[str, ...] = ()) -> dict:
    """A YAML mapping with its `base:` chain merged underneath it. A key given twice in one mapping is a
    problem added to ``probs`` (named by its dotted path, file and lines), reported with all the others."""
    real = os.path.realpath(path)
    if real in seen:
        raise BoosterInputError(f"{path}: 'base' chain loops back to itself")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        for key, first, again in _repeated_keys(yaml.compose(text, Loader=yaml.SafeLoader)):
            probs.add(key, f"given twice in {path} (line {first} and line {again}); remove one")
        data = yaml.safe_load(text)
    except OSError as e:
        raise BoosterInputError(f"{path}: cannot read config file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise BoosterInputError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                                "save the config file as UTF-8") from None
    except yaml.YAMLError as e:
        raise BoosterInputError(f"{path}: not valid YAML: {e}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise BoosterInputError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    _plugins_relative_to(data, path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise BoosterInputError(f"{path}: 'base' must be a file name, got {base!r}")
    base_path = os.path.join(os.path.dirname(path), base)
    return _merge(_read_yaml(base_path, probs, seen + (real,)), data)


def _plugins_relative_to(data: dict, path: str) -> None:
    """A plugin file named in a YAML file is found next to that file, as ``base:`` is (module names stay)."""
    from booster_jax.plugins import is_file

    run = data.get("run")
    names = run.get("plugins") if isinstance(run, dict) else None
    if isinstance(names, list):
        run["plugins"] = [os.path.normpath(os.path.join(os.path.dirname(path), n))
                          if isinstance(n, str) and is_file(n) and not os.path.isabs(n) else n for n in names]


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=value' -> ('a.b', value parsed as a YAML scalar or list)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise BoosterInputError(f"override {text!r}: expected key=value, e.g. align.booster.lam=1")
    if not all(part.strip() for part in key.strip().split(".")):
        raise BoosterInputError(f"override {text!r}: the key {key.strip()!r} has an empty part; expected dotted "
                                "names, e.g. align.booster.lam=1")
    if not value.strip():
        return key.strip(), ""
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        return key.strip(), value


def load_config(path: str | None = None, overrides: Sequence[str] = (),
                extra_checks: Callable[[Config], Iterable[tuple[str, str]]] | None = None) -> Config:
    """Defaults <- YAML (with its `base:` chain) <- `key=value` overrides, validated.

    ``extra_checks(cfg) -> [(key, problem)]``: further checks (data files, mesh) run even when values
    are bad (on a config where those fell back to their defaults), so every problem is reported at once.
    """
    probs = _Problems()
    raw = _read_yaml(path, probs) if path else {}
    for text in overrides:
        try:
            _set_path(raw, *parse_override(text), probs)
        except BoosterInputError as e:
            probs.lines.append(str(e))
    cfg = _from_raw(raw, probs)
    if extra_checks is not None:
        for key, msg in extra_checks(cfg):
            if key not in probs.keys:  # a bad value already reported is not checked twice
                probs.add(key, msg)
    probs.raise_if_any(" + ".join(filter(None, [path, "overrides" if overrides else ""])))
    return cfg


def overrides_the_variants_replace(cfg: Config, overrides: Sequence[str]) -> list[tuple[str, str]]:
    """[(key, problem)] for command-line ``key=value`` overrides that every grid variant sets too; a warning for
    those that some variants set. Each run of the grid applies its variant's overrides on top of the config
    (``pipeline.align_runs``), so there the variant's value wins: an override that every variant replaces
    changes nothing, silently, and one that some replace reaches only the others. For the commands that run
    the grid (``run.py``'s preflight); elsewhere (``plan``, the Python API) the top-level value is the one used.
    A malformed override is skipped here: ``load_config`` reports it."""
    variants, problems = cfg.grid.variants, []
    for text in overrides if variants else ():
        try:
            key = parse_override(text)[0]
        except BoosterInputError:
            continue
        if key == "grid" or key.startswith("grid."):
            continue
        setters = {}
        for name, ov in variants.items():
            hit = next((k for k in ov if key == k or key.startswith(k + ".")), None)
            if hit is not None:
                setters[name] = f"{name}: {hit}={ov[hit]!r}"
        if not setters:
            continue
        own = f"grid.variants.{next(iter(setters))}.{key}=..."
        if len(setters) == len(variants):
            problems.append((key, f"every grid variant sets it ({', '.join(setters.values())}), and a variant's "
                                  f"value wins over the command line, so this override changes nothing; override a "
                                  f"variant's own value ({own}) or run without the variants (grid.variants={{}})"))
        else:
            which = (f"grid variant {next(iter(setters))} sets it itself" if len(setters) == 1
                     else f"grid variants {', '.join(setters)} set it themselves")
            log.warning("the override %s reaches only the grid variants that do not set it: %s (%s), and a "
                        "variant's value wins; to change theirs, override it per variant (%s)",
                        key, which, "; ".join(setters.values()), own)
    return problems


def config_fingerprint(cfg: Config, sections: Sequence[str] | None = None, omit: Sequence[str] = ()) -> str:
    """sha256 of the canonical JSON of the given (possibly dotted) sections; None = all. ``omit``: dotted
    keys left out (plugin sections a stage's method does not read)."""
    d = config_to_dict(cfg)
    for o in omit:
        *parents, last = o.split(".")
        node = d
        for p in parents:
            node = node.get(p, {})
        node.pop(last, None)
    picked = {}
    for s in sections if sections is not None else sorted(d):
        node = d
        for p in s.split("."):
            node = node[p]
        picked[s] = node
    blob = json.dumps(picked, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_dir(cfg: Config) -> str | None:
    """Where fingerprint-keyed results shared by output directories live (None = no sharing)."""
    if not cfg.run.cache:
        return None
    if cfg.run.cache_dir:
        return cfg.run.cache_dir
    return os.path.join(os.path.dirname(os.path.normpath(cfg.run.output_dir)) or ".", "cache")


def save_config(cfg: Config, path: str) -> None:
    from booster_jax import files

    files.write_text_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
