"""Train deepseek-v3-tiny on the Python standard library's source, byte-level, on CPU.

    python examples/pretrain_tiny.py                 # ~300 steps, a few minutes on 2 cores
    python examples/pretrain_tiny.py --steps 50 --save-dir /tmp/run --recompute
    python examples/pretrain_tiny.py --save-dir /tmp/run --steps 100 --resume   # continue it

Data goes through Megatron's own indexed dataset and GPTDataset; the model is Megatron's GPTModel
built from megatron_dsv3.layer_specs (MLA, DeepSeek-MoE with aux-loss-free balancing, MTP).
"""

import argparse
import dataclasses

import megatron_dsv3  # noqa: F401
from megatron_dsv3.training.trainer import TrainArgs, Trainer
from megatron_dsv3.training.validation import RULES, validate_launch, validate_train_args


class _Parser(argparse.ArgumentParser):
    """A refused flag is one `error:` line (exit status 2), not the whole usage above it."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


HELP = {
    "preset": "model preset (allowed: {presets})",
    "resume": "continue the run in --save-dir from CHECKPOINT (bare --resume: its latest)",
    "overwrite": "start over in a used --save-dir (its checkpoints are kept until replaced)",
}


def parse_args(argv=None) -> TrainArgs:
    from megatron_dsv3.configs.presets import PRESETS

    defaults = TrainArgs()
    p = _Parser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    for field in dataclasses.fields(TrainArgs):
        if field.name == "config_overrides":
            continue
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        text = HELP.get(field.name, "").format(presets=", ".join(sorted(PRESETS))) or None
        if field.name == "resume":  # bare --resume: the latest checkpoint of --save-dir
            p.add_argument(flag, nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                           help=text)
        elif isinstance(default, bool):
            p.add_argument(flag, action="store_true", default=default, help=text)
        else:
            rule = RULES.get(field.name)
            p.add_argument(flag, type=type(default) if default is not None else str,
                           default=default, help=f"allowed: {rule.describe()}" if rule else text)
    args = TrainArgs(**vars(p.parse_args(argv)))
    try:  # every range and cross-flag rule, before any process group or model exists
        validate_train_args(args)
        validate_launch(args)  # WORLD_SIZE, --ranks-per-node, --save-dir / --cache-dir
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv=None) -> int:
    """Train; a refusal of the run itself (its directory already holds a run, no checkpoint to
    resume, a resume with other settings, a damaged checkpoint: ValueErrors naming what and why)
    is one `error:` line and exit status 2, not a traceback. MEGATRON_DSV3_TRACEBACK=1 shows it."""
    import os
    import sys

    args = parse_args(argv)
    try:
        Trainer(args).train()
    except ValueError as e:
        if os.environ.get("MEGATRON_DSV3_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
