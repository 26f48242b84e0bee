"""The evaluate stage: Harmful Score on unseen harmful prompts, Finetune Accuracy on the user's task,
and held-out losses. Writes one JSON line per sample and a summary JSON; reuses a finished evaluation."""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from booster_jax.config import Config, config_fingerprint
from booster_jax.data import formats
from booster_jax.data.batches import collate
from booster_jax.data.template import Example, prompt_text, special_tokens_for, tokenize_examples
from booster_jax.errors import BoosterInputError
from booster_jax.eval import judges as judges_mod
from booster_jax.eval import tasks
from booster_jax.eval.generate import generate_text
from booster_jax.methods.base import lm_loss

log = logging.getLogger(__name__)

TASK_READERS = {"sst2": formats.read_sst2, "agnews": formats.read_agnews, "gsm8k": formats.read_gsm8k,
                "alpaca": formats.read_instructions}


def make_judge(cfg: Config):
    import booster_jax.data.synthetic.judge  # noqa: F401  (registers "synthetic")

    if cfg.eval.judge == "beaver_dam":
        import booster_jax.eval.beaver_dam  # noqa: F401  (registers "beaver_dam")
    kwargs = {"path": cfg.eval.judge_path} if cfg.eval.judge != "keyword-refusal" else {}
    return judges_mod.make_judge(cfg.eval.judge, **kwargs)


def benign_prompts(cfg: Config) -> list[Example]:
    """The safe prompts of the evaluation file (BeaverTails interleaves them): over-refusal is measured on them."""
    if not cfg.data.n_eval_benign:
        return []
    rows = formats.read_beavertails(cfg.data.eval_harmful_file)
    return [Example(instruction=r.prompt) for r in rows if r.is_safe][:cfg.data.n_eval_benign]


def eval_sets(cfg: Config) -> tuple[list[Example], list[Example]]:
    """(harmful prompts, task examples), checked before any generation starts."""
    harmful = list(formats.read_beavertails_eval_prompts(cfg.data.eval_harmful_file, n=cfg.data.n_eval_harmful,
                                                         split=None, allow_fewer=True))
    task = list(TASK_READERS[cfg.data.task](cfg.data.task_eval_file or cfg.data.task_file, n=cfg.data.n_eval_task,
                                            allow_fewer=True))
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
    # weights as arguments: closed over, XLA would fold the whole model into the program as constants
    loss_fn = jax.jit(lambda lo_ra, params, b: lm_loss(forward(lo_ra, params, b), b) * jnp.sum(b["loss_mask"][:, 1:]))
    total, count = 0.0, 0.0
    for lo in range(0, len(tok.items), batch):
        b = collate(tok.items[lo:lo + batch], tokenizer.pad_token_id, cfg.data.bucket_lengths, batch_size=batch)
        total += float(loss_fn(lora, frozen, {k: jnp.asarray(v) for k, v in b.items()}))
        count += float(b["loss_mask"][:, 1:].sum())
    return total / max(count, 1.0)


def generate_answers(cfg: Config, tokenizer, model, frozen, lora, examples: list[Example],
                     max_new_tokens: int) -> list[str]:
    """Greedy answers to ``examples`` in the run's prompt template.

    Alpaca: as the official pred.py, prompt + continuation are decoded together and the text after
    "### Response:" is the answer. Chat: the continuation alone (the decoded template has no marker).
    """
    template = cfg.data.template
    full = template == "alpaca"
    outs = generate_text(tokenizer, model, frozen, lora, [prompt_text(tokenizer, ex, template) for ex in examples],
                         max_new_tokens=max_new_tokens, batch_size=cfg.eval.batch_size, full_text=full,
                         add_special_tokens=special_tokens_for(template))
    return [tasks.extract_answer(t) for t in outs]


def evaluate(cfg: Config, base, forward, frozen, lora, out_dir: str, name: str, judge=None,
             fingerprint: str = "") -> dict:
    """Evaluate one model (frozen params + LoRA); returns the summary (also at ``out_dir/summary.json``)."""
    summary_path = os.path.join(out_dir, "summary.json")
    fp = fingerprint + config_fingerprint(cfg, ["eval", "data.eval_harmful_file", "data.n_eval_harmful",
                                                "data.task", "data.task_eval_file", "data.n_eval_task",
                                                "data.n_eval_benign", "data.template"])
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            old = json.load(f)
        if old.get("fingerprint") == fp:
            log.info("evaluation %s: finished, reusing %s", name, summary_path)
            return old
    harmful, task = eval_sets(cfg)
    judge = judge or make_judge(cfg)
    tok = base.tokenizer

    def answers(examples, max_new_tokens):
        return generate_answers(cfg, tok, forward.model, frozen, lora, examples, max_new_tokens) if examples else []

    harm_out = answers(harmful, cfg.eval.max_new_tokens_harmful)
    verdicts = judge.judge([ex.instruction for ex in harmful], harm_out) if harmful else []

    task_out = answers(task, cfg.eval.max_new_tokens_task)
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
    benign_out = answers(benign, cfg.eval.max_new_tokens_harmful)
    refused = refusal_rule(judge)

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "samples.jsonl"), "w") as f:
        for ex, out in zip(benign, benign_out):
            f.write(json.dumps({"kind": "benign", "prompt": ex.instruction, "response": out,
                                "refused": refused(out)}) + "\n")
        for ex, out, v in zip(harmful, harm_out, verdicts):
            f.write(json.dumps({"kind": "harmful", "prompt": ex.instruction, "response": out,
                                "flagged": v.flagged, "categories": v.categories}) + "\n")
        for ex, out, ok in zip(task, task_out, correct):
            f.write(json.dumps({"kind": "task", "prompt": ex.input or ex.instruction, "response": out,
                                "reference": ex.output, "correct": ok}) + "\n")
    summary = {
        "name": name, "judge": judge.name, "task": cfg.data.task,
        "hs": judges_mod.harmful_score(verdicts) if verdicts else float("nan"),
        "hs_plus": judges_mod.harmful_score_plus(verdicts, harm_out) if verdicts else float("nan"),
        "fa": 100.0 * float(np.mean(correct)) if correct else float("nan"),
        "n_harmful": len(harmful), "n_task": len(task),
        "refused_task": _rate(refused, task_out),
        "refused_benign": _rate(refused, benign_out),
        "task_loss": heldout_loss(forward, frozen, lora, tok, task, cfg),
        "fingerprint": fp,
    }
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=2)
    return summary


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
