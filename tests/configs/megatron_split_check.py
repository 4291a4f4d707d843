"""Megatron-LM's own parse_args + validate_args and config construction on the 671B pipeline split
(61 layers, PP16 DualPipeV, --decoder-first/last-pipeline-num-layers 1 / 4) at toy widths, then
our entry point's config: Megatron accepts the flags, refuses the split without them and refuses a
0-layer last rank, and the config's placement is the planner's. Run as:
python megatron_split_check.py <Megatron-LM checkout>; prints "ok"."""

import os
import sys

import megatron_dsv3  # noqa: F401
import megatron.core  # noqa: F401  (the installed megatron-core, not the checkout's copy)

MLM = sys.argv[1]
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, MLM)
sys.path.insert(0, os.path.join(HERE, "..", "integration"))

from tiny_args_check import TINY, parse_megatron_args  # noqa: E402

from megatron_dsv3 import plan as planner  # noqa: E402
from megatron_dsv3 import pretrain_gpt as entry  # noqa: E402
from megatron_dsv3.pipeline.placement import StageLayers  # noqa: E402

os.environ["WORLD_SIZE"] = "2048"  # Megatron-LM reads the world size from the environment
argv = [a for a in TINY]
i = argv.index("--num-layers")
argv[i + 1] = "61"
argv[argv.index("--moe-layer-freq") + 1] = "([0]*3+[1]*58)"
argv[argv.index("--global-batch-size") + 1] = "256"  # a multiple of micro-batch x DP 128
split = ["--decoder-first-pipeline-num-layers", "1", "--decoder-last-pipeline-num-layers", "4"]
layout = ["--pipeline-model-parallel-size", "16", "--expert-model-parallel-size", "16",
          "--pipeline-schedule", "dualpipev"]


def refused(extra):
    import torch.distributed as dist

    try:
        args = parse_megatron_args(argv + layout + extra, extra_args_provider=entry.add_dsv3_args)
        entry.config_from_args(args)
    except (AssertionError, ValueError) as e:
        return str(e)
    finally:
        if dist.is_initialized():
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
    return None


# without the split Megatron-LM refuses 61 layers over 16 ranks; a 0-layer last rank likewise
assert "divisible" in (refused([]) or ""), refused([])
assert "larger than 0" in (refused(split[:3] + ["0"]) or "")

entry.parse_dsv3_args(argv + layout + split, world_size=2048)
args = parse_megatron_args(argv + layout + split, extra_args_provider=entry.add_dsv3_args)
config = entry.config_from_args(args)
assert (config.num_layers_in_first_pipeline_stage,
        config.num_layers_in_last_pipeline_stage) == (1, 4)
table = StageLayers.of(config, "dualpipev", 16).table()
lay = planner.Layout(256, 8, 1, 16, 16, "dualpipev", 1, 4)
assert table == planner.placement(lay, 61), table
assert table[0] == [[1], []] and all(len(c) == 2 for r in range(1, 16) for c in table[r])
print("ok")
