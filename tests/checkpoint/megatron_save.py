"""megatron.core.dist_checkpointing.save on the CPU, for tests.

megatron-core 0.16.1's torch_dist strategy writes through FileSystemWriterAsync, which calls
torch.cuda.synchronize() unconditionally and needs psutil. This strategy keeps everything else of
Megatron's save (factories, replica de-duplication, validation, common state, metadata.json, the
MCore planner and PyT ShardedTensor translation) and writes with torch's synchronous
FileSystemWriter, so the checkpoint is laid out exactly as a training run's.

It derives from Megatron's TorchDistSaveShardedStrategy, present in every release we support:
from 0.17 dist_checkpointing.save replaces any other strategy with a fresh
TorchDistSaveShardedStrategy (and 0.19 removed strategies.base, home of the former base class
SaveShardedStrategy).
"""

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)


class SyncTorchDistSave(TorchDistSaveShardedStrategy):
    def __init__(self):
        super().__init__("torch_dist", 1)

    def save(self, sharded_state_dict, checkpoint_dir):
        import torch.distributed.checkpoint as dcp

        state, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
        dcp.save(mcore_to_pyt_state_dict(state, False),
                 storage_writer=dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1),
                 planner=MCoreSavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False))


def megatron_save(model, directory):
    """dist_checkpointing.save(model.sharded_state_dict(), directory) — collective over ranks."""
    dist_checkpointing.save(model.sharded_state_dict(metadata={}), str(directory),
                            sharded_strategy=SyncTorchDistSave())
