"""Megatron distributed checkpoints (megatron.core.dist_checkpointing) of our models.

Every module of ours provides `sharded_state_dict` (tensor-parallel linears, expert-parallel
experts, layers keyed by their global number), so a checkpoint saved with one (TP, PP, EP)
layout loads with another. megatron-core's writer calls torch.cuda.synchronize and
torch.cuda.current_device unconditionally; without CUDA these helpers run them on the CPU.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List

from megatron_dsv3.checkpoint.errors import describe, rank0_failure
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


def save(models: List, path: str, overwrite: bool = True) -> None:
    """Save the model chunks of every rank into the distributed checkpoint `path` (collective).

    Every rank writes into one hidden directory that rank 0 publishes as `path` only once all
    ranks are done (the commit protocol of megatron_dsv3.checkpoint.commit): an interrupted save
    never replaces the last good checkpoint."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async, state_dict_saver

    from megatron_dsv3.checkpoint.commit import atomic_directory

    publish = contextlib.ExitStack()
    box = [None, None]  # (the directory every rank writes into, rank 0's failure to make it)
    failure = None
    if dist.get_rank() == 0:
        try:
            box[0] = publish.enter_context(atomic_directory(path, overwrite))
        except Exception as error:  # a refusal of `path` (ValueError) or a file-system error
            failure, box[1] = error, describe(error)
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:  # every rank raises, none waits in a collective for rank 0
        raise failure if failure is not None else _from_rank0(box[1], path)
    saved = False
    try:
        with publish:  # rank 0 publishes at its end, or removes the partial directory
            with cuda_on_cpu(filesystem_async, state_dict_saver):
                dist_checkpointing.save(sharded_state_dict(models), box[0])
            dist.barrier()  # every rank's files are in place before rank 0 publishes
            saved = True
    except Exception as error:
        if not saved:
            raise
        failure = error  # rank 0's publication failed after every rank had written
    # every rank returns once it is published, or raises with rank 0 when it could not be
    # (a barrier here would leave the others waiting out the timeout)
    outcome = [None if failure is None else describe(failure)]
    dist.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        raise _from_rank0(outcome[0], path)


def _from_rank0(failure, path: str) -> Exception:
    """Rank 0's failure to make or publish `path`, for the other ranks to raise."""
    return rank0_failure(failure, f"save the distributed checkpoint {path}; the last published "
                                  "checkpoint is unchanged")


def load(models: List, path: str) -> None:
    """Fill this rank's model chunks from the distributed checkpoint `path` (any layout). Every
    tensor of the checkpoint must have its place in the model and the other way round: a
    checkpoint of another architecture (more layers, MTP, biases the model lacks) is refused
    (megatron-core's default left the checkpoint's extra tensors unread, silently)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from megatron_dsv3.checkpoint.commit import open_published
    from megatron_dsv3.checkpoint.convert import dist_checkpoint_dir

    step = dist_checkpoint_dir(open_published(path))
    try:
        state = dist_checkpointing.load(sharded_state_dict(models), step,
                                        strict=StrictHandling.RAISE_ALL)
    except (CheckpointingException, KeyError) as error:
        raise ValueError(f"the distributed checkpoint {step} does not fit this model: its tensors "
                         "and the model's differ (another number of layers or experts, MTP, "
                         f"router biases?): {str(error)[:600]}") from error
    state.pop("checkpoint_version", None)  # (the converter's note for Megatron-LM's loader)
    if len(models) == 1:
        models[0].load_state_dict(state)
    else:
        for i, m in enumerate(models):
            m.load_state_dict(state[f"model{i}"])
