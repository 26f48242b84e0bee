"""Finetune Accuracy (FA) scorers that reproduce the official Booster evaluation.

The rules follow git-disl/Booster `sst2/pred_eval.py`, `agnews/pred_eval.py`,
`gsm8k/pred_eval.py` and `alpaca/pred_eval.py` exactly, including their quirks,
so that FA numbers are comparable with the paper:

* The answer is the text the model generated after the prompt's ``"### Response:"``,
  cut at a second, model-generated marker, then ``strip()``-ed. The official
  ``pred.py`` gets it by splitting the decoded prompt + continuation on the marker;
  here it is the decode of the generated token ids alone
  (:func:`answer_from_continuation`), which is the same text for a tokenizer that
  round-trips the prompt and stays right for one that lowercases or re-spaces it
  (there the decoded prompt no longer holds the marker and the split would return
  the whole prompt).
* SST2 and AGNews are **exact matches** of the whole stripped answer, not
  "the label word appears somewhere": SST2 accepts only ``"positive"`` /
  ``"Positive"`` (resp. ``"negative"`` / ``"Negative"``); AGNews only
  ``"World"/"world"``, ``"Sports"/"sports"``, ``"Business"/"business"``,
  ``"Sci/Tech"/"sci"``. No further lowercasing: ``"POSITIVE"``,
  ``"positive."`` and ``"Positive sentiment"`` are wrong, and an answer that
  contains both label words can never be right. (`PAPER.md` paraphrases this as
  "the label word appears"; the code is stricter.) A lenient, *non-official*
  variant is offered as ``"sst2_contains"`` for small models that add words.
* GSM8K: commas removed; numbers match ``-?\\d+\\.?\\d*``; if the text contains
  ``"The final answer is: "``, the first number after its first occurrence
  (up to any second occurrence) is the answer, else the last number of the
  text; no number at all gives ``inf``. Correct iff the floats are equal
  (the reference target is scored by the same function).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from booster_jax import files
from booster_jax.errors import BoosterInputError

RESPONSE_MARKER = "### Response:"
GSM8K_ANSWER_PROMPT = "The final answer is: "
SST2_INSTRUCTION = "Analyze the sentiment of the input, and respond only positive or negative"
AGNEWS_INSTRUCTION = (
    "Categorize the news article given in the input into one of the 4 categories:"
    "\n\nWorld\nSports\nBusiness\nSci/Tech\n"
)
# Label id -> the two spellings the official script accepts.
SST2_LABEL_WORDS = {0: ("negative", "Negative"), 1: ("positive", "Positive")}
AGNEWS_LABEL_WORDS = {
    0: ("World", "world"),
    1: ("Sports", "sports"),
    2: ("Business", "business"),
    3: ("Sci/Tech", "sci"),
}
_NUMBER = re.compile(r"-?\d+\.?\d*")


def extract_answer(generated_text: str, marker: str = RESPONSE_MARKER) -> str:
    """Answer part of a generation, as the official `query()` computes it.

    With the marker present: the text between its first and second occurrence
    (official ``split(marker)[1]``), stripped. Without it (e.g. a
    continuation-only decode): the whole text, stripped.
    """
    if not isinstance(generated_text, str):
        raise BoosterInputError(
            f"extract_answer: expected generated text as str, got {type(generated_text).__name__}"
        )
    parts = generated_text.split(marker)
    return (parts[1] if len(parts) > 1 else parts[0]).strip()


def answer_from_continuation(continuation: str, marker: str = RESPONSE_MARKER) -> str:
    """Answer from the decoded continuation only (the generated token ids): the text before
    any model-generated marker, stripped -- what the official ``split(marker)[1]`` yields on
    prompt + continuation when the tokenizer round-trips the prompt."""
    if not isinstance(continuation, str):
        raise BoosterInputError(
            f"answer_from_continuation: expected text as str, got {type(continuation).__name__}"
        )
    return continuation.split(marker)[0].strip()


def _label_id(label, words: Mapping[int, tuple[str, str]], task: str) -> int:
    """Accept an int/bool label id or one of the label words (any case)."""
    if isinstance(label, bool):
        label = int(label)
    if isinstance(label, int) and label in words:
        return label
    if isinstance(label, str):
        wanted = label.strip().lower()
        for idx, spellings in words.items():
            if wanted in (s.lower() for s in spellings):
                return idx
    allowed = ", ".join(f"{k} ({v[0]})" for k, v in words.items())
    raise BoosterInputError(f"{task} scorer: unknown label {label!r}; expected one of {allowed}")


def score_sst2(answer: str, label) -> bool:
    """Official SST2 rule: stripped answer == 'positive'/'Positive' (or negative)."""
    spellings = SST2_LABEL_WORDS[_label_id(label, SST2_LABEL_WORDS, "sst2")]
    return answer.strip() in spellings


def score_sst2_contains(answer: str, label) -> bool:
    """NON-official lenient SST2 rule: the lowercased answer contains the label
    word and not the other one (both words -> wrong). For small/synthetic models."""
    idx = _label_id(label, SST2_LABEL_WORDS, "sst2_contains")
    text = answer.lower()
    return SST2_LABEL_WORDS[idx][0] in text and SST2_LABEL_WORDS[1 - idx][0] not in text


def score_agnews(answer: str, label) -> bool:
    """Official AGNews rule: stripped answer equals one of the two accepted spellings."""
    spellings = AGNEWS_LABEL_WORDS[_label_id(label, AGNEWS_LABEL_WORDS, "agnews")]
    return answer.strip() in spellings


def extract_number(text: str) -> float:
    """GSM8K answer number, as official `extract_answer_number` (``inf`` if none)."""
    text = text.replace(",", "")
    numbers = _NUMBER.findall(text)
    if not numbers:
        return math.inf
    segments = text.split(GSM8K_ANSWER_PROMPT)
    if len(segments) > 1:
        after = _NUMBER.findall(segments[1])
        if after:
            try:
                return float(after[0])
            except ValueError:  # kept for parity; the regex always yields a float literal
                return math.inf
    return float(numbers[-1])


def gsm8k_target(answer: str) -> str:
    """Official GSM8K target rewrite: '#### N' -> 'The final answer is:  N'."""
    return answer.replace("####", GSM8K_ANSWER_PROMPT)


def score_gsm8k(answer: str, reference) -> bool:
    """Correct iff the extracted numbers are equal as floats.

    ``reference`` is the (rewritten or raw '#### N') GSM8K target text, or a number.
    """
    if isinstance(reference, bool):
        raise BoosterInputError(f"gsm8k scorer: reference must be text or a number, got {reference!r}")
    if isinstance(reference, (int, float)):
        truth = float(reference)
    elif isinstance(reference, str):
        truth = extract_number(gsm8k_target(reference))
    else:
        raise BoosterInputError(
            f"gsm8k scorer: reference must be text or a number, got {type(reference).__name__}"
        )
    return extract_number(answer) == truth


Scorer = Callable[[str, object], bool]
SCORERS: dict[str, Scorer] = {
    "sst2": score_sst2,
    "agnews": score_agnews,
    "gsm8k": score_gsm8k,
    "sst2_contains": score_sst2_contains,  # not official; see module docstring
}


def answer_found(task: str, answer: str) -> bool:
    """Whether a task's scorer can find an answer at all in ``answer`` (right or wrong).

    SST2 / AGNews: the stripped answer is one of the accepted label spellings; GSM8K:
    it holds a number. Used to warn when most answers are unreadable (a template or
    tokenizer mismatch), which would otherwise show only as a low FA.
    """
    key = str(task).lower()
    text = answer.strip()
    if key in ("sst2", "agnews"):
        words = SST2_LABEL_WORDS if key == "sst2" else AGNEWS_LABEL_WORDS
        return any(text in spellings for spellings in words.values())
    if key == "sst2_contains":
        return any(w[0] in text.lower() for w in SST2_LABEL_WORDS.values())
    if key == "gsm8k":
        return extract_number(text) != math.inf
    return True


def get_scorer(task: str) -> Scorer:
    """Scorer for a task name (case-insensitive)."""
    key = str(task).lower()
    if key not in SCORERS:
        raise BoosterInputError(
            f"unknown finetune task {task!r}; expected one of {', '.join(sorted(SCORERS))}"
        )
    return SCORERS[key]


def finetune_accuracy(
    task: str, generations: Sequence[str], references: Sequence, extract: bool = True
) -> float:
    """FA in percent (correct / total * 100) over paired generations and references.

    With ``extract`` the official answer extraction is applied to each generation.
    """
    scorer = get_scorer(task)
    if len(generations) != len(references):
        raise BoosterInputError(
            f"finetune_accuracy({task}): {len(generations)} generations but {len(references)} references"
        )
    if not generations:
        raise BoosterInputError(f"finetune_accuracy({task}): no generations to score")
    correct = sum(
        bool(scorer(extract_answer(g) if extract else g, r)) for g, r in zip(generations, references)
    )
    return correct / len(generations) * 100.0


def write_alpaca_eval_json(
    records: Iterable[Mapping], path: str | os.PathLike, generator_name: str
) -> Path:
    """Write model outputs as the JSON list `alpaca_eval` reads.

    Each record needs ``instruction`` and ``output``; ``dataset`` is kept when
    given. ``generator`` is set to ``generator_name`` (the official script used
    the LoRA folder name). The official run scores items 701..804 of the
    alpaca_eval set (104 items).
    """
    if not isinstance(generator_name, str) or not generator_name.strip():
        raise BoosterInputError("write_alpaca_eval_json: generator_name must be a non-empty string")
    rows = []
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise BoosterInputError(f"write_alpaca_eval_json: record {i} is not a mapping")
        for key in ("instruction", "output"):
            if not isinstance(rec.get(key), str):
                raise BoosterInputError(
                    f"write_alpaca_eval_json: record {i} needs a string field {key!r}"
                )
        row = {"instruction": rec["instruction"], "output": rec["output"], "generator": generator_name}
        if rec.get("dataset") is not None:
            row["dataset"] = rec["dataset"]
        rows.append(row)
    if not rows:
        raise BoosterInputError("write_alpaca_eval_json: no records to write")
    out = Path(path)
    files.write_text_atomic(str(out), files.dumps(rows, indent=4, sort_keys=False, ensure_ascii=False))
    return out
