"""Our LoRA against PEFT on the same weights (float32: max abs diff <= 1e-4 on logits)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from booster_jax.errors import BoosterInputError
from booster_jax.models import hf
from booster_jax.models.llama import LoraSpec, make_model, variables
from booster_jax.models.lora import init_lora, load_peft, merge_lora, save_peft
from tests.hf_fixtures import build_hf_model, padded_batch

TOL = 1e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    model = build_hf_model("llama_gqa")
    d = tmp_path_factory.mktemp("base")
    model.save_pretrained(d)
    cfg = hf.read_config(str(d))
    return model, str(d), cfg, hf.load_params(str(d), cfg)


def peft_model(model, targets, r=4, alpha=8.0, seed=1):
    """A PEFT LoRA with non-zero B (init_lora_weights=False draws both A and B at random)."""
    from peft import LoraConfig, get_peft_model
    import copy

    torch.manual_seed(seed)
    conf = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                      init_lora_weights=False, task_type="CAUSAL_LM")
    return get_peft_model(copy.deepcopy(model), conf).eval()


def ours(cfg, params, lora, spec, ids, mask):
    model = make_model(cfg, spec)
    return np.asarray(model.apply(variables(params, lora), jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy())))


def max_err(a, b, mask):
    return np.abs(a - b)[mask.numpy().astype(bool)].max()


@pytest.mark.parametrize("targets", [("q_proj", "k_proj", "v_proj"), tuple(TARGETS)])
def test_peft_save_then_our_import(base, tmp_path, targets):
    model, _, cfg, params = base
    pm = peft_model(model, targets)
    pm.save_pretrained(tmp_path)
    lora, spec = load_peft(str(tmp_path), cfg)
    assert spec.targets == tuple(t for t in TARGETS if t in targets) and spec.scaling == 2.0
    assert float(jnp.abs(lora["layers"]["self_attn"]["q_proj"]["b"]).max()) > 0  # a real adapter, not B = 0
    ids, mask = padded_batch(cfg.vocab_size)
    with torch.no_grad():
        ref = pm(input_ids=ids, attention_mask=mask).logits.numpy()
        plain = model(input_ids=ids, attention_mask=mask).logits.numpy()
    assert max_err(ref, plain, mask) > 1e-2  # the adapter changes the output, so the check means something
    assert max_err(ours(cfg, params, lora, spec, ids, mask), ref, mask) <= TOL


def test_our_export_then_peft_load(base, tmp_path):
    from peft import PeftModel
    import copy

    model, _, cfg, params = base
    spec = LoraSpec(r=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    lora = init_lora(jax.random.key(3), cfg, spec)
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(4), x.shape), lora)  # B != 0
    save_peft(lora, spec, str(tmp_path))
    pm = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    ids, mask = padded_batch(cfg.vocab_size)
    with torch.no_grad():
        ref = pm(input_ids=ids, attention_mask=mask).logits.numpy()
    assert max_err(ours(cfg, params, lora, spec, ids, mask), ref, mask) <= TOL


def test_merge_equals_unmerged(base):
    _, _, cfg, params = base
    spec = LoraSpec(r=4, alpha=8.0, targets=tuple(TARGETS))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(5), x.shape),
                        init_lora(jax.random.key(6), cfg, spec))
    ids, mask = padded_batch(cfg.vocab_size)
    unmerged = ours(cfg, params, lora, spec, ids, mask)
    merged = ours(cfg, merge_lora(params, lora, spec), None, spec, ids, mask)
    assert max_err(unmerged, merged, mask) <= TOL


def test_init_matches_peft_distribution(base):
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) like PEFT's Kaiming-uniform(a=sqrt(5)); B = 0 so logits are unchanged."""
    _, _, cfg, params = base
    spec = LoraSpec(r=8, alpha=16.0)
    lora = init_lora(jax.random.key(0), cfg, spec)
    a = np.asarray(lora["layers"]["self_attn"]["q_proj"]["a"])
    bound = 1 / np.sqrt(cfg.hidden_size)
    assert a.shape == (cfg.num_layers, cfg.hidden_size, 8)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
    assert not np.asarray(lora["layers"]["self_attn"]["q_proj"]["b"]).any()
    ids, mask = padded_batch(cfg.vocab_size)
    np.testing.assert_array_equal(ours(cfg, params, lora, spec, ids, mask), ours(cfg, params, None, spec, ids, mask))


def test_bad_adapter_dirs(base, tmp_path):
    _, _, cfg, _ = base
    with pytest.raises(BoosterInputError, match="adapter_config.json: missing"):
        load_peft(str(tmp_path), cfg)
    with pytest.raises(BoosterInputError, match="lora.targets"):
        init_lora(jax.random.key(0), cfg, LoraSpec(targets=("c_attn",)))
