"""The contract between training methods and the loop.

A method is a pure step ``step(frozen, state, batches, rng) -> (state, metrics)`` built by
``make_step(ctx)``; the loop jits it and feeds it the batch streams the method names, and
never knows which method it runs. Adding a defense is one module that calls ``register``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from booster_jax.models.llama import Llama, lm_head, variables


class TrainState(NamedTuple):
    """Everything a step changes. ``extra`` holds a method's own state (e.g. Lisa's anchor weights)."""

    trainable: Any
    opt_state: Any
    step: jax.Array
    extra: Any = ()


@dataclasses.dataclass(frozen=True)
class Forward:
    """The model call with trainable and frozen weights kept apart, so gradients see the trainable tree only.

    ``trainable_is_lora``: LoRA training (frozen = base params); otherwise full-parameter training
    (trainable = base params, no adapters), as the synthetic world's pre-training stage uses.
    """

    model: Llama
    trainable_is_lora: bool = True

    def __call__(self, trainable, frozen, batch, output: str = "logits", rng=None, **collections):
        """``rng``: the dropout key, needed only when the model is built with ``deterministic=False``."""
        params, lora = (frozen, trainable) if self.trainable_is_lora else (trainable, None)
        return self.model.apply(variables(params, lora, **collections), batch["input_ids"],
                                batch["attention_mask"], positions=batch.get("positions"), output=output,
                                rngs=None if rng is None else {"dropout": rng})

    def loss(self, trainable, frozen, batch, rng=None, **collections) -> jax.Array:
        """The batch's LM loss (``lm_loss``); with ``target_index`` in the batch (``collate`` adds it) the LM
        head runs only at the target positions (``target_lm_loss``): the same value, less work."""
        if "target_index" not in batch:
            return lm_loss(self(trainable, frozen, batch, rng=rng, **collections), batch)
        hidden = self(trainable, frozen, batch, output="hidden", rng=rng, **collections)
        return target_lm_loss(self.model, frozen if self.trainable_is_lora else trainable, hidden, batch)


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``-log softmax(logits)[target]`` per position, as ``logsumexp - target logit``.

    The target logit is picked with an iota comparison rather than ``take_along_axis``, whose
    gradient is a scatter-add into a [B, T, V] buffer: on CPU that scatter made the loss's backward
    cost ~2.5x this form at a 49k vocabulary (docs/performance.md); here forward and backward are
    fusible elementwise passes and reductions, with the same values.
    """
    logits = logits.astype(jnp.float32)
    hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == targets[..., None]
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)


def lm_loss(logits: jax.Array, batch: dict) -> jax.Array:
    """Token-mean next-token cross-entropy over target tokens (``loss_mask``), like HF's causal-LM loss."""
    weights = batch["loss_mask"][:, 1:].astype(jnp.float32)
    nll = token_nll(logits[:, :-1], batch["input_ids"][:, 1:])
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def target_lm_loss(model: Llama, params, hidden: jax.Array, batch: dict) -> jax.Array:
    """``lm_loss`` from the final hidden states, with the LM head applied only where a loss is taken.

    ``batch["target_index"]`` [B, K] lists, per row, the positions t whose next token is a target
    (``loss_mask[t + 1] == 1``), padded with T - 1, which never is (``data.batches.target_index``).
    The head (D x V: a fifth of SmolLM2's forward) and the cross-entropy then run on K positions per row
    instead of T. Each target's logits, and so every gradient, are the ones the full head gives; the
    denominator is the same exact token count.
    """
    ids, mask = batch["input_ids"], batch["loss_mask"].astype(jnp.float32)
    index = batch["target_index"]
    next_ids = jnp.concatenate([ids[:, 1:], ids[:, :1]], axis=1)  # the token position t predicts
    next_w = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)  # T - 1 predicts nothing
    picked = jnp.take_along_axis(hidden, index[..., None], axis=1)  # [B, K, D]
    nll = token_nll(lm_head(model, params, picked), jnp.take_along_axis(next_ids, index, axis=1))
    weights = jnp.take_along_axis(next_w, index, axis=1)
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(mask[:, 1:]), 1.0)


def model_loss(forward, trainable, frozen, batch, **kw) -> jax.Array:
    """The batch's LM loss through ``forward``: ``Forward.loss`` (the head at the target positions only), or
    ``lm_loss`` of the logits for any other callable with ``Forward``'s signature (a wrapped or instrumented
    forward, as tests and plugins write them)."""
    loss = getattr(forward, "loss", None)
    if loss is None:
        return lm_loss(forward(trainable, frozen, batch, **kw), batch)
    return loss(trainable, frozen, batch, **kw)


_JITTED_LOSSES: dict = {}


def jitted_loss(forward, summed: bool = False):
    """``jax.jit`` of ``model_loss`` (times the batch's target count when ``summed``), built once per model:
    callers that evaluate a loss outside a step (held-out losses, the attack's Fig. 3 tracking, every stage
    of a run) reuse one compiled program per shape instead of tracing a new closure each time. Weights are
    arguments, never baked-in constants. An unhashable ``forward`` gets a fresh function, uncached."""

    def build():
        if summed:
            return jax.jit(lambda w, params, b: model_loss(forward, w, params, b) * jnp.sum(b["loss_mask"][:, 1:]))
        return jax.jit(lambda w, params, b: model_loss(forward, w, params, b))

    try:
        key = (forward, summed)
        hash(key)
    except TypeError:
        return build()
    if key not in _JITTED_LOSSES:
        _JITTED_LOSSES[key] = build()
    return _JITTED_LOSSES[key]


def global_norm(tree) -> jax.Array:
    """One L2 norm over every leaf of the tree (``optax.global_norm`` is deprecated)."""
    return optax.tree.norm(tree)


def make_optimizer(optim_cfg, total_steps: int = 0, decay_mask=None) -> optax.GradientTransformation:
    """AdamW with HF Trainer semantics: global-norm clipping first, decoupled weight decay, schedule.

    ``decay_mask``: pytree of bools (HF excludes biases and norm weights from decay in full training).
    ``optim_cfg.accumulate_steps`` k > 1: ``optax.MultiSteps`` averages k micro-batch gradients and then
    clips and steps once, as HF's gradient accumulation does (the schedule counts optimizer steps). A
    method's step runs whole per micro-batch: Booster perturbs per micro-batch, as the official trainer.
    """
    k = int(getattr(optim_cfg, "accumulate_steps", 1) or 1)
    if k > 1:
        inner = make_optimizer(dataclasses.replace(optim_cfg, accumulate_steps=1), max(total_steps // k, 1),
                               decay_mask)
        return optax.MultiSteps(inner, every_k_schedule=k)
    if optim_cfg.schedule == "constant":
        lr = optax.constant_schedule(optim_cfg.lr)
    elif optim_cfg.schedule == "linear":
        lr = optax.linear_schedule(optim_cfg.lr, 0.0, max(total_steps - optim_cfg.warmup_steps, 1))
    else:
        lr = optax.cosine_decay_schedule(optim_cfg.lr, max(total_steps - optim_cfg.warmup_steps, 1))
    if optim_cfg.warmup_steps:
        lr = optax.join_schedules([optax.linear_schedule(0.0, optim_cfg.lr, optim_cfg.warmup_steps), lr],
                                  [optim_cfg.warmup_steps])
    parts = []
    if optim_cfg.max_grad_norm:
        parts.append(optax.clip_by_global_norm(optim_cfg.max_grad_norm))
    parts.append(optax.adamw(lr, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                             weight_decay=optim_cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)


def apply_gradients(state: TrainState, grads, optimizer: optax.GradientTransformation) -> TrainState:
    """One optimizer step on ``grads``: new weights and optimizer state, step count + 1."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    return state._replace(trainable=optax.apply_updates(state.trainable, updates), opt_state=opt_state,
                          step=state.step + 1)


def init_state(trainable, optimizer: optax.GradientTransformation, extra=()) -> TrainState:
    """A stage's first state: the weights, the optimizer's fresh state, step 0 and the method's ``extra``."""
    return TrainState(trainable, optimizer.init(trainable), jnp.zeros((), jnp.int32), extra)


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What a method's ``make_step`` gets: the forward call, the optimizer and its own config section."""

    forward: Forward
    optimizer: optax.GradientTransformation
    cfg: Any = None
    total_steps: int = 0  # the stage's length (Lisa's proximal warm-up is a fraction of it)


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A method and everything the rest of the code asks about it, so nothing outside ``methods/``
    tests a method's name (the stages, the planner and the benchmarks read these fields)."""

    name: str
    stage: str  # "align" or "finetune"
    streams: tuple[str, ...]  # batch streams the step reads, e.g. ("align", "harmful")
    make_step: Callable[[StepContext], Callable]
    # the stage-config section(s) passed as ctx.cfg: "booster" -> cfg.align.booster; a tuple of names ->
    # one object with an attribute per section (Booster + Vaccine reads .booster and .vaccine)
    config_section: str | tuple[str, ...] = ""
    init_extra: Callable | None = None  # (trainable, frozen, cfg section) -> extra state (e.g. Lisa anchors)
    passes: int = 1  # forward-backward passes per step (the planner's activation count)
    scanned_passes: bool = False  # the passes are iterations of one lax.scan: one pass's activations live
    gradient_trees: int = 2  # trainable-sized trees alive at the step's peak (SFT: g and the update)
    continues_lora: bool = False  # alignment method whose LoRA the attack keeps training (continue_alignment_lora=auto)
    sft_warm_start: bool = True  # align.warmup_sft_steps applies (false for SFT itself)
    # a method from outside the package declares its own section: the frozen dataclass read from
    # {stage}.{config_section} (fields from booster_jax.config.setting, checked like every section)
    config_class: type | None = None
    # the file whose content is part of the method's stage fingerprints: set by ``register`` for a method
    # defined outside the package (editing it reruns its stages); "" = built in (the code version covers it)
    source: str = ""


def _label(spec: MethodSpec) -> str:
    """How an error names a method: its stage, its name and, for a plugin, its file."""
    return f"{spec.stage} method {spec.name!r}" + (f" ({spec.source})" if spec.source else "")


def build_extra(spec: MethodSpec, trainable, frozen, section) -> Any:
    """The method's own first state (``spec.init_extra``; () without one), checked to be arrays or numbers
    only: it is a jitted argument of every step and part of every checkpoint."""
    if spec.init_extra is None:
        return ()
    extra = spec.init_extra(trainable, frozen, section)
    for path, leaf in jax.tree_util.tree_flatten_with_path(extra)[0]:
        if not (isinstance(leaf, (int, float)) or hasattr(leaf, "dtype")):  # arrays, tracers, shape structs
            from booster_jax.errors import BoosterInputError

            raise BoosterInputError(
                f"{_label(spec)}: init_extra returned state.extra{jax.tree_util.keystr(path)} = {leaf!r:.60} (a "
                f"{type(leaf).__name__}); the extra state holds arrays and numbers only (it is jitted and "
                "checkpointed): keep settings in the config section (ctx.cfg)")
    return extra


def build_step(spec: MethodSpec, ctx: StepContext) -> Callable:
    """``spec.make_step(ctx)``, wrapped so a step that breaks the contract says how when it is traced.

    The checks run in Python while ``jax.jit`` traces the step (once per compile, nothing per step), so a
    plugin's mistake ends in one line naming its method and file instead of a traceback from inside JAX:
    a stream read but not declared in ``streams``, a return value other than ``(state, metrics)``, a state
    of another structure, shape or dtype than the one it got, a metric that is not one scalar.
    """
    step = spec.make_step(ctx)
    where = _label(spec)

    @functools.wraps(step)
    def checked(frozen, state, batches, rng):
        try:
            out = step(frozen, state, batches, rng)
        except KeyError as e:
            key = e.args[0] if len(e.args) == 1 else None
            if isinstance(key, str) and key not in batches and key in STAGE_STREAMS[spec.stage]:
                from booster_jax.errors import BoosterInputError

                raise BoosterInputError(
                    f"{where}: its step reads batches[{key!r}], but its MethodSpec declares streams "
                    f"{tuple(spec.streams)}; add {key!r} to streams (docs/extending.md, The streams)") from None
            raise
        _check_step_output(where, state, out)
        return out

    return checked


def _leaf_specs(tree) -> tuple[Any, list]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return treedef, [(jax.tree_util.keystr(path), jnp.shape(x), jnp.result_type(x)) for path, x in leaves]


def _check_step_output(where: str, state: TrainState, out) -> None:
    """``build_step``'s check of what one traced step returned (see there)."""
    from booster_jax.errors import BoosterInputError

    usage = ("expected (new state, {metric name: scalar}): "
             "return bj.apply_gradients(state, grads, ctx.optimizer), metrics")
    if isinstance(out, TrainState) or not (isinstance(out, tuple) and len(out) == 2):
        got = "a TrainState alone" if isinstance(out, TrainState) else (
            f"a tuple of {len(out)}" if isinstance(out, tuple) else type(out).__name__)
        raise BoosterInputError(f"{where}: its step returned {got}; {usage}")
    new_state, metrics = out
    if not isinstance(new_state, TrainState):
        raise BoosterInputError(f"{where}: its step returned {type(new_state).__name__} as the new state; {usage}")
    for field in TrainState._fields:
        (old_def, old), (new_def, new) = _leaf_specs(getattr(state, field)), _leaf_specs(getattr(new_state, field))
        if old_def != new_def:
            raise BoosterInputError(f"{where}: the state its step returned has another tree in state.{field} than "
                                    f"the state it received ({new_def} instead of {old_def}); a step changes "
                                    "values, never the state's structure")
        for (path, shape, dtype), (_, new_shape, new_dtype) in zip(old, new):
            if (shape, dtype) != (new_shape, new_dtype):
                raise BoosterInputError(f"{where}: its step returned state.{field}{path} as "
                                        f"{new_dtype}{list(new_shape)}, but received it as {dtype}{list(shape)}; "
                                        "a step keeps every shape and dtype")
    if not isinstance(metrics, Mapping):
        raise BoosterInputError(f"{where}: its step returned {type(metrics).__name__} as the metrics; {usage}")
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise BoosterInputError(f"{where}: metric name {name!r} is not a string")
        if not (isinstance(value, (int, float)) or hasattr(value, "shape")) or jnp.shape(value) != ():
            what = f"shape {list(jnp.shape(value))}" if hasattr(value, "shape") else f"a {type(value).__name__}"
            raise BoosterInputError(f"{where}: metric {name!r} is {what}; every metric must be one scalar "
                                    "(a tree's size: bj.global_norm(tree))")


def method_config(spec: MethodSpec, stage_cfg) -> Any:
    """What ``spec`` reads of a stage's config (``AlignConfig``/``FinetuneConfig``) as ``ctx.cfg``; None if nothing."""
    sec = spec.config_section
    if not sec:
        return None
    if isinstance(sec, str):
        if spec.config_class is not None and not hasattr(stage_cfg, sec):
            return spec.config_class()  # a Config built before the plugin registered: its defaults
        return getattr(stage_cfg, sec)
    import types

    return types.SimpleNamespace(**{name: getattr(stage_cfg, name) for name in sec})


STAGES = ("align", "finetune")
# the batch streams a stage can feed a method's step (train.stages builds them; docs/extending.md, The streams)
STAGE_STREAMS = {"align": ("align", "harmful"), "finetune": ("task", "align")}

# Keyed by (stage, name): "sft" is both an alignment method and the fine-tuning attack.
METHODS: dict[tuple[str, str], MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Make ``spec`` a method every stage, config and listing knows; returns it (with ``source`` filled in).

    A method defined outside the package (a plugin file, a notebook's module) records its source file and
    may declare its own config section. A name already registered from another file is an error, as is
    a bad section; the same file registering again (edited and imported anew) replaces its method.
    """
    import sys

    from booster_jax import config
    from booster_jax.errors import BoosterInputError

    if spec.stage not in STAGES:
        raise BoosterInputError(f"MethodSpec {spec.name!r}: stage {spec.stage!r}; expected one of {STAGES}")
    known = STAGE_STREAMS[spec.stage]
    if (isinstance(spec.streams, str) or not isinstance(spec.streams, (tuple, list)) or not spec.streams
            or not all(s in known for s in spec.streams) or len(set(spec.streams)) != len(spec.streams)):
        hint = f" (a string: write ({spec.streams!r},))" if isinstance(spec.streams, str) else ""
        raise BoosterInputError(f"MethodSpec {spec.name!r}: streams {spec.streams!r}{hint}; expected a tuple of "
                                f"distinct stream names from {known} (an {spec.stage} stage's streams)")
    if not callable(spec.make_step):
        raise BoosterInputError(f"MethodSpec {spec.name!r}: make_step must be a function make_step(ctx) -> step, "
                                f"got {spec.make_step!r}")
    source = spec.source or _outside_package(sys._getframe(1).f_code.co_filename)  # the file calling register
    spec = dataclasses.replace(spec, source=source)
    old = METHODS.get((spec.stage, spec.name))
    if old is not None and old.source != spec.source:
        raise BoosterInputError(f"{spec.stage} method {spec.name!r} is registered already by "
                                f"{old.source or 'booster-jax (built in)'}; choose another name")
    if spec.config_class is not None and not isinstance(spec.config_section, str):
        raise BoosterInputError(f"method {spec.name!r}: config_class needs one config_section name, got "
                                f"{spec.config_section!r}")
    if source:  # built-in names and sections are part of the static schema (source "": built in)
        config.add_method(spec.stage, spec.name, spec.config_section if spec.config_class else "",
                          spec.config_class, replace=old is not None, source=source)
    METHODS[(spec.stage, spec.name)] = spec
    return spec


def _outside_package(filename: str) -> str:
    """"" for a file inside the package (a built-in method), else the file's real path (a notebook cell's
    pseudo-file name, e.g. ``<ipython-input-3-...>``, stays as it is)."""
    import os

    if not os.path.isfile(filename):
        return filename or "<unknown>"
    path = os.path.realpath(filename)
    package = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    return "" if path.startswith(package + os.sep) else path


def get_method(name: str, stage: str) -> MethodSpec:
    """The method registered as ``name`` for ``stage`` ("align" or "finetune").

    The built-in methods are registered already: importing this module runs ``booster_jax/methods/__init__``
    first, which imports them (importing the package here again was a circle in the import graph)."""
    from booster_jax.errors import BoosterInputError

    if stage not in STAGES:
        raise BoosterInputError(f"unknown stage {stage!r}; expected one of {STAGES}")
    if (stage, name) not in METHODS:
        known = sorted(n for st, n in METHODS if st == stage)
        raise BoosterInputError(f"unknown {stage} method {name!r}; registered for {stage}: {known}")
    return METHODS[(stage, name)]
