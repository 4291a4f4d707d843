"""Train deepseek-v3-tiny on the Python standard library's source, byte-level, on CPU.

    python examples/pretrain_tiny.py                 # ~300 steps, a few minutes on 2 cores
    python examples/pretrain_tiny.py --steps 50 --save-dir /tmp/run --recompute

Data goes through Megatron's own indexed dataset and GPTDataset; the model is Megatron's GPTModel
built from megatron_dsv3.layer_specs (MLA, DeepSeek-MoE with aux-loss-free balancing, MTP).
"""

import argparse
import dataclasses

import megatron_dsv3  # noqa: F401
from megatron_dsv3.training.trainer import TrainArgs, Trainer


def parse_args(argv=None) -> TrainArgs:
    defaults = TrainArgs()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    for field in dataclasses.fields(TrainArgs):
        if field.name == "config_overrides":
            continue
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", default=default)
        else:
            p.add_argument(flag, type=type(default) if default is not None else str, default=default)
    return TrainArgs(**vars(p.parse_args(argv)))


if __name__ == "__main__":
    Trainer(parse_args()).train()
