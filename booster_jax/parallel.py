"""Device meshes, sharding rules and multi-host start-up."""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def initialize_distributed(cfg=None) -> None:
    """Join a multi-process run when the environment describes one (JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID), or on TPU pods / SLURM where JAX detects it itself."""
    if jax.distributed.is_initialized():
        return
    addr = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if addr:
        jax.distributed.initialize(coordinator_address=addr,
                                   num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]))
        log.info("process %d of %d joined %s", jax.process_index(), jax.process_count(), addr)
