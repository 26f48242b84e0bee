"""The embedded default's files: the synthetic world (built or reused) and where its committed base model lives.

The world's data files and the committed base model (``base_model/``, a few MB, for world seed 0)
are data; finding or pre-training the base model for a world is training, so it lives in
``booster_jax.train.pretrain`` (``resolve``, ``pretrain_base``), which reads what is here.
"""

from __future__ import annotations

import hashlib
import logging
import os

import jax

from booster_jax.config import Config

log = logging.getLogger(__name__)

COMMITTED_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "base_model")
DATA_FIELDS = ("alignment_file", "task_file", "task_eval_file", "eval_harmful_file")


def ensure_world(cfg: Config) -> dict[str, str]:
    """The world's files under ``cfg.world.dir``, generated when missing or built from another spec."""
    from booster_jax.data.synthetic.world import FILES, WorldSpec, build_world, read_world_spec

    spec = WorldSpec(seed=cfg.world.seed)
    root = cfg.world.dir
    manifest = os.path.join(root, FILES["world"])
    fresh = not os.path.exists(manifest)
    if not fresh and read_world_spec(root) != spec:
        log.warning("%s holds a world of another spec; rebuilding it", root)
        fresh = True
    if fresh and jax.process_index() == 0:
        log.info("building the synthetic world (seed %d) under %s", spec.seed, root)
        build_world(root, spec)
    return {key: os.path.join(root, rel) for key, rel in FILES.items()}


def world_fingerprint(paths: dict[str, str]) -> str:
    with open(paths["world"], "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def data_file_problems(cfg: Config):
    """(key, problem) for each data file the config needs but does not name, or names but is not there.
    The embedded world (model.path empty) fills the empty ones itself."""
    from booster_jax.data import formats

    for k in DATA_FIELDS + ("benign_file",):
        path = getattr(cfg.data, k)
        if path and formats._looks_local(path) and not os.path.isfile(os.path.expanduser(path)):
            yield f"data.{k}", f"no such file: {path}"
        elif not path and cfg.model.path and k not in ("task_eval_file", "benign_file"):
            yield f"data.{k}", f"model.path is set ({cfg.model.path}), so the data files must be too"


def _get(cfg, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
