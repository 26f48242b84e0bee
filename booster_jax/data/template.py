"""Alpaca prompt template and supervised tokenization (prompt masked, response + EOS trained).

Follows the stanford-alpaca recipe used by the official Booster code (utils.py,
``preprocess``/``_tokenize_fn``): the full text ``prompt + output + eos_token`` is
tokenized with the tokenizer's own special tokens (e.g. BOS for Llama) and
truncated to ``max_length`` (tail cut); the prompt length is the length of the
prompt tokenized alone (also truncated), and only positions from there on are
targets. When the prompt alone fills ``max_length`` an example has no target
tokens; :func:`tokenize_examples` counts those (and truncations) so callers can
report them.

``template="chat"`` uses the tokenizer's own chat template instead (``apply_chat_template``
with one user turn and the generation prompt); the target is the assistant turn's content and
the EOS that closes it, so the loss covers the assistant turn only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Tuple

import numpy as np

from booster_jax.errors import BoosterInputError

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
# Generated answers are read as the text after this marker (official pred_eval scripts).
RESPONSE_MARKER = "### Response:"
TEMPLATES = ("alpaca", "chat")


@dataclass(frozen=True)
class Example:
    """One instruction-tuning example; ``input`` empty selects the no-input template."""

    instruction: str
    input: str = ""
    output: str = ""


def format_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt; like the official code, an empty ``input`` selects the no-input variant.

    Values are inserted verbatim (braces in user text are kept), exactly like the
    official ``format_map`` on the template.
    """
    if input != "":
        head, rest = PROMPT_WITH_INPUT.split("{instruction}", 1)
        mid, tail = rest.split("{input}", 1)
        return head + instruction + mid + input + tail
    head, tail = PROMPT_NO_INPUT.split("{instruction}", 1)
    return head + instruction + tail


def user_text(ex: Example) -> str:
    """The user turn of a chat prompt: the instruction, then the input (if any) after a blank line."""
    return ex.instruction + (f"\n\n{ex.input}" if ex.input else "")


def prompt_text(tokenizer, ex: Example, template: str = "alpaca") -> str:
    """The prompt string of ``ex`` in ``template`` (alpaca: the official text; chat: the tokenizer's)."""
    if template == "alpaca":
        return format_prompt(ex.instruction, ex.input)
    if template != "chat":
        raise BoosterInputError(f"data.template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    if not getattr(tokenizer, "chat_template", None):
        raise BoosterInputError("data.template is 'chat' but the tokenizer has no chat_template; use 'alpaca'")
    return tokenizer.apply_chat_template([{"role": "user", "content": user_text(ex)}], tokenize=False,
                                         add_generation_prompt=True)


def special_tokens_for(template: str) -> bool:
    """Whether the tokenizer adds its special tokens: a chat template already writes its own."""
    return template == "alpaca"


def _encode(tokenizer, text: str, max_length: int | None, add_special_tokens: bool = True) -> List[int]:
    if max_length is None:
        enc = tokenizer(text, add_special_tokens=add_special_tokens)
    else:
        enc = tokenizer(text, truncation=True, max_length=max_length, add_special_tokens=add_special_tokens)
    return list(enc["input_ids"])


def tokenize_example(tokenizer, ex: Example, max_length: int, template: str = "alpaca") -> Tuple[np.ndarray, np.ndarray]:
    """Token ids (int32[L]) and loss mask (float32[L]: 0 prompt, 1 response + EOS).

    L <= max_length. If truncation cuts into the response only its head is trained;
    if the prompt alone reaches max_length the mask is all zeros.
    """
    if max_length < 1:
        raise BoosterInputError(f"max_length must be >= 1, got {max_length}")
    eos = tokenizer.eos_token
    if eos is None:
        raise BoosterInputError("tokenizer has no eos_token; the targets end with EOS")
    prompt = prompt_text(tokenizer, ex, template)
    special = special_tokens_for(template)
    ids = _encode(tokenizer, prompt + ex.output + eos, max_length, special)
    prompt_len = min(len(_encode(tokenizer, prompt, max_length, special)), len(ids))
    mask = np.zeros(len(ids), dtype=np.float32)
    mask[prompt_len:] = 1.0
    return np.asarray(ids, dtype=np.int32), mask


def tokenize_prompt(tokenizer, instruction: str, input: str = "", template: str = "alpaca") -> np.ndarray:
    """Prompt ids for generation (alpaca: with the tokenizer's BOS; no truncation)."""
    text = prompt_text(tokenizer, Example(instruction, input), template)
    return np.asarray(_encode(tokenizer, text, None, special_tokens_for(template)), dtype=np.int32)


@dataclass(frozen=True)
class TokenizedSet:
    """Tokenized examples plus what truncation did to them (report these counts)."""

    items: List[Tuple[np.ndarray, np.ndarray]]
    n_truncated: int  # full text longer than max_length (tail cut)
    n_no_target: int  # prompt alone fills max_length: no target token left

    def __len__(self) -> int:
        return len(self.items)

    def summary(self) -> str:
        return (
            f"{len(self.items)} examples tokenized, {self.n_truncated} truncated, "
            f"{self.n_no_target} without any target token"
        )


def tokenize_examples(
    tokenizer, examples: Iterable[Example], max_length: int, chunk: int = 1024, template: str = "alpaca"
) -> TokenizedSet:
    """Tokenize many examples (batched calls, same result as :func:`tokenize_example`).

    Counts truncations and target-less examples; the latter are kept, as in the
    official code (they add nothing to the loss).
    """
    if max_length < 1:
        raise BoosterInputError(f"max_length must be >= 1, got {max_length}")
    eos = tokenizer.eos_token
    if eos is None:
        raise BoosterInputError("tokenizer has no eos_token; the targets end with EOS")
    examples = list(examples)
    special = special_tokens_for(template)
    items = []
    n_trunc = n_empty = 0
    for lo in range(0, len(examples), chunk):
        part = examples[lo : lo + chunk]
        prompts = [prompt_text(tokenizer, ex, template) for ex in part]
        fulls = [pr + ex.output + eos for pr, ex in zip(prompts, part)]
        full_ids = tokenizer(fulls, truncation=True, max_length=max_length, add_special_tokens=special)["input_ids"]
        prompt_ids = tokenizer(prompts, truncation=True, max_length=max_length,
                               add_special_tokens=special)["input_ids"]
        long = [i for i, ids in enumerate(full_ids) if len(ids) >= max_length]
        if long:
            untrunc = tokenizer([fulls[i] for i in long], add_special_tokens=special)["input_ids"]
            n_trunc += sum(len(ids) > max_length for ids in untrunc)
        for ids, pids in zip(full_ids, prompt_ids):
            mask = np.zeros(len(ids), dtype=np.float32)
            mask[min(len(pids), len(ids)) :] = 1.0
            n_empty += int(mask.sum() == 0)
            items.append((np.asarray(ids, dtype=np.int32), mask))
    return TokenizedSet(items=items, n_truncated=n_trunc, n_no_target=n_empty)
