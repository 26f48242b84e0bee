"""The LLaMA family (Llama 2/3/3.1, Qwen2/2.5, Mistral) in Flax Linen, as transformers defines it.

Why Linen: its variable collections give exactly the pure call the defenses need.
The frozen base weights live in the ``params`` collection and the adapters in
``lora``, so ``logits = model.apply({"params": p, "lora": l}, ids, mask)`` is a
pure function and ``jax.grad`` can be taken with respect to ``l`` alone, at any
(perturbed) value of it. Two more optional collections ride along the same way:
``probe`` (additive perturbations of each attention block's output, for
Vaccine) and ``cache`` (the key-value cache for generation). Layers are stacked
on a leading axis with ``nn.scan`` so a 32-layer model compiles one layer (``scan_layers=False``
unrolls the same loop: see docs/performance.md).
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from booster_jax.errors import BoosterInputError
# the parameter schema (plain data): the projections are created from PROJECTIONS
from booster_jax.models.schema import DTYPE_NAMES, PROJECTIONS

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# Set by ``parallel.shard_activations`` while a step is traced: (x, logical name of x's last axis) -> x with
# its sharding constrained (batch over the batch axes). None (the default): constraints are identities.
ACTIVATION_SHARDING: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("activation_sharding",
                                                                                    default=None)


def constrain(x, feature_axis: str | None = None, rows: str = "batch"):
    """Pin activation ``x`` [batch, ..., features]: rows over the batch axes, the last axis by its logical
    name (heads / mlp / vocab on the tensor axis; embed whole). Written at the layer boundaries inside the
    model, so renaming a module cannot drop a constraint; a no-op outside ``parallel.shard_activations``.
    ``rows="vocab"``: ``x`` is the embedding table about to be gathered from (its D is gathered first)."""
    fn = ACTIVATION_SHARDING.get()
    return x if fn is None else fn(x, feature_axis, rows)


class Embed(nn.Embed):
    """``nn.Embed`` whose lookup gathers from a table with D whole (vocab rows stay sharded): a lookup from
    the FSDP-sharded table gave a [B, T, D] with D on fsdp, which XLA could not reshard to the batch-sharded
    activation without replicating it ("Involuntary full rematerialization" on the (2, 2, 2) mesh)."""

    def __call__(self, inputs):
        return jnp.take(constrain(self.embedding.astype(self.dtype), rows="vocab"), inputs, axis=0)

DTYPES = {name: getattr(jnp, name) for name in DTYPE_NAMES}  # model.dtype / model.param_dtype

# model.remat: what the backward pass keeps of each scanned layer (jax.checkpoint policies). "none" keeps
# every activation; "full" keeps the layer's input and recomputes the layer in the backward pass;
# "dots" keeps the outputs of the matmuls without batch dimensions (the projections) and recomputes the
# rest (norms, RoPE, attention scores and softmax, SiLU).
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The architecture, read from a Hugging Face ``config.json``."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    model_type: str = "llama"

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], source: str = "config.json") -> "LlamaConfig":
        """Validate and convert a transformers config dict; errors name ``source`` and the field."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise BoosterInputError(
                f"{source}: model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
            )
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise BoosterInputError(f"{source}: missing required field(s) {missing}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise BoosterInputError(f"{source}: hidden_act {act!r} is not supported; expected 'silu'")
        heads = int(d["num_attention_heads"])
        kv_heads = int(d.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise BoosterInputError(
                f"{source}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
        head_dim = int(d.get("head_dim") or d["hidden_size"] // heads)
        rope = dict(d.get("rope_parameters") or {})
        legacy = d.get("rope_scaling") or {}
        rope = {**legacy, **rope}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise BoosterInputError(
                f"{source}: rope_type {rope_type!r} is not supported; expected one of {SUPPORTED_ROPE_TYPES}")
        theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        sliding = d.get("sliding_window") if d.get("use_sliding_window", model_type == "mistral") else None
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(d.get("attention_bias", False))
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_positions=int(rope.get("original_max_position_embeddings", 8192)),
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            sliding_window=int(sliding) if sliding else None,
            model_type=model_type,
        )

    def to_hf_dict(self) -> dict:
        """The transformers ``config.json`` fields for this architecture (used to save models)."""
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type == "linear":
            rope["factor"] = self.rope_factor
        if self.rope_type == "llama3":
            rope.update(factor=self.rope_factor, low_freq_factor=self.rope_low_freq_factor,
                        high_freq_factor=self.rope_high_freq_factor,
                        original_max_position_embeddings=self.rope_original_max_positions)
        d = {
            "model_type": self.model_type, "architectures": ["LlamaForCausalLM"],
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps, "hidden_act": "silu",
            "rope_parameters": rope, "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.qkv_bias,
            "mlp_bias": self.mlp_bias,
        }
        if self.model_type == "qwen2":
            d["architectures"] = ["Qwen2ForCausalLM"]
            d.pop("attention_bias")
        return d

    def replace(self, **kw) -> "LlamaConfig":
        return dataclasses.replace(self, **kw)


def projection_shape(cfg: LlamaConfig, proj: str) -> tuple[int, int]:
    """(in_features, out_features) of a projection of ``PROJECTIONS``."""
    size = {"embed": cfg.hidden_size, "mlp": cfg.intermediate_size}
    heads = {"q_proj": cfg.num_heads, "o_proj": cfg.num_heads}.get(proj, cfg.num_kv_heads) * cfg.head_dim
    _, i, o = PROJECTIONS[proj]
    return size.get(i, heads), size.get(o, heads)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Which projections carry adapters and how they are scaled (scaling = alpha / r, as PEFT)."""

    r: int = 32
    alpha: float = 4.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    dropout: float = 0.0

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def rope_inv_freq(cfg: LlamaConfig) -> jnp.ndarray:
    """Inverse RoPE frequencies, with transformers' linear and llama3 scaling rules."""
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
    if cfg.rope_type == "linear":
        inv = inv / cfg.rope_factor
    elif cfg.rope_type == "llama3":
        low_wavelen = cfg.rope_original_max_positions / cfg.rope_low_freq_factor
        high_wavelen = cfg.rope_original_max_positions / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wavelen, inv / cfg.rope_factor, inv)
        smooth = (cfg.rope_original_max_positions / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = jnp.where(medium, smoothed, scaled)
    return inv


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: jnp.ndarray) -> jnp.ndarray:
    """Rotate ``x`` [B, T, H, hd] by ``positions`` [B, T] (the rotate-half convention of HF)."""
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return constrain(scale.astype(self.dtype) * normed.astype(self.dtype))


class LoraDense(nn.Module):
    """A bias-optional linear layer; adds ``(x @ A) @ B * scaling`` when the ``lora`` collection has it."""

    features: int
    use_bias: bool
    dtype: Any
    param_dtype: Any
    lora_scaling: float = 1.0
    lora_dropout: float = 0.0
    deterministic: bool = True
    out_axis: str | None = None  # logical name of the output features (PROJECTIONS)

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features), self.param_dtype)
        y = jnp.dot(x, kernel.astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(self.dtype)
        if self.has_variable("lora", "a"):
            a = self.get_variable("lora", "a")
            b = self.get_variable("lora", "b")
            h = x
            if self.lora_dropout > 0 and not self.deterministic:
                h = nn.Dropout(self.lora_dropout)(h, deterministic=False)
            y = y + (jnp.dot(jnp.dot(h, a.astype(self.dtype)), b.astype(self.dtype)) * self.lora_scaling).astype(y.dtype)
        return constrain(y, self.out_axis)


class Attention(nn.Module):
    cfg: LlamaConfig
    lora: LoraSpec
    dtype: Any
    param_dtype: Any
    deterministic: bool = True

    def dense(self, name, bias):
        return LoraDense(projection_shape(self.cfg, name)[1], bias, self.dtype, self.param_dtype, self.lora.scaling,
                         self.lora.dropout, self.deterministic, PROJECTIONS[name][2], name=name)

    @nn.compact
    def __call__(self, x, positions, key_valid, cache_index, layer=None):
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.dense("q_proj", cfg.qkv_bias)(x)
        k = self.dense("k_proj", cfg.qkv_bias)(x)
        v = self.dense("v_proj", cfg.qkv_bias)(x)
        q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        inv_freq = rope_inv_freq(cfg)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)

        query_slots = jnp.arange(t)
        if self.has_variable("cache", "k"):
            # Generation: write this chunk at slot ``cache_index`` of this layer's rows of the whole stacked
            # cache [L, B, kv, S, d] (carried through the layer loop, so XLA updates it in place instead of
            # slicing it in and restacking it every step; kv before S, the layout both attention products
            # read, so no step transposes the cache), then attend over every slot of this layer.
            ck, cv = self.get_variable("cache", "k"), self.get_variable("cache", "v")
            at = (layer, 0, 0, cache_index, 0)
            ck = jax.lax.dynamic_update_slice(ck, k.transpose(0, 2, 1, 3)[None].astype(ck.dtype), at)
            cv = jax.lax.dynamic_update_slice(cv, v.transpose(0, 2, 1, 3)[None].astype(cv.dtype), at)
            self.put_variable("cache", "k", ck)
            self.put_variable("cache", "v", cv)
            k = jax.lax.dynamic_index_in_dim(ck, layer, keepdims=False)
            v = jax.lax.dynamic_index_in_dim(cv, layer, keepdims=False)
            key_spec = "bksd"
            query_slots = query_slots + cache_index
        else:
            key_spec = "bskd"
        key_slots = jnp.arange(k.shape[key_spec.index("s")])
        allowed = key_slots[None, :] <= query_slots[:, None]
        if cfg.sliding_window:
            allowed &= key_slots[None, :] > query_slots[:, None] - cfg.sliding_window
        allowed = allowed[None, None] & key_valid[:, None, None, :].astype(bool)  # [B, 1, T, S]
        if not self.has_variable("cache", "k"):
            # Packed rows: key_valid holds segment ids (1, 2, ...; 0 = padding) and a token attends within
            # its own segment; with a 0/1 mask this is the mask above (padding queries keep attending).
            seg = key_valid.astype(jnp.int32)
            same = (seg[:, :, None] == seg[:, None, :]) | (seg[:, :, None] == 0)
            allowed &= same[:, None]

        groups = cfg.num_heads // cfg.num_kv_heads
        qg = q.reshape(b, t, cfg.num_kv_heads, groups, cfg.head_dim)
        scores = jnp.einsum(f"btkgd,{key_spec}->bkgts", qg, k.astype(qg.dtype)).astype(jnp.float32)
        scores = scores / math.sqrt(cfg.head_dim)
        scores = jnp.where(allowed[:, :, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum(f"bkgts,{key_spec}->btkgd", probs, v.astype(self.dtype))
        out = out.reshape(b, t, cfg.num_heads * cfg.head_dim)
        return self.dense("o_proj", cfg.o_bias)(out)


class MLP(nn.Module):
    cfg: LlamaConfig
    lora: LoraSpec
    dtype: Any
    param_dtype: Any
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg

        def dense(name):
            return LoraDense(projection_shape(cfg, name)[1], cfg.mlp_bias, self.dtype, self.param_dtype,
                             self.lora.scaling, self.lora.dropout, self.deterministic, PROJECTIONS[name][2], name=name)

        gate = dense("gate_proj")(x)
        up = dense("up_proj")(x)
        return dense("down_proj")(jax.nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    cfg: LlamaConfig
    lora: LoraSpec
    dtype: Any
    param_dtype: Any
    deterministic: bool = True
    collect: bool = False  # also return this layer's output (RepNoise reads every layer's representation)

    @nn.compact
    def __call__(self, x, positions, key_valid, cache_index, layer=None):
        with jax.named_scope("decoder_layer"):  # a profile groups each layer's ops under one name
            cfg = self.cfg
            h = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name="input_layernorm")(x)
            attn = Attention(cfg, self.lora, self.dtype, self.param_dtype, self.deterministic, name="self_attn")(
                h, positions, key_valid, cache_index, layer)
            if self.has_variable("probe", "attn_out"):
                # Vaccine: an additive perturbation of this attention block's output (zero-valued probe -> gradient).
                attn = attn + self.get_variable("probe", "attn_out").astype(attn.dtype)
            x = x + attn
            h = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name="post_attention_layernorm")(x)
            x = constrain(x + MLP(cfg, self.lora, self.dtype, self.param_dtype, self.deterministic, name="mlp")(h))
            return x, (x if self.collect else None)


class LMHead(nn.Module):
    """Final normed hidden states -> float32 logits: the one LM head (the model, generation, RepNoise).

    Untied: its own ``kernel`` [D, V] (params path ``lm_head/kernel``). Tied: the embedding table, passed
    in as ``tied_embedding`` [V, D] (no parameter of its own)."""

    vocab_size: int
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, tied_embedding=None):
        if tied_embedding is not None:
            w = tied_embedding.T
        else:
            w = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.vocab_size), self.param_dtype)
        return constrain(jnp.dot(x.astype(self.dtype), w.astype(self.dtype)), "vocab").astype(jnp.float32)


def lm_head(model: "Llama", params: dict, hidden: jnp.ndarray) -> jnp.ndarray:
    """``model``'s LM head applied to final normed ``hidden`` [..., D] with the base ``params`` -> float32 logits.

    For callers that hold hidden states already (generation applies it to the last prompt position only,
    so prefill never builds ``[B, T, V]`` logits; RepNoise scores every layer's states)."""
    head = LMHead(model.cfg.vocab_size, model.dtype, model.param_dtype)
    if model.cfg.tie_word_embeddings:
        return head.apply({}, hidden, tied_embedding=params["embed_tokens"]["embedding"])
    return head.apply({"params": params["lm_head"]}, hidden)


class Llama(nn.Module):
    """Causal LM. ``__call__`` returns logits [B, T, V] (float32) or, with ``output="hidden"``, the final
    normed hidden states [B, T, D]; ``output="all"`` returns (logits, per-layer hidden states [L, B, T, D])."""

    cfg: LlamaConfig
    lora: LoraSpec = LoraSpec()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    deterministic: bool = True
    # False: the layer loop is fully unrolled (same parameter tree, same values): no loop-carried
    # residual buffers, a little faster for shallow models, but compile time grows with depth.
    scan_layers: bool = True
    remat: str = "none"  # REMAT_POLICIES

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, positions=None, cache_index=0, output="logits"):
        cfg = self.cfg
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
        embed = Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                         embedding_init=nn.initializers.normal(0.02), name="embed_tokens")
        x = constrain(embed(input_ids))
        if self.remat not in REMAT_POLICIES:
            raise BoosterInputError(f"model.remat {self.remat!r}: expected one of {tuple(REMAT_POLICIES)}")
        layer = DecoderLayer
        if self.remat != "none":  # inside the scan: each layer's backward recomputes what the policy drops
            layer = nn.remat(DecoderLayer, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        inputs, in_axes, carry = (x, positions, attention_mask, cache_index), (nn.broadcast,) * 3, {}
        if self.is_mutable_collection("cache"):
            # Generation: the stacked cache is a loop carry (each layer writes its own rows, told by its
            # index), not a scanned variable, which XLA would slice in and restack in full every step.
            inputs, in_axes = inputs + (jnp.arange(cfg.num_layers),), in_axes + (0,)
            carry = {"variable_carry": "cache"}
        layers = nn.scan(
            layer,
            variable_axes={"params": 0, "lora": 0, "probe": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=in_axes,
            length=cfg.num_layers,
            unroll=1 if self.scan_layers else cfg.num_layers,
            **carry,
        )(cfg, self.lora, self.dtype, self.param_dtype, self.deterministic, output == "all", name="layers")
        x, per_layer = layers(*inputs)
        x = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name="norm")(x)
        if output == "hidden":
            return x
        head = LMHead(cfg.vocab_size, self.dtype, self.param_dtype, name="lm_head")
        logits = head(x, tied_embedding=embed.embedding if cfg.tie_word_embeddings else None)
        if output == "all":
            return logits, per_layer
        return logits


def make_model(cfg: LlamaConfig, lora: LoraSpec = LoraSpec(), dtype: str = "float32",
               param_dtype: str = "float32", deterministic: bool = True, scan_layers: bool = True,
               remat: str = "none") -> Llama:
    return Llama(cfg, lora, DTYPES[dtype], DTYPES[param_dtype], deterministic, scan_layers, remat)


def variables(params, lora=None, **extra) -> dict:
    """The variable dict for ``Llama.apply``: frozen params, optional LoRA and extra collections."""
    v = {"params": params}
    if lora is not None:
        v["lora"] = lora
    for name, value in extra.items():
        if value is not None:
            v[name] = value
    return v


def init_params(model: Llama, rng: jax.Array) -> dict:
    """Random base weights (for tests, synthetic pre-training and planning with ``jax.eval_shape``)."""
    ids = jnp.zeros((1, 2), jnp.int32)
    return model.init({"params": rng}, ids)["params"]


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """An empty key-value cache collection for ``batch`` sequences of up to ``max_len`` tokens."""
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)  # [L, B, kv, S, d]
    return {"layers": {"self_attn": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}}}
