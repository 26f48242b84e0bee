"""The evaluate stage: Harmful Score on unseen harmful prompts, Finetune Accuracy on the user's task,
and held-out losses. Writes one JSON line per sample and a summary JSON; reuses a finished evaluation."""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from booster_jax import files, rundir
from booster_jax import fingerprint as fingerprint_mod
from booster_jax.config import Config, EvalConfig
from booster_jax.data import formats
from booster_jax.data.batches import collate
from booster_jax.data.template import Example, prompt_text, special_tokens_for, tokenize_examples
from booster_jax.errors import BoosterInputError
from booster_jax.eval import judges as judges_mod
from booster_jax.eval import tasks
from booster_jax.eval.generate import generate_text
from booster_jax.eval.resumable import GenerationLog, resumable_answers
from booster_jax.methods.base import jitted_loss

log = logging.getLogger(__name__)

def make_judge(cfg: Config):
    """The run's judge (``eval.judge``); BeaverDam is loaded on demand, so its weights never sit beside training."""
    import booster_jax.eval.synthetic_judge  # noqa: F401  (registers "synthetic")

    if cfg.eval.judge == "beaver_dam":
        import booster_jax.eval.beaver_dam  # noqa: F401  (registers "beaver_dam")
    if cfg.eval.judge == "beaver_dam":
        from booster_jax import parallel

        kwargs = {"path": cfg.eval.judge_path, "dtype": judge_dtype(cfg), "mesh": parallel.mesh_for(cfg)}
        return judges_mod.OnDemandJudge(cfg.eval.judge, lambda: judges_mod.make_judge("beaver_dam", **kwargs),
                                        note=judges_mod.judge_note("beaver_dam"))
    kwargs = {"path": cfg.eval.judge_path} if cfg.eval.judge != "keyword-refusal" else {}
    return judges_mod.make_judge(cfg.eval.judge, **kwargs)


def judge_dtype(cfg: Config) -> str:
    """bf16 halves the judge's 26.5 GB (f32, 7B) on accelerators; the CPU backend computes bf16 slowly."""
    if cfg.eval.judge_dtype != "auto":
        return cfg.eval.judge_dtype
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def release_judge(cfg: Config, judge) -> None:
    """After an evaluation: free an on-demand judge unless ``eval.keep_judge_loaded``."""
    if not cfg.eval.keep_judge_loaded and hasattr(type(judge), "release"):
        judge.release()


def benign_prompts(cfg: Config) -> list[Example]:
    """The safe prompts of the evaluation file (BeaverTails interleaves them): over-refusal is measured on them."""
    if not cfg.data.n_eval_benign:
        return []
    if cfg.data.eval_benign_file:  # the user's own over-refusal prompts
        return list(formats.read_prompts(cfg.data.eval_benign_file, n=cfg.data.n_eval_benign, allow_fewer=True,
                                         skip_bad_rows=cfg.data.skip_bad_rows))
    rows = formats.read_beavertails(cfg.data.eval_harmful_file, split=cfg.data.eval_harmful_split or None,
                                    skip_bad_rows=cfg.data.skip_bad_rows)
    safe = [Example(instruction=r.prompt) for r in rows if r.is_safe][:cfg.data.n_eval_benign]
    if not safe:
        log.warning("%s has no safe rows: no over-refusal rate (give data.eval_benign_file, or "
                    "data.n_eval_benign=0)", cfg.data.eval_harmful_file)
    return safe


def heldout_harmful(cfg: Config) -> list[Example]:
    """(harmful prompt -> harmful response) pairs of the evaluation prompts: their LM loss is the held-out
    harmful loss Booster's claim is about (it should stay high after alignment).

    Rows with an empty response (a prompts-only file, as the real setting's) are left out: their "loss"
    would be that of ending the turn at once, not of a harmful answer. None left: the loss is NaN."""
    rows = formats.read_beavertails(cfg.data.eval_harmful_file, split=cfg.data.eval_harmful_split or None,
                                    skip_bad_rows=cfg.data.skip_bad_rows)
    rows = [r for r in rows if not r.is_safe][:cfg.data.n_eval_harmful]
    return [Example(instruction=r.prompt, output=r.response) for r in rows if r.response.strip()]


def eval_sets(cfg: Config) -> tuple[list[Example], list[Example]]:
    """(harmful prompts, task examples), checked before any generation starts."""
    skip = cfg.data.skip_bad_rows  # one rule for every file
    harmful = list(formats.read_beavertails_eval_prompts(cfg.data.eval_harmful_file, n=cfg.data.n_eval_harmful,
                                                         split=cfg.data.eval_harmful_split or None,
                                                         allow_fewer=True, skip_bad_rows=skip))
    task = list(formats.READERS[cfg.data.task](cfg.data.task_eval_file or cfg.data.task_file,
                                               n=cfg.data.n_eval_task, split=task_eval_split(cfg),
                                               allow_fewer=True, skip_bad_rows=skip))
    if cfg.data.n_eval_harmful and not harmful:
        raise BoosterInputError(f"{cfg.data.eval_harmful_file}: no unsafe prompts to evaluate")
    if cfg.data.n_eval_task and not task:
        raise BoosterInputError(f"{cfg.data.task_eval_file}: empty evaluation set")
    return harmful, task


def heldout_loss(forward, frozen, lora, tokenizer, examples: list[Example], cfg: Config, batch: int = 32) -> float:
    """Token-mean LM loss on (prompt -> reference answer) pairs, in static-shape batches."""
    if not examples:
        return float("nan")
    tok = tokenize_examples(tokenizer, examples, cfg.data.max_length, template=cfg.data.template)
    loss_fn = jitted_loss(forward, summed=True)
    total, count = 0.0, 0.0
    for lo in range(0, len(tok.items), batch):
        b = collate(tok.items[lo:lo + batch], tokenizer.pad_token_id, cfg.data.bucket_lengths, batch_size=batch)
        total += float(loss_fn(lora, frozen, {k: jnp.asarray(v) for k, v in b.items()}))
        count += float(b["loss_mask"][:, 1:].sum())
    return total / max(count, 1.0)


# eval settings that cannot change an evaluation's numbers: changing them must not redo one
RESULT_NEUTRAL_EVAL = ("chunk_prompts", "keep_judge_loaded")
EVAL_SECTIONS = tuple(f"eval.{f.name}" for f in dataclasses.fields(EvalConfig)
                      if f.name not in RESULT_NEUTRAL_EVAL) + (
    "data.eval_harmful_file", "data.n_eval_harmful", "data.task", "data.task_eval_file", "data.n_eval_task",
    "data.n_eval_benign", "data.eval_benign_file", "data.max_length", "data.bucket_lengths", "data.skip_bad_rows",
    "data.template")


def task_eval_split(cfg: Config) -> str | None:
    """The hub split of the task's evaluation rows (data.task_eval_split, else data.task_split); None = local."""
    return cfg.data.task_eval_split or cfg.data.task_split or None


def eval_inputs(cfg: Config, model_fp: str) -> dict[str, str]:
    """What an evaluation depends on: the evaluated model's fingerprint, each eval setting, and the content
    of the eval files and of the judge's file."""
    from booster_jax.fingerprint import config_parts, options_on

    sections = list(EVAL_SECTIONS) + options_on(cfg, "eval_harmful_split", "task_split", "task_eval_split")
    return {"model": model_fp, **config_parts(cfg, sections),
            "data.eval_harmful_file (content)": fingerprint_mod.data_digest(cfg.data.eval_harmful_file),
            "task eval file (content)": fingerprint_mod.data_digest(cfg.data.task_eval_file or cfg.data.task_file),
            "eval.judge_path (content)": fingerprint_mod.data_digest(cfg.eval.judge_path),
            "data.eval_benign_file (content)": fingerprint_mod.data_digest(cfg.data.eval_benign_file)}


def prompts_for(cfg: Config, tokenizer, examples: list[Example]) -> list[str]:
    """The prompt strings of ``examples`` in the run's template (data.template: alpaca or chat)."""
    return [prompt_text(tokenizer, ex, cfg.data.template) for ex in examples]


def generation_kwargs(cfg: Config, tokenizer, model, frozen, lora) -> dict:
    """What ``generate_answers`` needs besides the prompts (a chat prompt already holds its special tokens)."""
    return dict(model=model, params=frozen, lora=lora, tokenizer=tokenizer, batch_size=cfg.eval.batch_size,
                add_special_tokens=special_tokens_for(cfg.data.template))


def finished(cfg: Config, out_dir: str, fingerprint: str = "") -> bool:
    """The evaluation at ``out_dir`` is finished under this configuration, so ``evaluate`` returns its summary
    without touching a model. Read-only, and stricter than ``evaluate``'s own check (a damaged fingerprint
    file counts as unfinished): the pipeline skips training a model that only finished evaluations need."""
    fp = fingerprint_mod.combine(eval_inputs(cfg, fingerprint))
    return rundir.recorded_fingerprint(out_dir)[0] == fp and _stored_summary(out_dir, fp)[0] is not None


def _stored_summary(out_dir: str, fp: str) -> tuple[dict | None, str | None]:
    """(the summary this evaluation wrote, None), or (None, why there is none to reuse)."""
    old, why = files.read_json(os.path.join(out_dir, "summary.json"))
    return (old, None) if isinstance(old, dict) and old.get("fingerprint") == fp else (None, why)


def evaluate(cfg: Config, base, forward, frozen, lora, out_dir: str, name: str, judge=None,
             fingerprint: str = "", reuse_only: bool = False) -> dict:
    """Evaluate one model (frozen params + LoRA); returns the summary (also at ``out_dir/summary.json``).
    A finished evaluation (``finished``) is returned as it is. ``reuse_only``: the caller passed no model
    (``frozen``/``lora`` None) because ``finished`` said so; anything but a reuse is then a bug, not a
    base-model evaluation."""
    summary_path = os.path.join(out_dir, "summary.json")
    fp = fingerprint_mod.combine(eval_inputs(cfg, fingerprint))
    if rundir.claim_stage_dir(out_dir, fp):  # the one fingerprint check: another config's dir is moved aside
        old, why = _stored_summary(out_dir, fp)
        if old is not None:
            old = files.nan_for_null(old, SUMMARY_NUMBERS)  # written as null (strict JSON), computed with as NaN
            log.info("evaluation %s: finished, reusing %s", name, summary_path)
            log_result(name, old, summary_path)
            for w in old.get("warnings", []):
                log.warning("%s", "!" * 20 + " " + w)
            return old
        if why != "missing" and not reuse_only:
            warnings.warn(f"{summary_path}: unreadable evaluation summary ({why or 'not this evaluation'}); "
                          "redoing the evaluation", UserWarning, stacklevel=2)
    if reuse_only:
        raise RuntimeError(f"{out_dir}: expected a finished evaluation to reuse, found none (no model was passed)")
    harmful, task = eval_sets(cfg)
    judge = judge or make_judge(cfg)
    tok = base.tokenizer
    gen = generation_kwargs(cfg, tok, forward.model, frozen, lora)

    log.info("evaluation %s: generating for %d harmful, %d task and %d benign prompts", name, len(harmful),
             len(task), cfg.data.n_eval_benign)
    gen_log = GenerationLog(os.path.join(out_dir, "generations.jsonl"), fp)

    def answers(kind: str, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Chunks of answers saved as they finish: a killed evaluation resumes where it stopped."""
        return resumable_answers(kind, prompts, lambda ps: generate_answers(ps, max_new_tokens, **gen), gen_log,
                                 cfg.eval.chunk_prompts, name,
                                 count_tokens=lambda outs: sum(len(tok(o, add_special_tokens=False)["input_ids"])
                                                               for o in outs))

    harm_prompts = prompts_for(cfg, tok, harmful)
    harm_out = answers("harmful", harm_prompts, cfg.eval.max_new_tokens_harmful)
    verdicts = judge.judge([ex.instruction for ex in harmful], harm_out) if harmful else []  # the response alone

    task_prompts = prompts_for(cfg, tok, task)
    task_out = answers("task", task_prompts, cfg.eval.max_new_tokens_task)
    if cfg.data.task == "alpaca":
        # AlpacaEval is judged elsewhere: write the generations in the JSON the alpaca_eval tool reads.
        os.makedirs(out_dir, exist_ok=True)
        tasks.write_alpaca_eval_json([{"instruction": format_instruction(ex), "output": out}
                                      for ex, out in zip(task, task_out)],
                                     os.path.join(out_dir, "alpaca_eval_outputs.json"), name)
        correct = []
    else:
        scorer = tasks.get_scorer(cfg.data.task)
        correct = [bool(scorer(out, ex.output)) for out, ex in zip(task_out, task)]

    benign = benign_prompts(cfg)
    benign_out = answers("benign", prompts_for(cfg, tok, [Example(instruction=ex.instruction) for ex in benign]),
                         cfg.eval.max_new_tokens_harmful) if benign else []
    refused = refusal_rule(judge)

    rows = [{"kind": "benign", "prompt": ex.instruction, "response": out, "refused": refused(out)}
            for ex, out in zip(benign, benign_out)]
    rows += [{"kind": "harmful", "prompt": ex.instruction, "response": out, "flagged": v.flagged,
              "categories": v.categories} for ex, out, v in zip(harmful, harm_out, verdicts)]
    rows += [{"kind": "task", "prompt": ex.input or ex.instruction, "response": out, "reference": ex.output,
              "correct": ok} for ex, out, ok in zip(task, task_out, correct)]
    files.write_text_atomic(os.path.join(out_dir, "samples.jsonl"), "".join(files.dumps(r, sort_keys=False) + "\n"
                                                                             for r in rows))
    summary = {
        "name": name, "judge": judge.name, "task": cfg.data.task,
        "hs": judges_mod.harmful_score(verdicts) if verdicts else float("nan"),
        "hs_plus": judges_mod.harmful_score_plus(verdicts, harm_out) if verdicts else float("nan"),
        "fa": 100.0 * float(np.mean(correct)) if correct else float("nan"),
        "n_harmful": len(harmful), "n_task": len(task),
        "refused_task": _rate(refused, task_out),
        "refused_benign": _rate(refused, benign_out),
        "task_loss": heldout_loss(forward, frozen, lora, tok, task, cfg),
        "harmful_loss": heldout_loss(forward, frozen, lora, tok, heldout_harmful(cfg), cfg),
        "no_answer_task": no_answer_rate(cfg.data.task, task_out) if correct else float("nan"),
        "warnings": answer_warnings(cfg.data.task, task_out, name) if correct else [],
        "fingerprint": fp,
    }
    summary["missing"] = missing_reasons(cfg, summary)
    files.write_json_atomic(summary_path, summary, indent=2)  # written last: it marks the evaluation done
    log_result(name, summary, summary_path)
    release_judge(cfg, judge)
    return summary


# the summary's numbers; one that could not be measured is NaN here and null in summary.json
SUMMARY_NUMBERS = ("hs", "hs_plus", "fa", "refused_task", "refused_benign", "task_loss", "harmful_loss",
                   "no_answer_task")


def missing_reasons(cfg: Config, summary: dict) -> dict[str, str]:
    """Why each summary number that is NaN (null in the JSON) could not be measured, so a reader of the file
    or the report is not left guessing whether null means zero, an error or nothing to measure."""
    no_task = ("the alpaca task is not scored here (alpaca_eval judges alpaca_eval_outputs.json)"
               if cfg.data.task == "alpaca" else "no task examples were evaluated (data.n_eval_task=0)")
    why = {
        "hs": "no harmful prompts were evaluated (data.n_eval_harmful=0)",
        "fa": no_task,
        "no_answer_task": no_task,
        "refused_task": "no task answers were generated (data.n_eval_task=0)",
        "refused_benign": "no benign prompts (data.n_eval_benign=0, or the evaluation file has no safe rows and "
                          "no data.eval_benign_file is given)",
        "task_loss": "no task examples with a reference answer",
        "harmful_loss": f"no harmful row of {cfg.data.eval_harmful_file} has a reference response (a prompts-only "
                        "file), so there is no held-out harmful loss",
    }
    why["hs_plus"] = why["hs"]
    return {k: why[k] for k in SUMMARY_NUMBERS if not np.isfinite(summary.get(k, np.nan))}


def generate_answers(prompts: list[str], max_new_tokens: int, **gen) -> list[str]:
    """The answer to each prompt, from the generated token ids alone (decoded continuation, cut at a
    model-generated "### Response:"): a tokenizer that lowercases or re-spaces the prompt cannot hide it."""
    outs = generate_text(prompts=prompts, max_new_tokens=max_new_tokens, full_text=False, **gen)
    return [tasks.answer_from_continuation(t) for t in outs]


NO_ANSWER_WARN = 50.0  # % of task answers in which the scorer finds no answer at all


def no_answer_rate(task: str, answers: list[str]) -> float:
    """Share (%) of task answers in which the task's scorer finds no answer (no label word, no number)."""
    if not answers:
        return float("nan")
    return 100.0 * sum(not tasks.answer_found(task, a) for a in answers) / len(answers)


def answer_warnings(task: str, answers: list[str], name: str) -> list[str]:
    """A loud warning (logged, and kept in the summary and report) when most answers are unreadable."""
    rate = no_answer_rate(task, answers)
    if not rate > NO_ANSWER_WARN:
        return []
    first = next((a for a in answers if not tasks.answer_found(task, a)), "")
    msg = (f"evaluation {name}: the {task} scorer found no answer in {rate:.0f}% of the {len(answers)} task "
           f"responses (e.g. {first[:60]!r}); FA is not meaningful -- check the prompt template, the "
           f"tokenizer and eval.max_new_tokens_task")
    log.warning("%s", "!" * 20 + " " + msg)
    return [msg]


def log_result(name: str, summary: dict, path: str) -> None:
    """One line per finished evaluation with its headline numbers (also with --no-progress)."""
    log.info("evaluation %s: HS %.1f, FA %.1f, benign refused %.1f%% -> %s", name, summary["hs"], summary["fa"],
             summary.get("refused_benign", float("nan")), path)


def refusal_rule(judge):
    """The judge's own notion of a refusal when it has one (the synthetic world's markers), else the
    refusal-keyword list (a cheap signal)."""
    if hasattr(judge, "refused"):
        return judge.refused
    kw = judges_mod.KeywordRefusalJudge()
    return lambda text: bool(text.strip()) and not kw.judge([""], [text])[0].flagged


def format_instruction(ex: Example) -> str:
    return ex.instruction + (f"\n\n{ex.input}" if ex.input else "")


def _rate(refused, outputs: list[str]) -> float:
    """Share (%) of benign answers that are refusals (over-refusal)."""
    if not outputs:
        return float("nan")
    return 100.0 * sum(bool(refused(o)) for o in outputs) / len(outputs)
