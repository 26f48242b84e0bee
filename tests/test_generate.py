"""Batched KV-cache decoding against transformers' generate and against the uncached forward.

Reference choices: transformers generates each prompt alone (batch of 1, no padding) so
that its own padding rules play no part; the comparison is token for token (greedy), and
each case asserts that the reference's top-2 logit gap is > 1e-3 at every generated step,
so an argmax flip from float noise (~1e-6 here) is impossible and the seeds are documented
as non-tied. Cached logits must equal the uncached full forward within 1e-4 (float32).
"""

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from booster_jax.errors import BoosterInputError
from booster_jax.eval import generate as gen
from booster_jax.models import hf
from booster_jax.models.llama import LoraSpec, make_model, variables
from booster_jax.models.lora import init_lora, merge_lora
from tests.hf_fixtures import build_hf_model

TOL = 1e-4
MIN_GAP = 1e-3
# Seed 22: the reference top-2 gap is >= 2.6e-3 at every step of every case below (scanned seeds 0-39;
# most tiny random models have steps with gaps ~1e-5, which the MIN_GAP check refuses).
LENGTHS = (7, 3, 12, 5, 1)  # batch_size 4 -> batches [1, 3, 5, 7] and [12 + 3 filler rows]
MAX_NEW = 10
SPEC = LoraSpec(r=4, alpha=8.0, targets=("q_proj", "k_proj", "v_proj", "gate_proj"))


def random_lora(cfg, seed=1):
    """A non-zero adapter (B ~ N(0, 0.2)) so the LoRA path changes the output."""
    lora = init_lora(jax.random.key(seed), cfg, SPEC)
    key = jax.random.key(seed + 100)
    leaves, tree = jax.tree.flatten(lora)
    leaves = [x if i % 2 == 0 else 0.2 * jax.random.normal(jax.random.fold_in(key, i), x.shape)
              for i, x in enumerate(leaves)]
    return jax.tree.unflatten(tree, leaves)


def prompts_for(vocab, seed=22, lengths=LENGTHS):
    rng = np.random.default_rng(seed)
    return [[int(x) for x in rng.integers(3, vocab, n)] for n in lengths]


CASES = [("llama31_tied", False), ("qwen2_bias", True), ("llama_gqa", True)]
MAIN = ("llama_gqa", True)


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    """case -> (our model, params, lora or None, transformers model with the same (merged) weights, base model)."""
    from transformers import AutoModelForCausalLM

    out = {}
    for variant, with_lora in CASES:
        base = ref = build_hf_model(variant)
        d = tmp_path_factory.mktemp(variant)
        base.save_pretrained(d)
        cfg = hf.read_config(str(d))
        params = hf.load_params(str(d), cfg)
        lora = None
        if with_lora:
            lora = random_lora(cfg)
            merged_dir = tmp_path_factory.mktemp(variant + "_merged")
            hf.save_params(merge_lora(params, lora, SPEC), cfg, str(merged_dir))
            ref = AutoModelForCausalLM.from_pretrained(merged_dir, attn_implementation="eager").float().eval()
        out[(variant, with_lora)] = (make_model(cfg, lora=SPEC), params, lora, ref, base)
    return out


def hf_greedy(ref, prompt, max_new, eos=None):
    """transformers greedy continuation of one unpadded prompt, and the min top-2 logit gap over its steps."""
    with torch.no_grad():
        r = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    new = r.sequences[0, len(prompt):].tolist()
    gaps = [float(torch.topk(step[0], 2).values.diff().abs()) for step in r.logits]
    return new, min(gaps)


KW = dict(max_new_tokens=MAX_NEW, pad_id=0, batch_size=4, bucket=16)  # one static shape for all tests


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}{'+lora' if c[1] else ''}")
def test_greedy_matches_transformers(setups, case):
    model, params, lora, ref, base = setups[case]
    prompts = prompts_for(model.cfg.vocab_size)
    ours = gen.generate(model, params, lora, prompts, eos_id=None, **KW)
    ours_right = gen.generate(model, params, lora, prompts, eos_id=None, padding="right", **KW)
    for i, p in enumerate(prompts):
        want, gap = hf_greedy(ref, p, MAX_NEW)
        assert gap > MIN_GAP, f"prompt {i}: reference top-2 logits nearly tied (gap {gap}); choose another seed"
        assert ours[i] == want, f"prompt {i} (len {len(p)}): ours {ours[i]} vs transformers {want}"
        assert ours_right[i] == want, f"prompt {i}: right padding differs"
    if lora is not None:  # the adapter really changes the output
        assert ours != [hf_greedy(base, p, MAX_NEW)[0] for p in prompts]


def test_cached_logits_equal_uncached_forward(setups):
    """prefill + teacher-forced decode steps vs the full forward of each unpadded prompt + continuation.

    Rows 0-3 are left-padded, rows 4-7 the same prompts right-padded (one batch: the code path is one).
    """
    model, params, lora, _, _ = setups[MAIN]
    prompts = prompts_for(model.cfg.vocab_size, seed=3, lengths=(6, 2, 9, 4))
    steps = 5
    forced = np.random.default_rng(4).integers(3, model.cfg.vocab_size, (len(prompts), steps)).astype(np.int32)
    left, lmask = gen.pad_prompts(prompts, 16, 0, "left")
    right, rmask = gen.pad_prompts(prompts, 16, 0, "right")
    ids, mask = np.concatenate([left, right]), np.concatenate([lmask, rmask])
    forced2 = np.concatenate([forced, forced])

    @jax.jit
    def cached(ids, mask, forced):
        t = ids.shape[1]
        cache, logits, key_valid, pos = gen.prefill(model, params, lora, ids, mask, t + steps)

        def step(cache, i):
            cache, logits = gen.decode_step(model, params, lora, cache, forced[:, i], t + i, pos + i, key_valid)
            return cache, logits

        _, rest = jax.lax.scan(step, cache, jnp.arange(steps - 1))
        return jnp.concatenate([logits[:, None], jnp.swapaxes(rest, 0, 1)], axis=1)

    got = np.asarray(cached(ids, mask, forced2))
    # uncached reference: each prompt + its forced tokens, right-padded into one batch (padding after the end
    # cannot change earlier logits under the causal mask; the plain forward is checked against HF in test_model)
    full_ids, full_mask = gen.pad_prompts([p + forced[r].tolist() for r, p in enumerate(prompts)], 16, 0, "right")
    full = np.asarray(jax.jit(model.apply)(variables(params, lora), full_ids, full_mask))
    for r, p in enumerate(prompts):
        want = full[r, len(p) - 1:len(p) - 1 + steps]
        for row, side in ((r, "left"), (r + len(prompts), "right")):
            err = np.abs(got[row] - want).max()
            assert err <= TOL, f"prompt {r} ({side} padding): cached vs full forward max abs diff {err}"


def test_eos_stops_each_sequence(setups):
    model, params, lora, ref, _ = setups[MAIN]
    prompts = prompts_for(model.cfg.vocab_size)
    free = gen.generate(model, params, lora, prompts, eos_id=None, **KW)
    eos = free[0][4]  # row 0 emits it by step 4; some other row never does (asserted below)
    stopped = gen.generate(model, params, lora, prompts, eos_id=eos, **KW)
    with_eos = gen.generate(model, params, lora, prompts, eos_id=eos, include_eos=True, **KW)
    assert any(eos not in f for f in free), "choose an eos that some row never emits"
    assert len(stopped[0]) <= 4
    for i, (f, s, w) in enumerate(zip(free, stopped, with_eos)):
        cut = f.index(eos) if eos in f else len(f)
        assert s == f[:cut], f"row {i}"
        assert w == (f[:cut + 1] if eos in f else f), f"row {i}"
        assert s == [t for t in hf_greedy(ref, prompts[i], MAX_NEW, eos=eos)[0] if t != eos], f"row {i}"

    # once every row is done the loop ends; finished rows hold pad
    rows = ([p for p, f in zip(prompts, free) if eos in f] * 4)[:4]
    last_stop = max(f.index(eos) for p, f in zip(prompts, free) if eos in f)
    ids, mask = gen.pad_prompts(rows, 16, 0)
    out, steps = gen.decode_batch(model, params, lora, ids, mask, np.ones(4, bool), jax.random.key(0),
                                  jnp.float32(1), jnp.float32(1), max_new_tokens=MAX_NEW, greedy=True,
                                  eos_ids=(eos,), pad_id=0)
    assert int(steps) <= last_stop + 1 < MAX_NEW
    out = np.asarray(out)
    for row in out:
        k = row.tolist().index(eos)
        assert (row[k + 1:] == 0).all()


def test_sampling_reproducible_and_top_p_zero_is_greedy(setups):
    model, params, lora, _, _ = setups[MAIN]
    prompts = prompts_for(model.cfg.vocab_size)
    kw = dict(eos_id=None, **KW)
    sample = dict(greedy=False, temperature=1.5, top_p=0.9)
    a = gen.generate(model, params, lora, prompts, rng=jax.random.key(7), **sample, **kw)
    b = gen.generate(model, params, lora, prompts, rng=jax.random.key(7), **sample, **kw)
    c = gen.generate(model, params, lora, prompts, rng=jax.random.key(8), **sample, **kw)
    assert a == b
    assert a != c
    greedy = gen.generate(model, params, lora, prompts, **kw)
    tiny_p = gen.generate(model, params, lora, prompts, rng=jax.random.key(7), greedy=False, top_p=1e-9, **kw)
    assert tiny_p == greedy


def test_top_p_keeps_the_nucleus():
    """probs (0.5, 0.3, 0.15, 0.05): top_p 0.7 keeps the first two, 0.45 only the first (HF's rule)."""
    logits = jnp.log(jnp.asarray([[0.15, 0.5, 0.05, 0.3]] * 2000))
    for top_p, allowed in ((0.7, {1, 3}), (0.45, {1}), (0.96, {0, 1, 3, 2})):
        toks = np.asarray(gen.select_tokens(logits, jax.random.key(0), False, 1.0, top_p))
        assert set(toks.tolist()) == allowed, top_p


def test_compiled_function_is_reused(setups):
    model, params, lora, _, _ = setups[MAIN]
    gen.generate(model, params, lora, prompts_for(model.cfg.vocab_size, seed=5, lengths=(3, 4, 9, 6)),
                 eos_id=None, **KW)
    before = gen.trace_count()
    gen.generate(model, params, lora, prompts_for(model.cfg.vocab_size, seed=6, lengths=(8, 2, 16, 1)),
                 eos_id=None, **KW)
    assert gen.trace_count() == before  # same (batch, bucket, max_new_tokens): no new compilation


def test_generate_text_decodes_continuation(setups):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in "abcdefghijklmnopqrstuvwxyz ":
        vocab[ch] = len(vocab)
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    t.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    t.decoder = decoders.Fuse()
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>")

    model, params, lora, _, _ = setups[MAIN]
    prompts = ["hello there", "abc"]
    texts = gen.generate_text(tok, model, params, lora, prompts, max_new_tokens=6, batch_size=2, bucket=8)
    ids = [tok(p)["input_ids"] for p in prompts]
    assert ids[1] == [1, 3, 4, 5]
    new = gen.generate(model, params, lora, ids, max_new_tokens=6, eos_id=2, pad_id=0, batch_size=2, bucket=8)
    assert texts == [tok.decode(n, skip_special_tokens=True) for n in new]
    full = gen.generate_text(tok, model, params, lora, prompts, max_new_tokens=6, batch_size=2, bucket=8,
                             full_text=True)
    assert all(f.startswith(p) for f, p in zip(full, prompts))


def test_bad_input_is_reported(setups):
    model, params, lora, _, _ = setups[MAIN]
    kw = dict(max_new_tokens=4, eos_id=None, pad_id=0, batch_size=2)
    with pytest.raises(BoosterInputError, match="empty"):
        gen.generate(model, params, lora, [[5], []], **kw)
    with pytest.raises(BoosterInputError, match="rng"):
        gen.generate(model, params, lora, [[5]], greedy=False, **kw)
    with pytest.raises(BoosterInputError, match="padding"):
        gen.generate(model, params, lora, [[5]], padding="middle", **kw)
    with pytest.raises(BoosterInputError, match="vocabulary"):
        gen.generate(model, params, lora, [[5, 1000]], **kw)
