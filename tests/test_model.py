"""Our Flax LLaMA family against transformers on the same weights (float32: max abs diff <= 1e-4)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from booster_jax.errors import BoosterInputError
from booster_jax.models import hf
from booster_jax.models.llama import make_model, variables
from tests.hf_fixtures import VARIANTS, build_hf_model, padded_batch

TOL = 1e-4


def our_logits(model_dir, ids, mask, dtype="float32"):
    cfg = hf.read_config(model_dir)
    params = hf.load_params(model_dir, cfg, param_dtype=dtype)
    model = make_model(cfg, dtype=dtype, param_dtype=dtype)
    return np.asarray(model.apply(variables(params), jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy())))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for name in VARIANTS:
        model = build_hf_model(name)
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(d)
        out[name] = (model, str(d))
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(saved, variant):
    model, d = saved[variant]
    ids, mask = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits.numpy()
    ours = our_logits(d, ids, mask)
    real = mask.numpy().astype(bool)  # padded positions are not compared: their values are unspecified
    err = np.abs(ours - ref)[real].max()
    assert err <= TOL, f"{variant}: max abs diff {err}"


def test_config_fields_are_read(saved):
    cfg = hf.read_config(saved["llama31_tied"][1])
    assert cfg.rope_type == "llama3" and cfg.tie_word_embeddings and cfg.num_kv_heads == 2
    assert hf.read_config(saved["qwen2_bias"][1]).qkv_bias


def test_bfloat16_close_to_float32(saved):
    """bf16 params and compute: finite, and within 0.1 (abs) of float32 on logits of scale ~1."""
    model, d = saved["llama_gqa"]
    ids, mask = padded_batch(model.config.vocab_size)
    f32 = our_logits(d, ids, mask)
    bf16 = our_logits(d, ids, mask, dtype="bfloat16")
    real = mask.numpy().astype(bool)
    assert np.isfinite(bf16).all()
    assert np.abs(bf16 - f32)[real].max() < 0.1


def test_save_params_round_trip(saved, tmp_path):
    """Our writer produces a directory transformers loads to the same logits."""
    from transformers import AutoModelForCausalLM

    model, d = saved["llama_gqa"]
    cfg = hf.read_config(d)
    params = hf.load_params(d, cfg)
    hf.save_params(params, cfg, str(tmp_path))
    back = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    ids, mask = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        b = back(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(a, b, atol=1e-6)


def test_resize_embeddings_mean_rows(saved):
    d = saved["llama_gqa"][1]
    cfg = hf.read_config(d)
    params = hf.load_params(d, cfg)
    grown, cfg2 = hf.resize_embeddings(params, cfg, cfg.vocab_size + 1)
    emb = np.asarray(grown["embed_tokens"]["embedding"])
    assert cfg2.vocab_size == cfg.vocab_size + 1 and emb.shape[0] == cfg2.vocab_size
    np.testing.assert_allclose(emb[-1], emb[:-1].mean(0), rtol=1e-5, atol=1e-6)
    assert np.asarray(grown["lm_head"]["kernel"]).shape[1] == cfg2.vocab_size


# ---- bad input: each names the file and what was expected -------------------------------------------

def copy_dir(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_missing_config(tmp_path):
    with pytest.raises(BoosterInputError, match="config.json: missing"):
        hf.read_config(str(tmp_path))


def test_unsupported_model_type(saved, tmp_path):
    d = copy_dir(saved["llama_gqa"][1], tmp_path / "m")
    conf = json.load(open(os.path.join(d, "config.json")))
    conf["model_type"] = "gpt2"
    json.dump(conf, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(BoosterInputError, match=r"config.json: model_type 'gpt2' is not supported"):
        hf.read_config(d)


def test_shape_disagrees_with_config(saved, tmp_path):
    d = copy_dir(saved["llama_gqa"][1], tmp_path / "m")
    conf = json.load(open(os.path.join(d, "config.json")))
    conf["intermediate_size"] = 48
    json.dump(conf, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(BoosterInputError, match=r"model.safetensors: tensor model.layers.0.mlp.down_proj.weight "
                                                r"has shape \(32, 64\); the config expects \(32, 48\)"):
        hf.load_params(d, hf.read_config(d))


def test_missing_tensor(saved, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = copy_dir(saved["llama_gqa"][1], tmp_path / "m")
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, path)
    with pytest.raises(BoosterInputError, match="missing tensor model.layers.1.self_attn.k_proj.weight"):
        hf.load_params(d, hf.read_config(d))


def test_truncated_safetensors(saved, tmp_path):
    d = copy_dir(saved["llama_gqa"][1], tmp_path / "m")
    path = os.path.join(d, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(BoosterInputError, match="model.safetensors: truncated safetensors file"):
        hf.load_params(d, hf.read_config(d))


def test_pickle_only_is_refused(saved, tmp_path):
    d = copy_dir(saved["llama_gqa"][1], tmp_path / "m")
    os.remove(os.path.join(d, "model.safetensors"))
    open(os.path.join(d, "pytorch_model.bin"), "wb").write(b"\x80\x04not really")
    with pytest.raises(BoosterInputError, match="only pickle weights found .*pytorch_model.bin.*refused"):
        hf.load_params(d, hf.read_config(d))


def test_sharded_checkpoint(saved, tmp_path):
    """A checkpoint split over several files with an index loads to the same logits."""
    model, _ = saved["qwen2_bias"]
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    ids, mask = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits.numpy()
    ours = our_logits(str(tmp_path), ids, mask)
    assert np.abs(ours - ref)[mask.numpy().astype(bool)].max() <= TOL


def test_unrolled_layers_match_scan(saved):
    """``scan_layers=False`` (the unrolled loop) is the same function: logits and LoRA gradients agree."""
    import jax

    from booster_jax.methods.base import Forward, lm_loss
    from booster_jax.models.llama import LoraSpec
    from booster_jax.models.lora import init_lora

    model, d = saved["llama_gqa"]
    ids, mask = padded_batch(model.config.vocab_size)
    cfg = hf.read_config(d)
    params = hf.load_params(d, cfg)
    spec = LoraSpec(r=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    lora = jax.tree.map(lambda x: x + 0.01, init_lora(jax.random.key(1), cfg, spec))  # B != 0: a real delta
    batch = {"input_ids": jnp.asarray(ids.numpy()), "attention_mask": jnp.asarray(mask.numpy()),
             "loss_mask": jnp.asarray(mask.numpy(), jnp.float32)}
    out = {}
    for scan in (True, False):
        fwd = Forward(make_model(cfg, spec, scan_layers=scan))
        out[scan] = jax.value_and_grad(lambda w, fwd=fwd: lm_loss(fwd(w, params, batch), batch))(lora)
    assert abs(float(out[True][0]) - float(out[False][0])) <= 1e-6
    for a, b in zip(jax.tree.leaves(out[True][1]), jax.tree.leaves(out[False][1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def test_token_nll_is_log_softmax_cross_entropy():
    """``token_nll`` (logsumexp - target logit) equals -log_softmax[target] and has its gradient."""
    import jax

    from booster_jax.methods.base import token_nll

    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((3, 7, 50), np.float32) * 4)
    targets = jnp.asarray(rng.integers(0, 50, (3, 7)), jnp.int32)

    def reference(lg):
        return -jnp.take_along_axis(jax.nn.log_softmax(lg, -1), targets[..., None], -1)[..., 0]

    np.testing.assert_allclose(np.asarray(token_nll(logits, targets)), np.asarray(reference(logits)), atol=2e-6)
    g_ours = jax.grad(lambda lg: token_nll(lg, targets).sum())(logits)
    g_ref = jax.grad(lambda lg: reference(lg).sum())(logits)
    np.testing.assert_allclose(np.asarray(g_ours), np.asarray(g_ref), atol=1e-6)
