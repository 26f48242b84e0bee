"""Device meshes, sharding rules and multi-host start-up.

The mesh has three axes, ``("data", "fsdp", "tensor")`` (``MeshConfig``; -1 = the remaining
devices). Every array gets its ``PartitionSpec`` from *logical axis rules*: each parameter
dimension has a logical name (vocab, embed, heads, mlp, layers, lora_rank) and a rule maps the
name to a mesh axis:

    vocab -> tensor     embed -> fsdp      heads, mlp -> tensor     layers, lora_rank -> replicated

so the embedding ``[V, D]`` is ``P("tensor", "fsdp")``, q/k/v kernels ``[L, D, out]`` are
``P(None, "fsdp", "tensor")``, o/down kernels ``[L, in, D]`` are ``P(None, "tensor", "fsdp")``,
norms are replicated and the scanned layer axis is never sharded. A dimension that the mesh axis
size does not divide falls back to replicated on that dimension (e.g. Llama-2's 32001-row
embedding after the added ``[PAD]`` token keeps its vocab axis whole; D stays on fsdp), so any
model runs on any mesh, at worst with more memory. LoRA adapters follow the weight they adapt:
``A [L, in, r]`` shards ``in`` like the weight's input, ``B [L, r, out]`` shards ``out`` like its
output, ``r`` is replicated.

Rules are found by *key path*, not by position in a tree: the first key that names a model root
(``embed_tokens``, ``lm_head``, ``norm``, ``score``, ``layers``) starts the parameter path, whose logical
axes the model's schema declares (``models/schema.py``; this module only maps them to mesh axes). So the
optimizer state (optax states mirror the parameter tree, e.g. ``opt_state[1][0].mu["layers"]...``),
masked optax states, a method's extra state (Lisa's anchors) and ``{"params": ...}`` wrappers all
get the sharding of the parameter they belong to; anything else (step counters, scalars) is
replicated.

Batches are ``[batch, length]`` and shard their batch axis over ``("data", "fsdp")``.
``shard_batch`` pads the batch to a multiple of ``data * fsdp`` with all-zero-mask rows (the
same filler rows ``BatchStream`` already adds to a short last batch, so every method must already
ignore them; the LM losses are averaged over target tokens and do) and builds the global array
with ``jax.make_array_from_process_local_data``. ``shard_activations`` pins the batch axis of the
model's activations (layer outputs, projections, logits) so GSPMD does FSDP (all-gather each
layer's weights) rather than splitting matmuls over D with whole-batch activations on every device.

Multi-host (one process per host, ``initialize_distributed``): every process builds the same
``BatchStream`` from the same data and seed, so it yields the same *global* batch on every
process, deterministically; each process keeps only the rows its own devices hold -- rows
``[pid * B / P, (pid + 1) * B / P)`` of the padded batch for the mesh built here (devices ordered by process, the
batch axes leading) -- and ``make_array_from_process_local_data`` assembles the global array
without any host ever sending rows to another. Logs, reports and progress bars are written by
process 0 only (``is_main_process``); Orbax saves and restores are collective (every process
calls them).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from booster_jax.errors import BoosterInputError
from booster_jax.models.llama import ACTIVATION_SHARDING
from booster_jax.models.schema import ROOTS, param_axes

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical dimension name -> mesh axis (None = replicated)
LOGICAL_RULES: dict[str, str | None] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    "layers": None,
    "lora_rank": None,
}



# ------------------------------------------------------------------------------------ multi-host

def initialize_distributed(cfg=None) -> None:
    """Join a multi-process run when the environment describes one, or on TPU pods / SLURM where JAX
    detects it itself.

    Environment: ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES``,
    ``JAX_PROCESS_ID`` and optionally ``JAX_LOCAL_DEVICE_IDS`` (comma-separated) and
    ``JAX_DISTRIBUTED_TIMEOUT_S`` (initialisation timeout, default 300). On CPU the cross-process
    collectives are gloo. Start one process per host with the same command line.
    """
    if jax.distributed.is_initialized():
        return
    addr = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not addr:
        return
    try:
        n, pid = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
    except (KeyError, ValueError) as e:
        raise BoosterInputError(
            "JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers too "
            f"({type(e).__name__}: {e})") from None
    if not 0 <= pid < n:
        raise BoosterInputError(f"JAX_PROCESS_ID={pid} must be in [0, JAX_NUM_PROCESSES={n})")
    kw: dict[str, Any] = {}
    if os.environ.get("JAX_LOCAL_DEVICE_IDS"):
        kw["local_device_ids"] = [int(x) for x in os.environ["JAX_LOCAL_DEVICE_IDS"].split(",")]
    if os.environ.get("JAX_DISTRIBUTED_TIMEOUT_S"):
        kw["initialization_timeout"] = int(os.environ["JAX_DISTRIBUTED_TIMEOUT_S"])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices only; GPUs use NCCL
    jax.distributed.initialize(coordinator_address=addr, num_processes=n, process_id=pid, **kw)
    log.info("process %d of %d joined %s (%d local / %d global devices)", jax.process_index(),
             jax.process_count(), addr, jax.local_device_count(), jax.device_count())


# ------------------------------------------------------------------------------------------ mesh

def mesh_shape(mesh_cfg, n_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) for ``n_devices``; ``-1`` on any one axis takes the remaining devices."""
    sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor)]
    text = f"mesh.data={sizes[0]}, mesh.fsdp={sizes[1]}, mesh.tensor={sizes[2]}"
    if sizes.count(-1) > 1:
        raise BoosterInputError(f"{text}: at most one mesh axis may be -1 (the remaining devices)")
    if any(s == 0 or s < -1 for s in sizes):
        raise BoosterInputError(f"{text}: every mesh axis must be >= 1 or -1")
    if -1 in sizes:
        rest = math.prod(s for s in sizes if s != -1)
        if n_devices % rest:
            raise BoosterInputError(
                f"{text}: the fixed axes ({rest} devices) do not divide the {n_devices} available devices")
        sizes[sizes.index(-1)] = n_devices // rest
    if math.prod(sizes) != n_devices:
        raise BoosterInputError(
            f"{text}: the mesh has {math.prod(sizes)} devices but {n_devices} are available; the product "
            "must equal the device count (set one axis to -1 to take the rest)")
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(mesh_cfg, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``Mesh`` with axes ("data", "fsdp", "tensor") (Auto axis types: shardings propagate as in GSPMD).

    Devices are ordered by (process, id) and laid out row-major, so each process owns a contiguous
    block of the batch axes (and a tensor group never spans hosts when ``tensor`` divides the
    local device count).
    """
    devices = list(jax.devices() if devices is None else devices)
    devices.sort(key=lambda d: (d.process_index, d.id))
    shape = mesh_shape(mesh_cfg, len(devices))
    return Mesh(np.array(devices, dtype=object).reshape(shape), AXES, axis_types=(AxisType.Auto,) * 3)


def mesh_for(cfg) -> Mesh:
    """The mesh of a run ``Config`` (``cfg.mesh``) over all devices."""
    return make_mesh(cfg.mesh)


def axis_sizes(mesh: Mesh | Mapping[str, int]) -> dict[str, int]:
    return dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)


# ---------------------------------------------------------------------------------------- rules

def _names(path) -> tuple[str, ...]:
    """A jax key path as strings (dict keys, attribute names, sequence indices)."""
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return tuple(out)


def logical_axes(keys: Sequence[str], ndim: int) -> tuple[str | None, ...] | None:
    """Logical names of a parameter's dimensions from its key path; None for a leaf outside any model root
    (step counters, scalars: replicated). A path under a model root that no rule matches is an error.

    The path may carry any prefix (optimizer state, ``{"params": ...}``); the parameter path
    starts at the first model root key.
    """
    keys = tuple(keys)
    start = next((i for i, k in enumerate(keys) if k in ROOTS), None)
    if start is None:
        return None
    k = keys[start:]
    axes = param_axes(k)
    if axes is None or len(axes) != ndim:
        # a silent replica of a new parameter would only show as memory on a pod: say so now
        raise BoosterInputError(
            f"parameter {'/'.join(k)} ({ndim}-d): no sharding rule matches it; declare its logical axes in the "
            "model's schema (booster_jax/models/schema.py: PROJECTIONS for a projection, PARAM_AXES otherwise)")
    return axes


def spec_for(keys: Sequence[str], shape: Sequence[int], mesh: Mesh | Mapping[str, int],
             rules: Mapping[str, str | None] = LOGICAL_RULES) -> P:
    """The PartitionSpec of one array; a dimension the mesh axis does not divide is replicated."""
    axes = logical_axes(keys, len(shape))
    if axes is None:
        return P()
    sizes = axis_sizes(mesh)
    spec, used = [], set()
    for dim, name in zip(shape, axes):
        ax = rules.get(name) if name else None
        if ax is None or ax in used or dim % sizes.get(ax, 1):
            spec.append(None)
        else:
            spec.append(ax)
            used.add(ax)
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def tree_specs(tree, mesh: Mesh | Mapping[str, int]):
    """PartitionSpec per leaf (arrays or ShapeDtypeStructs) by the logical rules of its key path."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: spec_for(_names(path), np.shape(x), mesh), tree)


def tree_shardings(mesh: Mesh, tree):
    """NamedSharding per leaf by the logical rules of its key path (unknown leaves: replicated).

    One function for every tree: base params, the LoRA tree and a whole ``TrainState`` (every
    optimizer moment and extra tree shards like its parameter, matched by key path; scalars are
    replicated)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, spec_for(_names(path), np.shape(x), mesh)), tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """``[batch, length]`` arrays: rows over ("data", "fsdp"), length whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards(mesh: Mesh | Mapping[str, int]) -> int:
    sizes = axis_sizes(mesh)
    return math.prod(sizes.get(a, 1) for a in BATCH_AXES)


def padded_batch(rows: int, mesh: Mesh | Mapping[str, int]) -> int:
    """Rows after padding to a multiple of the batch shards."""
    n = batch_shards(mesh)
    return -(-rows // n) * n


def sharding_for_path(mesh: Mesh, cfg, extra_shapes: dict | None = None,
                      param_dtype: str = "float32") -> Callable[[tuple[str, ...]], NamedSharding]:
    """``hf.load_params(sharding_for=...)``: the sharding of each parameter family by its path.

    ``cfg``: the ``LlamaConfig`` (shapes come from ``jax.eval_shape`` of the model init, so the
    divisibility fallback sees the real sizes).
    """
    from booster_jax.models.llama import init_params, make_model

    shapes = jax.eval_shape(lambda: init_params(make_model(cfg, param_dtype=param_dtype), jax.random.key(0)))
    if extra_shapes:
        shapes = {**shapes, **extra_shapes}
    table = {_names(p): NamedSharding(mesh, spec_for(_names(p), x.shape, mesh))
             for p, x in jax.tree_util.tree_flatten_with_path(shapes)[0]}

    def sharding_for(keys: tuple[str, ...]) -> NamedSharding:
        return table.get(tuple(keys), NamedSharding(mesh, P()))

    return sharding_for


# ------------------------------------------------------------------------------------ placement

def place(tree, mesh: Mesh):
    """``tree`` on its rule shardings (a no-op for leaves already there; non-arrays are left alone)."""
    if tree is None:
        return None
    shardings = tree_shardings(mesh, tree)

    def one(x, s):
        if isinstance(x, (jax.Array, np.ndarray, np.generic)):
            return jax.device_put(x, s)
        return x

    return jax.tree.map(one, tree, shardings)


def _local_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> tuple[int, int]:
    """The contiguous row range [lo, hi) of the global batch that this process's devices hold."""
    ranges = set()
    for idx in sharding.addressable_devices_indices_map(global_shape).values():
        s = idx[0] if idx else slice(None)
        ranges.add((s.start or 0, global_shape[0] if s.stop is None else s.stop))
    ordered = sorted(ranges)
    lo, hi = ordered[0][0], max(b for _, b in ordered)
    reach = lo
    for a, b in ordered:
        if a > reach:
            break
        reach = max(reach, b)
    if reach != hi:
        raise BoosterInputError(
            f"this process's devices hold non-contiguous batch rows {sorted(ranges)}; build the mesh with "
            "parallel.make_mesh (devices ordered by process)")
    return lo, hi


def shard_batch(batch, mesh: Mesh):
    """A host batch (every process passes the same *global* batch) -> global arrays sharded over the batch axes.

    Rows are padded to a multiple of ``data * fsdp`` with zeros (all masks 0); each process hands
    only its own rows to ``jax.make_array_from_process_local_data``.
    """
    sharding = batch_sharding(mesh)
    n = batch_shards(mesh)

    def one(x):
        if isinstance(x, jax.Array) and x.sharding == sharding and x.shape[0] % n == 0:
            return x
        x = np.asarray(x)
        if x.ndim == 0:
            return jax.device_put(x, replicated(mesh))
        rows = x.shape[0]
        if rows % n:
            pad = np.zeros((padded_batch(rows, mesh) - rows,) + x.shape[1:], x.dtype)
            x = np.concatenate([x, pad])
        lo, hi = _local_rows(sharding, x.shape)
        return jax.make_array_from_process_local_data(sharding, x[lo:hi], x.shape)

    return jax.tree.map(one, batch)


def batch_placer(mesh: Mesh) -> Callable:
    """``StepProgram(place_batch=...)`` (``train.loop``): shards every stream's batch."""
    return lambda batches: shard_batch(batches, mesh)


def step_jit_kwargs(mesh: Mesh, frozen, state) -> dict:
    """``StepProgram(jit_kwargs=...)`` (``train.loop``) for ``step(frozen, state, batches, rng) -> (state, metrics)``:
    explicit in/out shardings (frozen and state by the rules, batches over the batch axes, the RNG
    key and the metrics replicated). The state's out sharding equals its in sharding, so the
    donated buffers are reused."""
    state_sh = tree_shardings(mesh, state)
    frozen_sh = None if frozen is None else tree_shardings(mesh, frozen)
    rep = replicated(mesh)
    return {"in_shardings": (frozen_sh, state_sh, batch_sharding(mesh), rep),
            "out_shardings": (state_sh, rep)}


def activation_constraint(mesh: Mesh) -> Callable:
    """``(x [B, ..., F], logical name of F) -> x`` pinned: batch over ("data", "fsdp"), F on the mesh axis of
    its rule when that divides it (feature dims whose rule is a batch axis -- embed -> fsdp -- stay whole in
    activations), the rest whole; rows the batch shards do not divide are left alone."""
    shards = batch_shards(mesh)

    def constrain(x, feature_axis, rows="batch"):
        if rows == "vocab":  # an embedding table before a lookup: vocab rows by their rule, D whole
            ax = LOGICAL_RULES["vocab"]
            spec = P(ax if ax and x.shape[0] % mesh.shape[ax] == 0 else None)
            return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
        if not hasattr(x, "ndim") or x.ndim < 2 or x.shape[0] % shards:
            return x
        last = LOGICAL_RULES.get(feature_axis) if feature_axis else None
        ok = last is not None and last not in BATCH_AXES and x.shape[-1] % mesh.shape[last] == 0
        spec = P(BATCH_AXES, *([None] * (x.ndim - 2)), last if ok else None)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return constrain


def shard_activations(step_fn: Callable, mesh: Mesh) -> Callable:
    """``step_fn`` traced with the model's activation constraints switched on (``models.llama.constrain``).

    Why: with the weights' D on fsdp, GSPMD left alone may keep the activations batch-replicated and
    split the matmuls' contracting dimension instead (partial sums + all-reduce): every device then
    holds the whole batch's activations, which defeats FSDP (measured: the MLP activations of all 16
    rows on each of 8 devices). The model pins the batch axis of every projection's output, every
    layer's output, the embedding, the norms and the logits, so XLA all-gathers each layer's weights
    instead (the FSDP pattern); projection outputs keep their heads/mlp dimension on the tensor axis.
    The constraints are written in the model at those boundaries; this only supplies the mesh.
    """
    if mesh.size == 1:
        return step_fn
    constrain = activation_constraint(mesh)

    def wrapped(*args, **kwargs):
        token = ACTIVATION_SHARDING.set(constrain)
        try:
            return step_fn(*args, **kwargs)
        finally:
            ACTIVATION_SHARDING.reset(token)

    return wrapped
