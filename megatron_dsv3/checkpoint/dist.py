"""Megatron distributed checkpoints (megatron.core.dist_checkpointing) of our models.

Every module of ours provides `sharded_state_dict` (tensor-parallel linears, expert-parallel
experts, layers keyed by their global number), so a checkpoint saved with one (TP, PP, EP)
layout loads with another. megatron-core's writer calls torch.cuda.synchronize and
torch.cuda.current_device unconditionally; without CUDA these helpers run them on the CPU.
"""

from __future__ import annotations

from typing import Dict, List

from megatron_dsv3.compat import cuda_on_cpu


def sharding_metadata() -> Dict:
    from megatron.core import parallel_state

    return {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True),
            "non_homogeneous_layers": True}


def sharded_state_dict(models: List) -> Dict:
    meta = sharding_metadata()
    if len(models) == 1:
        return models[0].sharded_state_dict(metadata=meta)
    return {f"model{i}": m.sharded_state_dict(metadata=meta) for i, m in enumerate(models)}


def save(models: List, path: str) -> None:
    """Save the model chunks of every rank into the distributed checkpoint `path`."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async, state_dict_saver

    with cuda_on_cpu(filesystem_async, state_dict_saver):
        dist_checkpointing.save(sharded_state_dict(models), path)


def load(models: List, path: str) -> None:
    """Fill this rank's model chunks from the distributed checkpoint `path` (any layout)."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(sharded_state_dict(models), path)
    if len(models) == 1:
        models[0].load_state_dict(state)
    else:
        for i, m in enumerate(models):
            m.load_state_dict(state[f"model{i}"])
