"""The allowed values of every numeric TrainArgs field, checked in one place.

`validate_train_args` is called by examples/pretrain_tiny.py right after parsing (turned into an
argparse error) and at the top of `Trainer.__init__` (for programmatic callers), so a bad value is
refused before any process group, model or dataset exists. Messages name the flag as typed on the
command line (`--clip-grad`) and the allowed values.

The layout rules that need only the args and the preset's config are here too (--ep divides the
routed experts, --pp leaves DualPipeV's 2 x --pp stages enough layers; megatron_dsv3.configs.layout
with the trainer's flag names). `validate_launch` adds what needs the launcher's environment
(WORLD_SIZE against --pp x --ep, --ranks-per-node against the expert-parallel groups) and the
run's directories; examples/pretrain_tiny.py calls both at parse time, the Trainer again.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, Mapping, Optional

from megatron_dsv3.cli import (
    NumberRange,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    seed_int,
)

# field -> allowed values; every int/float field of TrainArgs has an entry (tests check that)
RULES: Dict[str, NumberRange] = {
    "steps": positive_int,
    "seq_length": positive_int,  # and <= the model's max_position_embeddings (below)
    "micro_batch_size": positive_int,
    "micro_batches": positive_int,
    "lr": positive_float,
    "min_lr": non_negative_float,  # and <= lr (below)
    "warmup_steps": non_negative_int.with_note("0 = no warm-up"),
    "weight_decay": non_negative_float,
    "clip_grad": non_negative_float.with_note("0 = off"),
    "seed": seed_int,
    "log_interval": positive_int,
    "save_interval": non_negative_int.with_note("0 = save at the end only"),
    "keep_checkpoints": positive_int,
    "exit_interval": non_negative_int.with_note("0 = off"),
    "corpus_bytes": positive_int,
    "pp": positive_int,
    "ep": positive_int,
    "ranks_per_node": non_negative_int.with_note("0 = from the launcher"),
    "dispatch_chunks": positive_int,
    "trace_step": non_negative_int.with_note("0 = off"),
    "watchdog_timeout": non_negative_float.with_note("seconds, 0 = off"),
    "watchdog_save_timeout": non_negative_float.with_note("seconds, 0 = 3 x --watchdog-timeout"),
    "collective_timeout_minutes": non_negative_float.with_note(
        "0 = torch's default; with the watchdog on, more than its save allowance (3 x "
        "--watchdog-timeout unless --watchdog-save-timeout) in minutes"),
}


def flag_of(field: str) -> str:
    """The command-line flag of a TrainArgs field (examples/pretrain_tiny.py's spelling)."""
    return "--" + field.replace("_", "-")


def validate_launch(args, env: Optional[Mapping[str, str]] = None) -> None:
    """ValueError naming the flag for what the launcher's environment (`env`, default os.environ)
    and the file system decide: WORLD_SIZE against --pp x --ep, --ranks-per-node against the
    expert-parallel groups (consecutive blocks of --ep ranks, Megatron's default order), and
    --save-dir / --cache-dir being directories where they exist."""
    from megatron_dsv3.configs.layout import TRAINER_FLAGS, check_world_size
    from megatron_dsv3.dispatch.topology import node_layout

    env = os.environ if env is None else env
    for flag, path in (("--save-dir", args.save_dir), ("--cache-dir", args.cache_dir)):
        if path and os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"{flag} {path} is a file: allowed are a directory or a path to "
                             "create one at")
    world = int(env.get("WORLD_SIZE", "1"))
    check_world_size(world, pp=args.pp, ep=args.ep, names=TRAINER_FLAGS)
    rpn = args.ranks_per_node
    if rpn and args.ep > 1:
        def fits(n: int) -> bool:
            try:
                for first in range(0, world, args.ep):
                    node_layout(list(range(first, first + args.ep)), n)
            except ValueError:
                return False
            return True

        if not fits(rpn):
            allowed = [n for n in range(1, world + 1) if fits(n)]
            raise ValueError(f"--ranks-per-node {rpn} is invalid with --ep {args.ep} on {world} "
                             "ranks: every node must hold the same number of each expert-parallel "
                             f"group's ranks (groups of {args.ep} consecutive ranks); allowed "
                             f"values are {allowed} (or 0: the launcher's LOCAL_WORLD_SIZE)")


def validate_train_args(args) -> None:
    """ValueError naming the flag and its allowed values for the first bad TrainArgs value."""
    from megatron_dsv3.configs import PRESETS, get_config, layout
    from megatron_dsv3.liveness import TORCH_DEFAULT_TIMEOUT_MINUTES, slow_allowance
    from megatron_dsv3.world import default_backend

    # the layout rules' names: the trainer's flags (it has no --schedule: --pp > 1 is DualPipeV)
    names = dataclasses.replace(layout.FLAGS, schedule="schedule")

    for field in dataclasses.fields(args):
        rule = RULES.get(field.name)
        if rule is not None:
            rule.check(flag_of(field.name), getattr(args, field.name))
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other: allowed is one of them "
                         "(--resume continues the run in --save-dir, --overwrite starts a new one "
                         "there)")
    if args.min_lr > args.lr:
        raise ValueError(f"--min-lr {args.min_lr} is invalid: allowed values are numbers in "
                         f"[0, --lr] = [0, {args.lr}] (the schedule decays from --lr to --min-lr)")
    for flag, value in (("--save-interval", args.save_interval),
                        ("--trace-step", args.trace_step)):
        if value and not args.save_dir:  # (they write there: without it they did nothing)
            raise ValueError(f"{flag} {value} writes into --save-dir: allowed with a --save-dir "
                             "only (or 0: off)")
    if args.trace_step > args.steps:
        raise ValueError(f"--trace-step {args.trace_step} is invalid: allowed values are 0 (off) "
                         f"or a step in [1, --steps] = [1, {args.steps}]")
    for flag, value in (("--overlap-pairs", args.overlap_pairs), ("--trace-step", args.trace_step)):
        if value and args.pp < 2:
            raise ValueError(f"{flag} applies to DualPipeV runs: allowed with --pp >= 2 only "
                             f"(--pp {args.pp})")
    if args.fp8_pow2_scales and not args.fp8:
        raise ValueError("--fp8-pow2-scales applies to the FP8 recipe: allowed with --fp8 only "
                         "(without it nothing is quantised)")
    if args.dispatch_fp8 and args.ep < 2:
        raise ValueError(f"--dispatch-fp8 applies to the expert-parallel dispatch: allowed with "
                         f"--ep >= 2 only (--ep {args.ep} sends no tokens)")
    allowance = slow_allowance(args.watchdog_timeout, args.watchdog_save_timeout)
    # 0 = torch's default for the backend the trainer will use (10 min on NCCL, 30 on gloo)
    effective = args.collective_timeout_minutes or TORCH_DEFAULT_TIMEOUT_MINUTES[default_backend()]
    if args.watchdog_timeout and effective * 60 <= allowance:
        raise ValueError(
            f"--collective-timeout-minutes {args.collective_timeout_minutes} is invalid: a slow "
            f"save or first step, which the watchdog allows {allowance:.0f} s "
            "(--watchdog-save-timeout, 0 = 3 x --watchdog-timeout), would end the job as a "
            "collective timeout naming no rank (the others wait for the slowest writer in a "
            f"collective); allowed values are minutes > {allowance / 60:g}, or 0 (torch's "
            "default: 30 min on gloo; on NCCL 10 min, refused below the allowance too)")
    if args.pp > 1 and args.micro_batches < 2 * args.pp:
        raise ValueError(f"--micro-batches {args.micro_batches} is too few for DualPipeV over "
                         f"--pp {args.pp} ranks: allowed values are integers >= {2 * args.pp}")
    if args.preset not in PRESETS:
        raise ValueError(f"--preset {args.preset!r} is invalid: allowed values are "
                         f"{', '.join(sorted(PRESETS))}")
    config = get_config(args.preset, **dict(args.config_overrides))  # cheap: no model is built
    if getattr(config, "calculate_per_token_loss", False):
        # (the model then leaves its MTP and balancing losses as sums over tokens for Megatron's
        # finalize_model_grads to divide, which this trainer does not run: measured, the MTP
        # gradient came out x the step's token count)
        raise ValueError(
            "calculate_per_token_loss=True (TrainArgs.config_overrides) is refused by the "
            "trainer: its losses are each micro-batch's mean over its loss-mask tokens, and "
            "nothing here divides per-token sums (MTP, balancing) by the step's tokens; allowed: "
            "False (the default). Megatron-LM's route honours it: megatron_dsv3.pretrain_gpt "
            "with --calculate-per-token-loss")
    if args.overlap_pairs and not args.recompute:  # (--recompute's modules draw nothing)
        from megatron_dsv3.pipeline.executor import recompute_reruns_random_draws

        rerun = recompute_reruns_random_draws(config)
        if rerun:
            raise ValueError(f"--overlap-pairs is refused with {rerun} (TrainArgs.config_overrides): a "
                             "recompute in the backward thread would reset the random-number "
                             "state the forward thread draws dropout or jitter from; allowed: "
                             "no --overlap-pairs, or no dropout and jitter, or recompute_modules "
                             "without core_attn, mlp and shared_experts")
    if args.seq_length > config.max_position_embeddings:
        raise ValueError(f"--seq-length {args.seq_length} is invalid: allowed values are integers "
                         f"in [1, {config.max_position_embeddings}] (max_position_embeddings of "
                         f"{args.preset})")
    # the layout rules the Trainer's config and chunks would apply once the process groups exist
    layout.check_model_split(config, ep=args.ep, names=names)
    if args.pp > 1:
        layout.stage_layer_counts(config.num_layers, "dualpipev", args.pp,
                                  **layout.stage_split_of(config), names=names)


def check_world_timeout(args) -> None:
    """validate_train_args checks --collective-timeout-minutes against the watchdog's slow
    allowance; a process group that existed before the trainer (made by a framework or a test
    launcher) keeps its own timeout instead. Read it: at or below the allowance, a save or first
    step within the allowance would end as a collective timeout naming no rank."""
    import torch.distributed as dist

    from megatron_dsv3.liveness import group_timeout, slow_allowance

    if not args.watchdog_timeout or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    # the default group and, where they exist already (the trainer then keeps them), Megatron's
    # parallel_state groups: each keeps the timeout it was made with
    groups = [("the default process group", None)]
    try:
        from megatron.core import parallel_state

        made = getattr(parallel_state, "_global_process_group_list", None) or []
    except ImportError:
        made = []
    # (a group of this rank alone waits for nobody)
    groups += [("a process group of Megatron's parallel_state", g) for g in made
               if g is not None and g != dist.GroupMember.NON_GROUP_MEMBER
               and dist.get_world_size(g) > 1]
    allowance = slow_allowance(args.watchdog_timeout, args.watchdog_save_timeout)
    for name, group in groups:
        timeout = group_timeout(group)
        if timeout is None or timeout.total_seconds() > allowance:
            continue
        ranks = "" if group is None else f" (ranks {dist.get_process_group_ranks(group)})"
        raise ValueError(
            f"{name}{ranks} has a collective timeout of {timeout.total_seconds():g} s "
            f"(it existed before the trainer, which keeps it rather than "
            f"--collective-timeout-minutes): a slow save or first step, which the watchdog "
            f"allows {allowance:g} s (--watchdog-save-timeout, 0 = 3 x --watchdog-timeout), "
            "would end the job as a collective timeout naming no rank. Allowed: group timeouts "
            f"above {allowance:g} s, or --watchdog-timeout / --watchdog-save-timeout below it")
