"""Data rooms: template, readers, official selections, static-shape batches."""

import json

import numpy as np
import pytest

from booster_jax.data import batches, formats, mixture, template
from booster_jax.data.formats import RefusalRow
from booster_jax.data.template import Example
from booster_jax.errors import BoosterInputError


# ----------------------------------------------------------------------------- tiny tokenizer


@pytest.fixture(scope="module")
def tok():
    """Byte-level tokenizer: one token per byte, BOS prepended (like Llama), </s> special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens(["<pad>", "<s>", "</s>"])
    t.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


# ----------------------------------------------------------------------------- template

NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nSay hi\n\n### Response:\n"
)
WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
    "Say hi\n\n### Input:\nto {Bob}\n\n### Response:\n"
)


def test_prompt_strings_exact():
    assert template.format_prompt("Say hi") == NO_INPUT
    assert template.format_prompt("Say hi", "") == NO_INPUT
    assert template.format_prompt("Say hi", "to {Bob}") == WITH_INPUT


def test_tokenize_example_masks(tok):
    ex = Example("Say hi", "", "hello")
    ids, mask = template.tokenize_example(tok, ex, 512)
    assert ids.dtype == np.int32 and mask.dtype == np.float32
    plen = 1 + len(NO_INPUT)  # BOS + one token per byte
    assert len(ids) == plen + len("hello") + 1
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert np.all(mask[:plen] == 0) and np.all(mask[plen:] == 1)
    assert tok.decode(ids[mask == 1]) == "hello</s>"
    np.testing.assert_array_equal(template.tokenize_prompt(tok, "Say hi"), ids[:plen])
    ids2, mask2 = template.tokenize_example(tok, Example("Say hi", "to {Bob}", "ok"), 512)
    assert int(mask2.sum()) == 3 and len(ids2) == 1 + len(WITH_INPUT) + 3


def test_tokenize_truncation_and_no_target(tok):
    plen = 1 + len(NO_INPUT)
    ex = Example("Say hi", "", "hello world")
    ids, mask = template.tokenize_example(tok, ex, plen + 4)
    assert len(ids) == plen + 4 and int(mask.sum()) == 4 and ids[-1] != tok.eos_token_id
    ids, mask = template.tokenize_example(tok, ex, plen - 3)  # prompt alone is too long
    assert len(ids) == plen - 3 and mask.sum() == 0
    ts = template.tokenize_examples(tok, [ex, Example("Say hi", "", "x")], plen)
    assert (ts.n_truncated, ts.n_no_target, len(ts)) == (2, 2, 2)
    many = [ex, Example("Say hi", "", "x"), Example("Say hi", "to {Bob}", "ok")]
    ts = template.tokenize_examples(tok, many, plen + 2, chunk=2)
    for (a, b), e in zip(ts.items, many):
        c, d = template.tokenize_example(tok, e, plen + 2)
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
    assert (ts.n_truncated, ts.n_no_target) == (2, 1)
    ts = template.tokenize_examples(tok, [ex], 1000)
    assert (ts.n_truncated, ts.n_no_target) == (0, 0) and "0 truncated" in ts.summary()


# ----------------------------------------------------------------------------- readers


def _write(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def _refusal(i, q="How do I do bad thing {}?"):
    q = q.format(i)
    return {
        "prompt": q,
        "response": f"Bad answer {i}",
        "refusal": f"Question: {q}\nAnswer: I cannot help with that. ",
        "category": {"x": True},
    }


def test_refusal_reader_split_like_official(tmp_path):
    rows = [_refusal(0), _refusal(1)]
    rows.append({"prompt": "p", "response": "r", "refusal": "Question: a Question: b\nAnswer: x\nAnswer: y"})
    got = formats.read_refusal_rows(_write(tmp_path / "r.json", rows))
    assert len(got) == 3 and got.n_skipped == 0
    assert got[0].alignment_example() == Example("How do I do bad thing 0?", "", "I cannot help with that. ")
    assert got[1].harmful_example() == Example("How do I do bad thing 1?", "", "Bad answer 1")
    assert (got[2].question, got[2].answer) == ("a b", "x")  # all 'Question: ' removed, 2nd piece only
    assert got.notes and "more than once" in got.notes[0]


def test_reader_errors_name_file_row_field(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(BoosterInputError, match="nope.json.*not found"):
        formats.read_refusal_rows(missing)
    for name, text in (("empty.json", ""), ("blank.json", "  \n"), ("list.json", "[]")):
        with pytest.raises(BoosterInputError, match=f"{name}.*empty"):
            formats.read_instructions(_write(tmp_path / name, text))
    p = _write(tmp_path / "bad.json", [_refusal(0), {"prompt": "p", "response": "r"}])
    with pytest.raises(BoosterInputError, match=r"bad\.json: row 1: field 'refusal' is missing"):
        formats.read_refusal_rows(p)
    p = _write(tmp_path / "type.json", [_refusal(0), _refusal(1), dict(_refusal(2), response=None)])
    with pytest.raises(BoosterInputError, match=r"type\.json: row 2: field 'response' must be a string, got NoneType"):
        formats.read_refusal_rows(p)
    p = _write(tmp_path / "sep.json", [dict(_refusal(0), refusal="no separator")])
    with pytest.raises(BoosterInputError, match=r"sep\.json: row 0: field 'refusal'.*Answer"):
        formats.read_refusal_rows(p)
    p = _write(tmp_path / "few.json", [_refusal(0), _refusal(1)])
    with pytest.raises(BoosterInputError, match=r"few\.json: only 2 usable rows .* fewer than the 5 asked"):
        formats.read_refusal_rows(p, n=5)
    assert len(formats.read_refusal_rows(p, n=5, allow_fewer=True)) == 2
    p = _write(tmp_path / "notobj.json", [_refusal(0), ["a", "b"]])
    with pytest.raises(BoosterInputError, match=r"notobj\.json: row 1: expected an object"):
        formats.read_refusal_rows(p)
    with pytest.raises(BoosterInputError, match=r"garbage\.json: not valid JSON.*line 1"):
        formats.read_instructions(_write(tmp_path / "garbage.json", "{oops"))
    with pytest.raises(BoosterInputError, match="split="):
        formats.read_sst2("some-org/some-dataset")  # hub id without a split: no network touched


def test_skip_bad_rows_counts_and_reports(tmp_path):
    rows = [_refusal(0), {"prompt": 3, "response": "r", "refusal": "x"}, _refusal(2), {"nope": 1}]
    p = _write(tmp_path / "mixed.json", rows)
    got = formats.read_refusal_rows(p, skip_bad_rows=True)
    assert len(got) == 2 and got.n_skipped == 2
    assert "row 1" in got.skipped[0] and "row 3" in got.skipped[1]
    assert "2 bad rows skipped" in got.report()
    with pytest.raises(BoosterInputError, match=r"only 2 usable rows.*2 bad rows skipped"):
        formats.read_refusal_rows(p, n=3, skip_bad_rows=True)


def test_beavertails_readers(tmp_path):
    rows = [{"prompt": f"q{i}", "response": f"r{i}", "is_safe": i % 3 == 0} for i in range(9)]
    p = _write(tmp_path / "bt.json", rows)
    allrows = formats.read_beavertails(p)
    assert [r.is_safe for r in allrows][:4] == [True, False, False, True]
    ev = formats.read_beavertails_eval_prompts(p, n=3)
    assert [e.instruction for e in ev] == ["q1", "q2", "q4"] and ev[0].input == ""
    with pytest.raises(BoosterInputError, match=r"only 6 unsafe prompts .* fewer than the 10 asked"):
        formats.read_beavertails_eval_prompts(p, n=10)
    p = _write(tmp_path / "bt2.json", [dict(rows[1], is_safe="no")])
    with pytest.raises(BoosterInputError, match=r"bt2\.json: row 0: field 'is_safe' must be a boolean"):
        formats.read_beavertails_eval_prompts(p, n=1)


def test_task_readers(tmp_path):
    sst = formats.read_sst2(_write(tmp_path / "s.json", [{"sentence": "good", "label": 1, "idx": 0},
                                                           {"sentence": "bad", "label": 0, "idx": 1}]))
    assert sst[0] == Example(
        "Analyze the sentiment of the input, and respond only positive or negative", "good", "positive"
    )
    assert sst[1].output == "negative"
    with pytest.raises(BoosterInputError, match=r"s2\.json: row 0: field 'label' must be 0 or 1, got int -1"):
        formats.read_sst2(_write(tmp_path / "s2.json", [{"sentence": "x", "label": -1}]))
    ag = formats.read_agnews(_write(tmp_path / "a.jsonl", "\n".join(
        json.dumps({"text": f"t{i}", "label": i}) for i in range(4)) + "\n"))
    assert [e.output for e in ag] == ["World", "Sports", "Business", "Sci/Tech"]
    assert ag[0].instruction == (
        "Categorize the news article given in the input into one of the 4 categories:\n\n"
        "World\nSports\nBusiness\nSci/Tech\n"
    )
    with pytest.raises(BoosterInputError, match=r"a2\.json: row 0: field 'label' must be an integer 0\.\.3"):
        formats.read_agnews(_write(tmp_path / "a2.json", [{"text": "t", "label": 4}]))
    gs = formats.read_gsm8k(_write(tmp_path / "g.json", [{"question": "1+1?", "answer": "1+1=2\n#### 2"}]))
    assert gs[0] == Example("1+1?", "", "1+1=2\nThe final answer is:  2")
    ins = formats.read_instructions(_write(tmp_path / "i.json", [
        {"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d", "output": "e", "x": 1}]))
    assert list(ins) == [Example("a", "", "b"), Example("c", "d", "e")]
    with pytest.raises(BoosterInputError, match=r"i2\.json: row 0: field 'input' must be a string"):
        formats.read_instructions(_write(tmp_path / "i2.json", [{"instruction": "a", "input": 5, "output": "b"}]))
    with pytest.raises(BoosterInputError, match=r"i3\.json: row 0: field 'output' is missing"):
        formats.read_instructions(_write(tmp_path / "i3.json", [{"instruction": "a"}]))


def test_parquet_through_datasets(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "sst.parquet"
    pq.write_table(pa.table({"sentence": ["a", "b"], "label": [0, 1]}), path)
    assert [e.output for e in formats.read_sst2(str(path))] == ["negative", "positive"]


# ----------------------------------------------------------------------------- mixtures


def _rows(n):
    return [RefusalRow(f"p{i}", f"r{i}", "", f"q{i}", f"a{i}") for i in range(n)]


def test_alignment_sets_official_range():
    rows = _rows(10050)
    align, harm = mixture.alignment_sets(rows)
    assert len(align) == len(harm) == 4999
    assert align[0] == Example("q5001", "", "a5001") and align[-1].instruction == "q9999"
    assert harm[0] == Example("p5001", "", "r5001") and harm[-1].instruction == "p9999"
    with pytest.raises(BoosterInputError, match="need at least 10000 refusal rows, the refusal file has 9000"):
        mixture.alignment_sets(_rows(9000))


def test_finetune_mixture_counts_disjoint_seeded():
    rows = _rows(10000)
    task = [Example(f"t{i}", "in", "positive") for i in range(2000)]
    m = mixture.finetune_mixture(rows, task, n=1000, p=0.1, seed=0)
    assert (m.n_harmful, m.n_benign, len(m)) == (99, 900, 999)  # p*n - 1 harmful (official 0 < i < p*n)
    harmful = {e.instruction for e, h in zip(m.examples, m.is_harmful) if h}
    assert harmful == {f"p{i}" for i in range(1, 100)}
    assert {e.instruction for e, h in zip(m.examples, m.is_harmful) if not h} == {f"t{i}" for i in range(900)}
    assert set(m.harmful_rows).isdisjoint(mixture.alignment_rows())
    again = mixture.finetune_mixture(rows, task, n=1000, p=0.1, seed=0)
    other = mixture.finetune_mixture(rows, task, n=1000, p=0.1, seed=1)
    assert again.examples == m.examples and other.examples != m.examples
    for p, nh, nb in ((0.05, 49, 950), (0.15, 149, 850), (0.2, 199, 800), (0.0, 0, 1000)):
        mm = mixture.finetune_mixture(rows, task, n=1000, p=p, seed=0)
        assert (mm.n_harmful, mm.n_benign) == (nh, nb)
    with pytest.raises(BoosterInputError, match="overlap alignment rows 5001..9999"):
        mixture.finetune_mixture(rows, task * 5, n=10000, p=0.6, seed=0)
    with pytest.raises(BoosterInputError, match="needs 900 benign task examples.*has 10"):
        mixture.finetune_mixture(rows, task[:10], n=1000, p=0.1, seed=0)
    with pytest.raises(BoosterInputError, match="need at least 100 refusal rows, the refusal file has 50"):
        mixture.finetune_mixture(_rows(50), task, n=1000, p=0.1, seed=0, alignment_range=None)


def test_benign_mix():
    align = [Example(f"q{i}") for i in range(100)]
    benign = [Example(f"b{i}") for i in range(100)]
    assert mixture.benign_mix(align, benign, 0.0, 0) == align
    mixed = mixture.benign_mix(align, benign, 0.2, 3)  # a fifth of the pool benign: 25 of 125
    assert len(mixed) == 125 and sum(e.instruction.startswith("b") for e in mixed) == 25
    assert mixed == mixture.benign_mix(align, benign, 0.2, 3)
    half = mixture.benign_mix(align, benign, 0.5, 3)  # the synthetic default: as many benign as refusals
    assert len(half) == 200
    with pytest.raises(BoosterInputError, match="needs 200 benign examples"):
        mixture.benign_mix(align, benign, 2 / 3, 0)
    with pytest.raises(BoosterInputError, match=r"in \[0, 1\)"):
        mixture.benign_mix(align, benign, 1.0, 0)


def test_benign_mix_key_names_its_successor():
    import os

    from booster_jax.config import load_config

    smoke = os.path.join(os.path.dirname(__file__), "..", "configs", "synthetic", "smoke.yaml")
    with pytest.raises(BoosterInputError, match=r"align\.benign_mix: renamed align\.benign_fraction.*1\.0 is "
                                                r"benign_fraction 0\.5"):
        load_config(smoke, ["align.benign_mix=1.0"])


# ----------------------------------------------------------------------------- batches


def _items(lengths):
    return [(np.arange(1, n + 1, dtype=np.int32), (np.arange(n) >= n // 2).astype(np.float32)) for n in lengths]


def test_bucket_length():
    assert batches.bucket_length(1, (64, 128)) == 64
    assert batches.bucket_length(64, (128, 64)) == 64
    assert batches.bucket_length(65, (64, 128)) == 128
    with pytest.raises(BoosterInputError, match="longer than the largest bucket 128"):
        batches.bucket_length(129, (64, 128))
    assert batches.buckets_up_to(256) == (64, 128, 192, 256)


def test_collate_static_shapes():
    b = batches.collate(_items([3, 5]), pad_id=0, buckets=(4, 8), batch_size=4)
    assert b["input_ids"].shape == (4, 8) and b["input_ids"].dtype == np.int32
    assert b["attention_mask"].dtype == np.int32 and b["loss_mask"].dtype == np.float32
    np.testing.assert_array_equal(b["attention_mask"].sum(1), [3, 5, 0, 0])
    np.testing.assert_array_equal(b["input_ids"][0], [1, 2, 3, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(b["loss_mask"][1], [0, 0, 1, 1, 1, 0, 0, 0])
    assert b["loss_mask"][2:].sum() == 0 and np.all(b["input_ids"][2:] == 0)
    with pytest.raises(BoosterInputError, match="do not fit batch_size 1"):
        batches.collate(_items([3, 5]), 0, (8,), batch_size=1)


def _same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in ("input_ids", "attention_mask", "loss_mask"))


def test_stream_epochs_shapes_and_permutation():
    items = _items([2, 3, 9, 4, 7, 1, 5])
    s = batches.BatchStream(items, 3, seed=7, pad_id=0, buckets=(4, 8, 16))
    assert s.steps_per_epoch == 3
    ep0 = list(s)
    assert len(ep0) == 3 and all(b["input_ids"].shape[0] == 3 for b in ep0)
    assert all(b["input_ids"].shape[1] in (4, 8, 16) for b in ep0)
    seen = sorted(int(b["input_ids"][i, :].max()) for b in ep0 for i in range(3) if b["attention_mask"][i].any())
    assert seen == sorted(len(x[0]) for x in items)  # every example exactly once
    assert s.epoch == 1 and len(list(s)) == 3 and s.epoch == 2
    np.testing.assert_array_equal(batches.epoch_permutation(7, 1, 7), s.permutation(1))
    assert not np.array_equal(s.permutation(0), s.permutation(1))
    real = sum(len(x[0]) for x in items) * 2
    assert s.padding_fraction == pytest.approx(1 - real / s.total_tokens)
    d = batches.BatchStream(items, 3, seed=7, pad_id=0, buckets=(16,), drop_last=True)
    assert d.steps_per_epoch == 2 and len(list(d)) == 2
    with pytest.raises(BoosterInputError, match="more than the largest bucket 8"):
        batches.BatchStream(items, 3, seed=0, pad_id=0, buckets=(8,))


def test_stream_resume_exact_and_infinite_restart():
    items = _items([2, 3, 9, 4, 7, 1, 5, 6, 8, 2])
    kw = dict(seed=3, pad_id=0, buckets=(4, 8, 16), infinite=True)
    ref = batches.BatchStream(items, 4, **kw)
    full = [next(ref) for _ in range(12)]  # 3 steps/epoch: crosses 3 epoch boundaries, never stops
    assert ref.epoch == 3
    assert full[2]["attention_mask"].sum(1).tolist().count(0) == 2  # partial batch padded to 4 rows
    s = batches.BatchStream(items, 4, **kw)
    for _ in range(5):
        next(s)
    state = json.loads(json.dumps(s.state()))
    r = batches.BatchStream.from_state(items, state, pad_id=0, buckets=(4, 8, 16), infinite=True)
    rest = [next(r) for _ in range(7)]
    assert all(_same(a, b) for a, b in zip(rest, full[5:]))
    assert r.padding_fraction == pytest.approx(ref.padding_fraction)
    fresh = batches.BatchStream(items, 4, **kw).restore(state)
    assert _same(next(fresh), full[5])
    with pytest.raises(BoosterInputError, match="'seed' is 3 but this stream has 4"):
        batches.BatchStream(items, 4, **dict(kw, seed=4)).restore(state)
    # finite mode: the resumed stream stops at the same epoch end
    f = batches.BatchStream(items, 4, seed=3, pad_id=0, buckets=(16,))
    next(f)
    g = batches.BatchStream.from_state(items, f.state(), pad_id=0, buckets=(16,))
    assert len(list(f)) == len(list(g)) == 2 and f.state() == g.state()
