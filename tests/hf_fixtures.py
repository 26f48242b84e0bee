"""Tiny random transformers checkpoints, built locally (no hub), shared by the reference tests."""

from __future__ import annotations

import torch

TINY = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=512)

VARIANTS = {
    # Llama 2 style: grouped-query attention, untied embeddings.
    "llama_gqa": dict(model_type="llama", tie_word_embeddings=False),
    # Llama 3.1 style: llama3 rope scaling (a band of frequencies in the smoothed regime), tied embeddings.
    "llama31_tied": dict(model_type="llama", tie_word_embeddings=True,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 256},
                         max_position_embeddings=2048),
    # Qwen2: bias on q, k, v.
    "qwen2_bias": dict(model_type="qwen2", tie_word_embeddings=False,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    # Linear rope scaling, through a llama config.
    "llama_linear_rope": dict(model_type="llama", rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                                   "factor": 2.0}),
    # Mistral: a sliding window shorter than the batch's sequences, so the window really masks.
    "mistral_window": dict(model_type="mistral", sliding_window=4, head_dim=8),
}


def build_hf_model(variant: str, seed: int = 0):
    """A random causal LM whose norms and biases are randomised too (all-ones norms hide bugs)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    spec = {**TINY, **VARIANTS[variant]}
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, **spec)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def padded_batch(vocab: int, lengths=(9, 5, 12, 1), seed: int = 0):
    """Right-padded ids and mask of mixed lengths."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), t), generator=g)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids * mask  # padding id 0
    return ids, mask


def peft_reference(tmp_path_factory):
    """A saved base model, our params for it, and a PEFT LoRA (r 8 on q, k, v, PEFT's own init) loaded
    into our tree: the shared starting point of the step-parity tests."""
    import copy
    import types

    from peft import LoraConfig, get_peft_model

    from booster_jax.methods.base import Forward
    from booster_jax.models import hf
    from booster_jax.models.llama import make_model
    from booster_jax.models.lora import load_peft

    model = build_hf_model("llama_gqa")
    base_dir = tmp_path_factory.mktemp("base")
    model.save_pretrained(base_dir)
    cfg = hf.read_config(str(base_dir))
    params = hf.load_params(str(base_dir), cfg)
    torch.manual_seed(7)
    conf = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"], lora_dropout=0.0,
                      task_type="CAUSAL_LM")
    peft_model = get_peft_model(copy.deepcopy(model), conf)
    lora_dir = tmp_path_factory.mktemp("lora")
    peft_model.save_pretrained(lora_dir)
    lora, spec = load_peft(str(lora_dir), cfg)
    return types.SimpleNamespace(cfg=cfg, params=params, peft_model=peft_model, lora=lora, spec=spec,
                                 forward=Forward(make_model(cfg, spec)), vocab=cfg.vocab_size)
