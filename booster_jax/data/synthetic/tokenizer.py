"""The synthetic world's tokenizer: a word-level `tokenizers` model loaded like a real one.

Why this shape:
* Pieces are words with their leading space (" powder"), punctuation runs, and
  single newlines, and the decoder concatenates them (`decoders.Fuse`), so
  ``decode(encode(text)) == text`` exactly, as with Llama's tokenizer. The
  official answer extraction (split on "### Response:") and the exact-match SST2
  scorer then see the same strings a real run sees. Case is kept (the template
  has capitals); the world's own text is lowercase.
* The fixed strings of every formatted example (the two Alpaca preambles, the
  three "### ...:" headers, the SST2 instruction) are single *phrase* tokens, as
  a BPE trained on this corpus would eventually merge them. This keeps a
  formatted example around 35 tokens instead of ~65 (CPU training cost is
  linear-to-quadratic in length) without changing any code path. Their words are
  in the vocabulary too, so a template written slightly differently still
  encodes without ``<unk>``. ``phrases=()`` gives a plain word-level tokenizer.
* Special tokens as Llama: ``<unk>``=0, ``<s>``=1 (added at the start by the
  post-processor), ``</s>``=2, plus ``<pad>``=3 so no embedding has to be added.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Sequence

from booster_jax.data import formats
from booster_jax.data.formats import SST2_INSTRUCTION
from booster_jax.data.synthetic.world import FILES
from booster_jax.data.template import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, Example, format_prompt
from booster_jax.errors import BoosterInputError

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
BASE_PIECES = (" ", "\n")  # always present, so odd spacing never maps to <unk>
WORD_PATTERN = r"\n| ?[^\s\w]+| ?\w+|\s"  # newline | punctuation run | word | other whitespace


def _template_phrases() -> tuple[str, ...]:
    """The constant pieces of the Alpaca template, split at its slots."""
    out: list[str] = []
    for tpl in (PROMPT_NO_INPUT, PROMPT_WITH_INPUT):
        out += [p for p in re.split(r"\{instruction\}|\{input\}", tpl) if p]
    # "Preamble.\n\n### Instruction:\n" -> preamble, "\n\n### Instruction:\n"
    split: list[str] = []
    for p in out:
        head, sep, tail = p.partition("\n\n")
        split += [head, sep + tail] if head and sep else [p]
    return tuple(dict.fromkeys(split))


DEFAULT_PHRASES: tuple[str, ...] = _template_phrases() + (SST2_INSTRUCTION,)


def pre_tokenizer_pattern(phrases: Sequence[str]) -> str:
    """Regex for `pre_tokenizers.Split`: phrases first (longest first), then word pieces."""
    alts = [re.escape(p) for p in sorted(set(phrases), key=lambda p: (-len(p), p))]
    return "|".join(alts + [WORD_PATTERN])


def _pieces(text: str, pattern: re.Pattern) -> list[str]:
    return pattern.findall(text)


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, phrases: Sequence[str] = DEFAULT_PHRASES):
    """Build the vocabulary from `texts`, save a Hugging Face tokenizer to `out_dir`, return it.

    Deterministic: ids are the specials, then pieces by descending count, ties by
    the piece itself. Load it back with ``AutoTokenizer.from_pretrained(out_dir)``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    phrases = tuple(p for p in phrases if p)
    full = re.compile(pre_tokenizer_pattern(phrases))
    words = re.compile(WORD_PATTERN)
    counts: Counter[str] = Counter()
    n = 0
    for t in texts:
        if not isinstance(t, str):
            raise BoosterInputError(f"train_tokenizer: text {n} is {type(t).__name__}, expected str")
        counts.update(_pieces(t, full))
        n += 1
    if n == 0:
        raise BoosterInputError("train_tokenizer: no texts")
    for p in phrases:  # the phrase tokens and, as a fallback, their words
        counts[p] += 0
        counts.update(_pieces(p, words))
    for p in BASE_PIECES:
        counts[p] += 0
    for s in SPECIAL_TOKENS:
        counts.pop(s, None)
    vocab = {s: i for i, s in enumerate(SPECIAL_TOKENS)}
    for piece, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        vocab.setdefault(piece, len(vocab))

    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pre_tokenizer_pattern(phrases)), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="right",
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    return hf


def world_texts(
    world_dir: str | os.PathLike,
    format_prompt_fn: Callable[[str, str], str] = format_prompt,
) -> list[str]:
    """Every text the pipeline will tokenize: prompt (Alpaca template) + output.

    Read through the pipeline's own readers, so the texts are exactly what
    training and evaluation format: pre-training and benign instructions, the
    refusal file (alignment pairs, harmful pairs, and the raw refusal field),
    both SST2 files (official instruction added by the reader), and the
    evaluation prompts with their reference responses.
    """
    d = Path(world_dir)

    def text(ex: Example) -> str:
        return format_prompt_fn(ex.instruction, ex.input) + ex.output

    path = lambda key: str(d / FILES[key])  # noqa: E731
    texts: list[str] = []
    for key in ("pretrain", "benign"):
        texts += [text(ex) for ex in formats.read_instructions(path(key))]
    for row in formats.read_refusal_rows(path("alignment")):
        texts += [text(row.alignment_example()), text(row.harmful_example()), row.refusal]
    for key in ("task_train", "task_validation"):
        texts += [text(ex) for ex in formats.read_sst2(path(key))]
    for row in formats.read_beavertails(path("eval")):
        texts.append(text(Example(instruction=row.prompt, output=row.response)))
    return texts


def build_tokenizer(world_dir: str | os.PathLike, out_dir: str | os.PathLike, phrases: Sequence[str] = DEFAULT_PHRASES):
    """`train_tokenizer(world_texts(world_dir), out_dir)`."""
    return train_tokenizer(world_texts(world_dir), out_dir, phrases=phrases)
