"""A LLaMA GGUF file -> a plain Hugging Face safetensors directory, with numpy only (no torch).

The ``gguf`` package reads and dequantizes the tensors; llama.cpp stores q/k projections with
rows permuted for its rotary layout, which :func:`unpermute` undoes (the inverse of llama.cpp's
``convert_hf_to_gguf.py`` permutation, as transformers' GGUF loader does). The tokenizer is
rebuilt by transformers' own GGUF tokenizer converter (torch-free), so the vocabulary, merges
and chat template are exactly the file's. ``tests/test_real_model.py`` checks the result
against transformers' GGUF loader.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from booster_jax.errors import BoosterInputError

INSTALL_GGUF = "pip install gguf==0.19.0 (listed in requirements.txt)"

_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}


def _reader(path: str):
    try:
        import gguf
    except ImportError as e:
        raise BoosterInputError(f"reading {path} needs the gguf package: {INSTALL_GGUF}") from e
    if not os.path.exists(path):
        raise BoosterInputError(f"{path}: GGUF file not found")
    try:
        return gguf, gguf.GGUFReader(path)
    except Exception as e:  # a truncated or foreign file: say which
        raise BoosterInputError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); delete it so "
                                "prepare-real fetches it again") from e


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: rows (head, 2, dim/2) -> (head, dim/2, 2) order."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_config(reader, path: str) -> dict:
    """config.json of the equivalent ``LlamaForCausalLM`` from the GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise BoosterInputError(f"{path}: GGUF architecture {arch!r}; only 'llama' files are converted")
    g = lambda k: _field(reader, f"llama.{k}")  # noqa: E731
    hidden, heads = int(g("embedding_length")), int(g("attention.head_count"))
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(g("attention.head_count_kv")), "head_dim": hidden // heads,
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon")), "rope_theta": float(g("rope.freq_base")),
        "max_position_embeddings": int(g("context_length")), "vocab_size": int(g("vocab_size")),
        "tie_word_embeddings": tied, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


def state_dict(gguf, reader, config: dict) -> dict[str, np.ndarray]:
    """HF parameter name -> float32 array (dequantized, q/k rows un-permuted)."""
    out = {}
    for t in reader.tensors:
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", t.name)
        if m and m.group(2) in _LAYER:
            name = f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"
        elif t.name in _GLOBAL:
            name = _GLOBAL[t.name]
        else:
            continue  # e.g. rope_freqs: recomputed from rope_theta
        w = np.asarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims innermost first
        if name.endswith("q_proj.weight"):
            w = unpermute(w, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = unpermute(w, config["num_key_value_heads"])
        out[name] = np.ascontiguousarray(w)
    return out


def tokenizer_files(gguf_path: str) -> tuple[object, dict]:
    """(tokenizers.Tokenizer, tokenizer_config entries) from transformers' torch-free GGUF tokenizer reader."""
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    arch, tok_dict, tok_cfg = get_gguf_tokenizer(gguf_path)
    fast, extra = convert_gguf_tokenizer(arch, tok_dict)
    return fast, {**tok_cfg, **extra}


def convert(gguf_path: str, out_dir: str) -> str:
    """Write config.json, model.safetensors, tokenizer.json and tokenizer_config.json to ``out_dir``."""
    from safetensors.numpy import save_file

    gguf, reader = _reader(gguf_path)
    config = hf_config(reader, gguf_path)
    weights = state_dict(gguf, reader, config)
    fast, tok_extra = tokenizer_files(gguf_path)
    tmp = out_dir + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    fast.save(os.path.join(tmp, "tokenizer.json"))
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
               "model_max_length": config["max_position_embeddings"], **tok_extra}
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent=2)
    if os.path.exists(out_dir):
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
