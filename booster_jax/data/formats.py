"""Readers for the datasets Booster uses, with errors that name the file, row and field.

Sources: a local ``.json`` (a JSON list of objects, or JSON lines) or ``.jsonl``
file is parsed with the standard library; ``.parquet``/``.csv``/``.arrow`` go
through ``datasets.load_dataset(<format>, data_files=...)``; anything that is not
a local path and does not look like a file name is treated as a Hugging Face hub
id (``load_dataset(id, config, split=...)``; needs network or a cache).

Every reader validates each row. By default the first bad row raises
``BoosterInputError``; with ``skip_bad_rows=True`` bad rows are skipped and the
result's ``n_skipped`` / ``skipped`` say how many and why (callers must report it,
see :meth:`Loaded.report`). ``n`` asks for the first ``n`` usable rows and fails
when there are fewer (unless ``allow_fewer=True``).

Field handling follows the official code (git-disl/Booster utils.py, the
``*/build_dataset.py`` and ``*/pred_eval.py`` scripts of Booster/Lisa):
refusal texts are split on ``"\\nAnswer: "``, the question is the first part with
``"Question: "`` removed, the answer the second part, nothing stripped; SST2 and
AGNews labels map to label words; GSM8K answers have ``"####"`` replaced by
``"The final answer is: "``.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, List, Optional, Sequence, TypeVar

from booster_jax.data.template import Example
from booster_jax.errors import BoosterInputError

log = logging.getLogger(__name__)

T = TypeVar("T")

SST2_INSTRUCTION = "Analyze the sentiment of the input, and respond only positive or negative"
SST2_LABELS = ("negative", "positive")
AGNEWS_INSTRUCTION = (
    "Categorize the news article given in the input into one of the 4 categories:"
    "\n\nWorld\nSports\nBusiness\nSci/Tech\n"
)
AGNEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")
GSM8K_ANSWER_PROMPT = "The final answer is: "
REFUSAL_SPLIT = "\nAnswer: "
REFUSAL_QUESTION_PREFIX = "Question: "

_LOCAL_EXTS = (".json", ".jsonl", ".parquet", ".csv", ".arrow", ".json.gz", ".jsonl.gz")
_DATASETS_FORMAT = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Loaded(Generic[T]):
    """Rows read from ``source``; behaves like a read-only list of ``items``."""

    items: List[T]
    source: str
    n_skipped: int = 0
    skipped: List[str] = field(default_factory=list)  # one message per skipped row
    skipped_rows: List[int] = field(default_factory=list)  # their positions in the file
    notes: List[str] = field(default_factory=list)  # faithful-but-surprising things seen

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[T]:
        return iter(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def report(self) -> str:
        lines = [f"{self.source}: {len(self.items)} rows read, {self.n_skipped} bad rows skipped"]
        lines += [f"  skipped: {m}" for m in self.skipped[:5]]
        if len(self.skipped) > 5:
            lines.append(f"  ... and {len(self.skipped) - 5} more")
        lines += [f"  note: {m}" for m in self.notes]
        return "\n".join(lines)


@dataclass(frozen=True)
class RefusalRow:
    """A row of beavertails_with_refusals_train.json, with its refusal already split."""

    prompt: str
    response: str
    refusal: str
    question: str
    answer: str

    def alignment_example(self) -> Example:
        """Harmful question -> refusal (the alignment data f)."""
        return Example(instruction=self.question, input="", output=self.answer)

    def harmful_example(self) -> Example:
        """Harmful prompt -> harmful response (the harmful data h / the attack)."""
        return Example(instruction=self.prompt, input="", output=self.response)


@dataclass(frozen=True)
class BeaverTailsRow:
    prompt: str
    response: str
    is_safe: bool


class _RowError(Exception):
    """A bad row; the message already names file, row and field."""


# ----------------------------------------------------------------------------- raw records


def _looks_local(path: str) -> bool:
    return (
        os.path.exists(path)
        or path.lower().endswith(_LOCAL_EXTS)
        or path.startswith((".", "/", "~"))
        or os.path.isabs(path)
    )


def read_records(path: str, *, split: Optional[str] = None, config: Optional[str] = None) -> List[Any]:
    """Raw rows (normally dicts) of a local file or hub dataset; errors name the source."""
    path = os.fspath(path)
    if not _looks_local(path):
        return _read_hub(path, split=split, config=config)
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise BoosterInputError(f"{path}: data file not found")
    if os.path.isdir(path):
        return _read_saved_dataset(path, split)
    if os.path.getsize(path) == 0:
        raise BoosterInputError(f"{path}: data file is empty")
    if not os.access(path, os.R_OK):
        raise BoosterInputError(f"{path}: cannot read data file (permission denied)")
    ext = os.path.splitext(path)[1].lower()
    if ext in _DATASETS_FORMAT:
        rows = _read_with_datasets(path, _DATASETS_FORMAT[ext])
    else:
        rows = _read_json(path, split)
    if not rows:
        raise BoosterInputError(f"{path}: data file is empty (no rows)")
    return rows


def _read_json(path: str, split: Optional[str]) -> List[Any]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise BoosterInputError(f"{path}: cannot read data file ({e.strerror or e})") from None
    if path.lower().endswith(".gz"):  # BeaverTails' hub files are gzipped JSON lines (30k_test.jsonl.gz)
        import gzip
        import zlib

        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise BoosterInputError(f"{path}: not a readable gzip file ({e})") from None
        path = path[:-3]  # the inner name decides JSON vs JSON lines
    if raw.startswith(b"PAR1"):
        raise BoosterInputError(f"{path}: this is a Parquet file, not JSON; name it with a .parquet extension")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BoosterInputError(
            f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); a .json/.jsonl data file "
            "must be UTF-8 JSON (Parquet, CSV and Arrow files need their own extension)"
        ) from None
    if not text.strip():
        raise BoosterInputError(f"{path}: data file is empty")
    if not path.lower().endswith(".jsonl"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # maybe JSON lines with a .json name
        else:
            if isinstance(data, list):
                return data
            if isinstance(data, dict):
                if split is not None and isinstance(data.get(split), list):
                    return data[split]
                raise BoosterInputError(
                    f"{path}: expected a JSON list of rows, got an object with keys "
                    f"{sorted(data)[:8]}" + (f" (no list under split '{split}')" if split else "")
                )
            raise BoosterInputError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise BoosterInputError(
                f"{path}: not valid JSON (neither a JSON list nor JSON lines): line {lineno}: {e.msg}"
            ) from None
    return rows


def _read_saved_dataset(path: str, split: Optional[str]) -> List[Any]:
    """A ``datasets`` ``save_to_disk`` folder: a Dataset, or a DatasetDict whose ``split`` is taken."""
    if not any(os.path.exists(os.path.join(path, f)) for f in ("dataset_info.json", "dataset_dict.json")):
        raise BoosterInputError(f"{path}: is a directory but not a datasets save_to_disk folder (no "
                                f"dataset_info.json or dataset_dict.json); expected a data file "
                                f"({', '.join(_LOCAL_EXTS)}) or such a folder")
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # noqa: BLE001 - keep the cause in the message
        raise BoosterInputError(f"{path}: cannot load the saved dataset: {type(e).__name__}: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if split is None or split not in ds:
            raise BoosterInputError(f"{path}: a saved DatasetDict with splits {sorted(ds)}; set the file's "
                                    f"split option (got {split!r})")
        ds = ds[split]
    rows = ds.to_list()
    if not rows:
        raise BoosterInputError(f"{path}: the saved dataset is empty")
    return rows


def _read_with_datasets(path: str, fmt: str) -> List[Any]:
    import datasets  # slow import; only when needed

    try:
        ds = datasets.load_dataset(fmt, data_files=path, split="train")
    except Exception as e:  # datasets raises many types; keep the cause in the message
        raise BoosterInputError(f"{path}: cannot read as {fmt}: {type(e).__name__}: {e}") from e
    return ds.to_list()


def _read_hub(name: str, *, split: Optional[str], config: Optional[str]) -> List[Any]:
    if split is None:
        raise BoosterInputError(
            f"{name}: not a local file, so read as a hub dataset; give split= (e.g. 'train', '30k_test')"
        )
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        raise BoosterInputError(
            f"{name}: not a local file and cannot be loaded from the hub "
            f"(config={config!r}, split={split!r}): {type(e).__name__}: {e}"
        ) from e
    rows = ds.to_list()
    if not rows:
        raise BoosterInputError(f"{name} [{split}]: dataset is empty")
    return rows


# ----------------------------------------------------------------------------- row checks


def _src(path: str, split: Optional[str]) -> str:
    return f"{path} [{split}]" if split and not _looks_local(os.fspath(path)) else os.fspath(path)


def _get(row: Any, idx: int, name: str, kind: str, ok: Callable[[Any], bool], src: str, default=...):
    if not isinstance(row, dict):
        raise _RowError(f"{src}: row {idx}: expected an object with field '{name}', got {type(row).__name__}")
    if name not in row:
        if default is not ...:
            return default
        raise _RowError(f"{src}: row {idx}: field '{name}' is missing (expected {kind})")
    v = row[name]
    if not ok(v):
        raise _RowError(
            f"{src}: row {idx}: field '{name}' must be {kind}, got {type(v).__name__} {_short(v)}"
        )
    return v


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _is_str(v) -> bool:
    return isinstance(v, str)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_bool(v) -> bool:
    return isinstance(v, bool) or type(v).__name__ == "bool_"


def _collect(
    records: Sequence[Any],
    convert: Callable[[Any, int], Optional[T]],
    src: str,
    n: Optional[int],
    skip_bad_rows: bool,
    allow_fewer: bool,
    what: str = "usable rows",
) -> Loaded[T]:
    """Convert rows in order (None = filtered out, not bad) until ``n`` items are found."""
    if n is not None and n < 0:
        raise BoosterInputError(f"{src}: n must be >= 0, got {n}")
    items: List[T] = []
    skipped: List[str] = []
    skipped_rows: List[int] = []
    for idx, row in enumerate(records):
        if n is not None and len(items) >= n:
            break
        try:
            item = convert(row, idx)
        except _RowError as e:
            if not skip_bad_rows:
                raise BoosterInputError(str(e)) from None
            skipped.append(str(e))
            skipped_rows.append(idx)
            continue
        if item is not None:
            items.append(item)
    if n is not None and len(items) < n and not allow_fewer:
        extra = f" ({len(skipped)} bad rows skipped)" if skipped else ""
        raise BoosterInputError(
            f"{src}: only {len(items)} {what} out of {len(records)} rows, fewer than the {n} asked{extra}"
        )
    out = Loaded(items=items, source=src, n_skipped=len(skipped), skipped=skipped, skipped_rows=skipped_rows)
    if skipped:
        log.warning("%s", out.report())
    return out


# ----------------------------------------------------------------------------- formats


def split_refusal(text: str) -> tuple[str, str]:
    """'Question: q\\nAnswer: a' -> (q, a), exactly as the official code splits it.

    Official semantics kept: every 'Question: ' in the first part is removed (not just
    a prefix), the answer is the second piece only (text after a second
    '\\nAnswer: ' is dropped), and nothing is stripped.
    """
    parts = text.split(REFUSAL_SPLIT)
    if len(parts) < 2:
        raise ValueError(f"no {REFUSAL_SPLIT!r} separator")
    return parts[0].replace(REFUSAL_QUESTION_PREFIX, ""), parts[1]


def read_refusal_rows(
    path: str,
    n: Optional[int] = None,
    *,
    split: Optional[str] = None,
    skip_bad_rows: bool = False,
    allow_fewer: bool = False,
) -> Loaded[RefusalRow]:
    """beavertails_with_refusals_train.json rows {prompt, response, refusal, ...} in file order."""
    src = _src(path, split)
    records = read_records(path, split=split)
    n_multi = 0

    def convert(row, idx):
        nonlocal n_multi
        prompt = _get(row, idx, "prompt", "a string", _is_str, src)
        response = _get(row, idx, "response", "a string", _is_str, src)
        refusal = _get(row, idx, "refusal", "a string 'Question: ...\\nAnswer: ...'", _is_str, src)
        try:
            q, a = split_refusal(refusal)
        except ValueError:
            raise _RowError(
                f"{src}: row {idx}: field 'refusal' must look like 'Question: ...\\nAnswer: ...', "
                f"no {REFUSAL_SPLIT!r} in {_short(refusal)}"
            ) from None
        n_multi += refusal.count(REFUSAL_SPLIT) > 1
        return RefusalRow(prompt=prompt, response=response, refusal=refusal, question=q, answer=a)

    out = _collect(records, convert, src, n, skip_bad_rows, allow_fewer)
    if n_multi:
        out.notes.append(
            f"{n_multi} refusals contain {REFUSAL_SPLIT!r} more than once; as in the official "
            "code only the text up to the second separator is used as the answer"
        )
    return out


def read_beavertails(
    path: str,
    n: Optional[int] = None,
    *,
    split: Optional[str] = None,
    skip_bad_rows: bool = False,
    allow_fewer: bool = False,
) -> Loaded[BeaverTailsRow]:
    """BeaverTails rows {prompt, response, is_safe} in file order (local file or hub split)."""
    src = _src(path, split)
    records = read_records(path, split=split)

    def convert(row, idx):
        return BeaverTailsRow(
            prompt=_get(row, idx, "prompt", "a string", _is_str, src),
            response=_get(row, idx, "response", "a string", _is_str, src),
            is_safe=bool(_get(row, idx, "is_safe", "a boolean", _is_bool, src)),
        )

    return _collect(records, convert, src, n, skip_bad_rows, allow_fewer)


def read_beavertails_eval_prompts(
    path: str,
    n: Optional[int] = 1000,
    *,
    split: Optional[str] = "30k_test",
    skip_bad_rows: bool = False,
    allow_fewer: bool = False,
) -> Loaded[Example]:
    """The first ``n`` unsafe (is_safe False) prompts, as no-input examples (official pred.py).

    ``response`` is not needed here, so only ``prompt`` and ``is_safe`` are checked.
    """
    src = _src(path, split)
    records = read_records(path, split=split)

    def convert(row, idx):
        prompt = _get(row, idx, "prompt", "a string", _is_str, src)
        safe = _get(row, idx, "is_safe", "a boolean", _is_bool, src)
        return None if safe else Example(instruction=prompt)

    return _collect(records, convert, src, n, skip_bad_rows, allow_fewer, what="unsafe prompts")


def _prebuilt(row: Any, idx: int, src: str, labels: Optional[Sequence[str]] = None) -> Optional[Example]:
    """A row the official ``build_dataset.py`` scripts wrote ({instruction, input, output}, the label
    already a word): taken as it is. None when the row is in the raw hub layout instead."""
    if not (isinstance(row, dict) and "output" in row and "instruction" in row):
        return None
    instruction = _get(row, idx, "instruction", "a string", _is_str, src)
    inp = _get(row, idx, "input", "a string", _is_str, src, default="")
    out = _get(row, idx, "output", "a string", _is_str, src)
    if labels is not None and out not in labels:
        raise _RowError(f"{src}: row {idx}: field 'output' must be one of {list(labels)}, got {_short(out)}")
    return Example(instruction=instruction, input=inp, output=out)


def read_sst2(
    path: str,
    n: Optional[int] = None,
    *,
    split: Optional[str] = None,
    skip_bad_rows: bool = False,
    allow_fewer: bool = False,
) -> Loaded[Example]:
    """SST2 rows {sentence, label 0/1} -> (official instruction, sentence) -> negative/positive; or the rows
    of the official ``sst2/build_dataset.py`` output ({instruction, input, output}) as they are.

    The official FA uses the whole validation split (872 rows; "first 1000" there means all).
    """
    src = _src(path, split)
    records = read_records(path, split=split)

    def convert(row, idx):
        built = _prebuilt(row, idx, src, SST2_LABELS)
        if built is not None:
            return built
        sentence = _get(row, idx, "sentence", "a string", _is_str, src)
        label = _get(row, idx, "label", "0 or 1", lambda v: _is_int(v) and v in (0, 1), src)
        return Example(instruction=SST2_INSTRUCTION, input=sentence, output=SST2_LABELS[int(label)])

    return _collect(records, convert, src, n, skip_bad_rows, allow_fewer)


def read_agnews(
    path: str,
    n: Optional[int] = None,
    *,
    split: Optional[str] = None,
    skip_bad_rows: bool = False,
    allow_fewer: bool = False,
) -> Loaded[Example]:
    """AG News rows {text, label 0..3} -> World / Sports / Business / Sci/Tech."""
    src = _src(path, split)
    records = read_records(path, split=split)

    def convert(row, idx):
        built = _prebuilt(row, idx, src, AGNEWS_LABELS)
        if built is not None:
            return built
        text = _get(row, idx, "text", "a string", _is_str, src)
        label = _get(row, idx, "label", "an integer 0..3", lambda v: _is_int(v) and 0 <= v <= 3, src)
        return Example(instruction=AGNEWS_INSTRUCTION, input=text, output=AGNEWS_LABELS[int(label)])

    return _collect(records, convert, src, n, skip_bad_rows, allow_fewer)


def gsm8k_target(answer: str) -> str:
    """Official rewrite: every '####' becomes 'The final answer is: ' (so '#### 72' -> '... is:  72')."""
    return answer.replace("####", GSM8K_ANSWER_PROMPT)


def read_gsm8k(
    path: str,
    n: Optional[int] = None,
    *,
    split: Optional[str] = None,
    config: Optional[str] = "main",
    skip_bad_rows: bool = False,
    allow_fewer: bool = False,
) -> Loaded[Example]:
    """GSM8K rows {question, answer} -> (question, no input) -> rewritten answer."""
    src = _src(path, split)
    records = read_records(path, split=split, config=config)

    def convert(row, idx):
        built = _prebuilt(row, idx, src)  # the official script has already rewritten '####'
        if built is not None:
            return built
        q = _get(row, idx, "question", "a string", _is_str, src)
        a = _get(row, idx, "answer", "a string", _is_str, src)
        return Example(instruction=q, input="", output=gsm8k_target(a))

    return _collect(records, convert, src, n, skip_bad_rows, allow_fewer)


def read_instructions(
    path: str,
    n: Optional[int] = None,
    *,
    split: Optional[str] = None,
    skip_bad_rows: bool = False,
    allow_fewer: bool = False,
) -> Loaded[Example]:
    """Alpaca-style rows {instruction, input (optional, default ''), output}; extra fields ignored."""
    src = _src(path, split)
    records = read_records(path, split=split)

    def convert(row, idx):
        return Example(
            instruction=_get(row, idx, "instruction", "a string", _is_str, src),
            input=_get(row, idx, "input", "a string", _is_str, src, default=""),
            output=_get(row, idx, "output", "a string", _is_str, src),
        )

    return _collect(records, convert, src, n, skip_bad_rows, allow_fewer)


def read_prompts(
    path: str,
    n: Optional[int] = None,
    *,
    split: Optional[str] = None,
    skip_bad_rows: bool = False,
    allow_fewer: bool = False,
) -> Loaded[Example]:
    """Prompts only (e.g. over-refusal prompts): rows with a string 'instruction' (+ optional 'input') or
    'prompt'; any other field is ignored."""
    src = _src(path, split)
    records = read_records(path, split=split)

    def convert(row, idx):
        key = "instruction" if isinstance(row, dict) and "instruction" in row else "prompt"
        return Example(
            instruction=_get(row, idx, key, "a string (or give 'instruction')", _is_str, src),
            input=_get(row, idx, "input", "a string", _is_str, src, default="") if key == "instruction" else "",
        )

    return _collect(records, convert, src, n, skip_bad_rows, allow_fewer, what="prompts")


# data.task -> the reader of its train / evaluation file (the fine-tuning stage and the evaluation use this map)
READERS = {
    "sst2": read_sst2,
    "agnews": read_agnews,
    "gsm8k": read_gsm8k,
    "alpaca": read_instructions,
}
