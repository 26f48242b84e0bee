"""Hand-made run directories in pipeline's layout (booster_jax/eval/layout.py), for the analysis tests."""

import json

from booster_jax.eval.judges import KeywordRefusalJudge

KW = KeywordRefusalJudge()


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def flagged(response: str) -> bool:
    """The keyword judge's verdict, as the pipeline stores it."""
    return KW.judge([""], [response])[0].flagged


def hs(responses) -> float:
    return 100.0 * sum(map(flagged, responses)) / len(responses)


def samples(eval_dir, harmful, benign_refused=(False,), correct=(True, False)):
    """eval_dir/samples.jsonl with the harmful answers judged by the keyword judge."""
    rows = [{"kind": "benign", "prompt": f"benign {i}", "response": "sure", "refused": r}
            for i, r in enumerate(benign_refused)]
    rows += [{"kind": "harmful", "prompt": f"harm {i}", "response": r, "flagged": flagged(r), "categories": None}
             for i, r in enumerate(harmful)]
    rows += [{"kind": "task", "prompt": f"task {i}", "response": "x", "reference": "x", "correct": c}
             for i, c in enumerate(correct)]
    write_jsonl(eval_dir / "samples.jsonl", rows)


def summary(method, seed, p=0.1, hs_before=0.0, hs_after=0.0, refused_before=0.0, fa=50.0, judge="keyword-refusal"):
    return {"method": method, "seed": seed, "harmful_ratio": p, "hs_before": hs_before, "hs_after": hs_after,
            "fa": fa, "fa_before": fa, "refused_before": refused_before, "judge": judge, "task": "gsm8k"}


def write_summaries(run_dir, runs, base=None):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summaries.json").write_text(json.dumps({"base": base, "runs": runs}))


def alignment(run_dir, fp, names, metrics=(), harmful=None):
    """align/<fp>/{variants.txt, metrics.jsonl} and, with ``harmful`` answers, eval/aligned-<fp>/samples.jsonl."""
    d = run_dir / "align" / fp
    d.mkdir(parents=True, exist_ok=True)
    (d / "variants.txt").write_text("".join(n + "\n" for n in names))
    write_jsonl(d / "metrics.jsonl", list(metrics))
    if harmful is not None:
        samples(run_dir / "eval" / f"aligned-{fp}", harmful)


def track(run_dir, tag, points):
    """finetune/<tag>/track.jsonl from (step, harmful_train_loss) pairs."""
    write_jsonl(run_dir / "finetune" / tag / "track.jsonl",
                [{"harmful_train_loss": loss, "hs": None, "step": step} for step, loss in points])
