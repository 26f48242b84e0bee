"""Hugging Face model directories -> our params, tensor by tensor, and back.

Only safetensors are read (pickle checkpoints can execute code); no remote code is run.
Files are memory-mapped and each stacked parameter family is assembled in one host buffer
and placed on its target sharding before the next is read, so a 7B model is never held
twice in host memory. (safetensors' own numpy reader cannot return bfloat16, hence the
small header parser: the format is an 8-byte length, a JSON header and raw little-endian data.)
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from booster_jax import files
from booster_jax.errors import BoosterInputError
from booster_jax.models.llama import DTYPES, LlamaConfig, init_params, make_model
from booster_jax.models.schema import param_axes

ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
             "I64": np.int64, "I32": np.int32}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def resolve_model_dir(path_or_id: str, option: str = "model.path") -> str:
    """A local directory as is; a hub id through ``huggingface_hub`` (safetensors and json files only).

    ``option``: the config key the value came from, so the error names what the user must fix.
    """
    if os.path.isdir(path_or_id):
        return path_or_id
    if os.path.exists(path_or_id):
        raise BoosterInputError(f"{option} {path_or_id!r} is a file; expected a model directory")
    if path_or_id.count("/") != 1 or path_or_id.startswith((".", "/")):
        raise BoosterInputError(f"{option} {path_or_id!r}: no such directory (and not a hub id 'org/name')")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path_or_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"])
    except Exception as e:  # network or auth problems: say what was tried
        raise BoosterInputError(f"{option} {path_or_id!r}: not a local directory, and the hub download "
                                f"failed ({type(e).__name__}: {e})") from e


def read_config_json(model_dir: str, what: str = "a Hugging Face model directory") -> tuple[str, dict]:
    """(path, contents) of ``model_dir/config.json``; a missing or broken file is named in the error."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        raise BoosterInputError(f"{path}: missing; {what} needs config.json")
    try:
        with open(path) as f:
            return path, json.load(f)
    except json.JSONDecodeError as e:
        raise BoosterInputError(f"{path}: not valid JSON ({e})") from e


def read_config(model_dir: str) -> LlamaConfig:
    path, d = read_config_json(model_dir)
    return LlamaConfig.from_hf_dict(d, source=path)


class SafetensorsIndex:
    """Where each tensor of a (possibly sharded) safetensors checkpoint lives; reads one tensor at a time."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        index_path = os.path.join(model_dir, "model.safetensors.index.json")
        single = os.path.join(model_dir, "model.safetensors")
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise BoosterInputError(f"{index_path}: expected a 'weight_map' object")
            files = sorted(set(weight_map.values()))
        elif os.path.exists(single):
            files = ["model.safetensors"]
        else:
            present = os.listdir(model_dir)
            pickles = [p for p in present if p.endswith(PICKLE_SUFFIXES)]
            if pickles:
                raise BoosterInputError(
                    f"{model_dir}: only pickle weights found ({', '.join(sorted(pickles))}); pickle files can run "
                    "arbitrary code and are refused. Convert them to safetensors first.")
            raise BoosterInputError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
        self.entries: dict[str, tuple[str, dict, int]] = {}
        for name in files:
            path = os.path.join(model_dir, name)
            if not os.path.exists(path):
                raise BoosterInputError(f"{path}: listed in the index but missing")
            header, data_start = _read_header(path)
            for tensor, info in header.items():
                if tensor != "__metadata__":
                    self.entries[tensor] = (path, info, data_start)
        self._maps: dict[str, np.memmap] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str) -> np.ndarray:
        path, info, start = self.entries[name]
        if info["dtype"] not in ST_DTYPES:
            raise BoosterInputError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        lo, hi = info["data_offsets"]
        raw = self._maps[path][start + lo:start + hi]
        return raw.view(ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def _read_header(path: str) -> tuple[dict, int]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BoosterInputError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise BoosterInputError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes, "
                                    f"file of {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BoosterInputError(f"{path}: corrupt safetensors header ({e})") from e
    data_start = 8 + n
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if data_start + end > size:
        raise BoosterInputError(f"{path}: truncated safetensors file: tensors need {data_start + end} bytes, "
                                f"the file has {size}")
    return header, data_start


HF_HEADS = ("lm_head", "score")  # HF keeps these beside the backbone ``model.*``


def hf_tensor_name(path: tuple[str, ...]) -> tuple[str, bool]:
    """Our param path -> (HF name with ``{i}`` for the layer, whether it is transposed).

    Derived from the model's schema (``models/schema.py``), whose module names are HF's: the name is
    the path under ``model.`` (the heads beside it), the layer index after ``layers``, and ``weight`` /
    ``bias`` for the leaf; HF stores a Linear's kernel transposed."""
    if param_axes(path) is None:
        raise BoosterInputError(f"parameter {'/'.join(path)}: not in the model's schema (models/schema.py)")
    *modules, leaf = path
    if modules[0] == "layers":
        modules = ["layers", "{i}", *modules[1:]]
    prefix = "" if modules[0] in HF_HEADS else "model."
    return f"{prefix}{'.'.join(modules)}.{'bias' if leaf == 'bias' else 'weight'}", leaf == "kernel"


def _keys(path) -> tuple[str, ...]:
    return tuple(k.key for k in path)


def load_params(model_dir: str, cfg: LlamaConfig, param_dtype: str = "float32",
                sharding_for: Callable[[tuple[str, ...]], jax.sharding.Sharding | None] | None = None,
                extra_shapes: dict | None = None) -> dict:
    """Read every parameter; ``sharding_for(path)`` says where each stacked family goes (None: default device).

    ``extra_shapes`` adds heads beyond the causal LM (e.g. ``{"score": {"kernel": ShapeDtypeStruct}}``).
    """
    index = SafetensorsIndex(model_dir)
    dtype = DTYPES[param_dtype]
    shapes = jax.eval_shape(lambda: init_params(make_model(cfg, param_dtype=param_dtype), jax.random.key(0)))
    if extra_shapes:
        shapes = {**shapes, **extra_shapes}
    where = os.path.join(model_dir, "model.safetensors")

    def load_leaf(path, leaf):
        keys = _keys(path)
        template, transpose = hf_tensor_name(keys)
        if keys[0] == "layers":
            buf = np.empty(leaf.shape, dtype)
            for i in range(cfg.num_layers):
                buf[i] = _fetch(index, template.format(i=i), leaf.shape[1:], transpose, where)
        else:
            buf = _fetch(index, template, leaf.shape, transpose, where).astype(dtype)
        sharding = sharding_for(keys) if sharding_for else None
        return jax.device_put(buf, sharding) if sharding is not None else jnp.asarray(buf)

    return jax.tree_util.tree_map_with_path(load_leaf, shapes)


def _fetch(index: SafetensorsIndex, name: str, shape, transpose: bool, where: str) -> np.ndarray:
    if name not in index:
        raise BoosterInputError(f"{where}: missing tensor {name}")
    t = index.get(name)
    expected = tuple(shape[::-1]) if transpose else tuple(shape)
    if tuple(t.shape) != expected:
        raise BoosterInputError(f"{index.entries[name][0]}: tensor {name} has shape {tuple(t.shape)}; "
                                f"the config expects {expected}")
    check_weight_values(t, name, index.entries[name][0])
    return t.T if transpose else t


def check_weight_values(t: np.ndarray, name: str, path: str) -> None:
    """Model weights must be floating point and finite: an integer tensor would be cast silently and a NaN
    would surface only as a NaN loss many steps later."""
    if np.issubdtype(t.dtype, np.integer):
        raise BoosterInputError(f"{path}: tensor {name} is integer-typed ({t.dtype}); model weights must be "
                                "floating point (F32, F16 or BF16)")
    finite = np.isfinite(t)
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        raise BoosterInputError(f"{path}: tensor {name} holds {bad} non-finite value(s) (NaN or inf) of "
                                f"{finite.size}; the base model's weights are damaged")


def save_params(params: dict, cfg: LlamaConfig, out_dir: str, dtype: str = "float32") -> None:
    """Write ``config.json`` and ``model.safetensors`` that transformers and our loader both read."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
    tensors = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        template, transpose = hf_tensor_name(_keys(path))
        arr = np.asarray(jnp.asarray(leaf, jnp.float32)).astype(np_dtype)
        if _keys(path)[0] == "layers":
            for i in range(arr.shape[0]):
                tensors[template.format(i=i)] = np.ascontiguousarray(arr[i].T if transpose else arr[i])
        else:
            tensors[template] = np.ascontiguousarray(arr.T if transpose else arr)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = dtype
    files.write_json_atomic(os.path.join(out_dir, "config.json"), hf, indent=2)


def load_tokenizer(model_dir: str, add_pad_token: bool = True):
    """The tokenizer through ``AutoTokenizer`` (no remote code); adds ``[PAD]`` like the official code if asked."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as e:
        raise BoosterInputError(f"{model_dir}: could not load a tokenizer ({type(e).__name__}: {e})") from e
    if tok.pad_token is None and add_pad_token:
        tok.add_special_tokens({"pad_token": "[PAD]"})
    if tok.pad_token is None:
        raise BoosterInputError(f"{model_dir}: the tokenizer has no pad token; set model.add_pad_token=true")
    return tok


def resize_embeddings(params: dict, cfg: LlamaConfig, new_vocab: int) -> tuple[dict, LlamaConfig]:
    """Grow the vocabulary to ``new_vocab``; new rows are the mean of the old (the official recipe)."""
    if new_vocab <= cfg.vocab_size:
        return params, cfg

    def grow(table, axis):
        mean = jnp.mean(table.astype(jnp.float32), axis=axis, keepdims=True).astype(table.dtype)
        reps = [1] * table.ndim
        reps[axis] = new_vocab - cfg.vocab_size
        return jnp.concatenate([table, jnp.tile(mean, reps)], axis=axis)

    params = dict(params)
    params["embed_tokens"] = {"embedding": grow(params["embed_tokens"]["embedding"], 0)}
    if "lm_head" in params:
        params["lm_head"] = {"kernel": grow(params["lm_head"]["kernel"], 1)}
    return params, cfg.replace(vocab_size=new_vocab)
