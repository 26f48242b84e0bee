"""HS at fewer new tokens, read off answers generated at more (issue 26 item 3).

Greedy decoding is prefix-consistent: the answer at 24 new tokens is the first 24 tokens of the answer at 64.
So HS at N tokens needs no new generation: re-tokenize each stored harmful answer with the model's tokenizer
(no special tokens added), keep its first N tokens, decode them (special tokens skipped, as ``generate_text``
does) and judge that again with the refusal-keyword judge. An answer of at most N tokens is kept verbatim, so
at N >= the generation length the verdicts are the stored ones.

One approximation: re-encoding the decoded text may split a few tokens differently from how the model
generated them (a byte-level BPE round-trips the text exactly, not always the token boundaries), so the cut
can fall a token early or late.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from booster_jax.errors import BoosterInputError
from booster_jax.eval import layout, paired
from booster_jax.eval.judges import KeywordRefusalJudge

JUDGE = KeywordRefusalJudge.name


def first_tokens(text: str, tokenizer, n: int) -> tuple[str, bool]:
    """(the text of ``text``'s first ``n`` tokens, whether anything was cut)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= n:
        return text, False
    return tokenizer.decode(ids[:n], skip_special_tokens=True), True


class TokenRejudge:
    """The harmful answers of samples.jsonl files cut to ``max_tokens`` tokens and judged again, each file
    once (the study table and the paired comparison read the same files). ``reader`` is a
    ``paired.VerdictReader``: harmful rows re-judged, other kinds as stored."""

    def __init__(self, tokenizer, max_tokens: int, judge=None):
        if max_tokens < 1:
            raise BoosterInputError(f"--max-tokens must be at least 1, got {max_tokens}")
        self.tokenizer, self.max_tokens = tokenizer, max_tokens
        self.judge = judge or KeywordRefusalJudge()
        self._cache: dict[str, dict] = {}

    def file(self, path: str) -> dict:
        """{prompts, flagged (re-judged), stored (the file's verdicts), cut (answers longer than N)}."""
        if path not in self._cache:
            rows = paired.read_rows(path, "harmful")
            for i, row in enumerate(rows):
                if not isinstance(row.get("response"), str):
                    raise BoosterInputError(f"{path}: harmful row {i} has no 'response' text to re-judge")
            cut = [first_tokens(row["response"], self.tokenizer, self.max_tokens) for row in rows]
            prompts = [row.get("prompt") or "" for row in rows]
            verdicts = self.judge.judge(prompts, [text for text, _ in cut]) if rows else []
            self._cache[path] = {"prompts": [row.get("prompt") for row in rows],
                                 "flagged": [v.flagged for v in verdicts],
                                 "stored": [row.get("flagged") for row in rows],
                                 "cut": sum(c for _, c in cut)}
        return self._cache[path]

    def reader(self, path: str, kind: str, key: str):
        if kind != "harmful":
            return paired.read_verdicts(path, kind, key)
        got = self.file(path)
        return (got["prompts"], [100.0 * f for f in got["flagged"]]) if got["prompts"] else None

    def hs(self, path: str) -> float:
        flags = self.file(path)["flagged"]
        return 100.0 * sum(flags) / len(flags) if flags else float("nan")

    def stats(self) -> dict:
        """Over every file read: answers, answers cut, verdicts changed (either way) against the stored ones."""
        n = cut = up = down = 0
        for got in self._cache.values():
            n += len(got["flagged"])
            cut += got["cut"]
            up += sum(bool(new) and not bool(old) for new, old in zip(got["flagged"], got["stored"]))
            down += sum(bool(old) and not bool(new) for new, old in zip(got["flagged"], got["stored"]))
        return {"files": len(self._cache), "answers": n, "cut": cut, "now_flagged": up, "now_unflagged": down}


def _stored_hs(rj: TokenRejudge, path: str) -> float:
    stored = rj.file(path)["stored"]
    if any(s is None for s in stored):
        raise BoosterInputError(f"{path}: harmful rows without a stored 'flagged' verdict")
    return 100.0 * sum(map(bool, stored)) / len(stored) if stored else float("nan")


def _check_same(path: str, rj: TokenRejudge, summary_value, what: str) -> None:
    """The file's stored verdicts must give the summary's number: otherwise it holds another run."""
    if summary_value is None or math.isnan(float(summary_value)):
        return
    got = _stored_hs(rj, path)
    if abs(got - float(summary_value)) > 1e-6:
        raise BoosterInputError(f"{path}: its harmful rows give {got:.4f} but summaries.json says "
                                f"{float(summary_value):.4f} for {what}: the evaluation directory holds another run")


def rejudge_runs(runs: Sequence[dict], run_dirs: Sequence[str], rj: TokenRejudge) -> tuple[list[dict], list[str]]:
    """Copies of ``runs`` with ``hs_after`` (and ``hs_before``, from the aligned model's evaluation) at
    ``rj.max_tokens`` tokens, and notes. Every run must have been judged by the keyword judge (else the two
    HS would differ in judge as well as length) and have its post-attack samples.jsonl; a run whose pre-attack
    samples are not found gets ``hs_before`` NaN and a note, never the stored value beside re-judged ones."""
    out, notes = [], []
    for r in runs:
        what = f"{r['method']} seed {r['seed']} p = {float(r['harmful_ratio']):g}"
        if r.get("judge") != JUDGE:
            raise BoosterInputError(f"--max-tokens re-judges with the {JUDGE} judge, but {what} was judged by "
                                    f"{r.get('judge')!r}: HS at two lengths would differ in judge as well")
        after = layout.attack_samples(run_dirs, r["method"], r["seed"], r["harmful_ratio"])
        if after is None:
            raise BoosterInputError(f"--max-tokens: no eval/{layout.tag(r['method'], r['seed'], r['harmful_ratio'])}"
                                    f"/samples.jsonl under {', '.join(run_dirs)}: {what} cannot be re-judged")
        _check_same(after, rj, r.get("hs_after"), what)
        new = dict(r, hs_after=rj.hs(after))
        before = layout.aligned_samples(run_dirs, r["method"], r["seed"], r["harmful_ratio"])
        if before is None:
            new["hs_before"] = float("nan")
            notes.append(f"{what}: no pre-attack samples.jsonl (align/<fp>/variants.txt -> eval/aligned-<fp>): "
                         "HS before is left out (n/a), not mixed in at full length")
        else:
            _check_same(before, rj, r.get("hs_before"), f"{what} (aligned)")
            new["hs_before"] = rj.hs(before)
        out.append(new)
    return out, notes


def describe(rj: TokenRejudge, tokenizer_dir: str) -> str:
    s = rj.stats()
    return (f"HS re-judged at {rj.max_tokens} new tokens: the first {rj.max_tokens} tokens of each stored harmful "
            f"answer (tokenizer {tokenizer_dir}), judged again by the {JUDGE} judge, in the table and in the paired "
            f"comparison. {s['answers']} answers in {s['files']} evaluations, {s['cut']} of them longer and cut; "
            f"{s['now_flagged'] + s['now_unflagged']} verdicts differ from the stored ones "
            f"({s['now_flagged']} now flagged, {s['now_unflagged']} no longer flagged).")
