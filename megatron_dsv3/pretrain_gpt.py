"""`python -m megatron_dsv3.pretrain_gpt <Megatron-LM arguments>`: Megatron-LM's own `pretrain()`
with DeepSeek-V3's model, schedule, FP8 recipe and dispatcher, without editing Megatron-LM's files.

Megatron-LM's `megatron.training` and its top-level `pretrain_gpt.py` must be importable: put the
checkout on PYTHONPATH or name it with MEGATRON_LM_PATH (added to sys.path). What comes from
Megatron-LM unchanged: argument parsing, initialisation, data (`train_valid_test_datasets_provider`,
mock data included), `forward_step`/loss, optimizer, checkpointing, logging, the training loop.
What is ours:

- extra arguments, registered through `pretrain(extra_args_provider=...)` and validated before
  Megatron starts (errors name the flag and its allowed values):
  `--pipeline-schedule {1f1b,interleaved,no_pipelining,dualpipe,dualpipev}` (default: Megatron's
  choice; registered only when Megatron does not already define it, i.e. without patches/),
  `--dsv3-fp8-recipe {deepseek,deepseek-pow2}`, `--dsv3-dispatcher {node-aware,flat,local}`,
  `--dsv3-dispatch-chunks N`, `--dsv3-dispatch-fp8`, `--ranks-per-node N`
  (sets MEGATRON_DSV3_RANKS_PER_NODE for the node-aware dispatcher's topology). They land on
  DeepSeekV3Config (dsv3_fp8_recipe, dsv3_dispatch_chunks, dsv3_dispatch_fp8, dsv3_dispatcher,
  which `layer_specs.make_dispatcher` reads: node-aware or flat with expert parallelism,
  local without);
- `model_provider`: DeepSeekV3Model (our layer spec and MTP) from a DeepSeekV3Config made by
  Megatron's `core_transformer_config_from_args`; for dualpipe/dualpipev it returns this rank's two
  V-placed chunks (`model_chunks.build_model_chunks`) as Megatron's model list;
- the schedule: `pipeline.use_in_megatron_training(name)` points the training loop's
  `get_forward_backward_func` at the named schedule.

Where it works: argument parsing, validation and the model provider are tested through Megatron-LM
core_v0.16.1 on CPU (tests/integration/test_pretrain_entry.py). A full `pretrain()` run needs what
stock Megatron-LM needs (CUDA + NCCL: its initialisation and training loop call torch.cuda). The
DualPipe chunks need pipeline size >= 2. Megatron-LM main's training code needs Python >= 3.12.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import List, Optional

from megatron_dsv3.cli import non_negative_int, positive_int

SCHEDULES = ("1f1b", "interleaved", "no_pipelining", "dualpipe", "dualpipev")
FP8_RECIPES = ("deepseek", "deepseek-pow2")
DISPATCHERS = ("node-aware", "flat", "local")


# (flag, args attribute, allowed values) of every numeric flag we register or read; None = unset
NUMERIC_FLAGS = (
    ("--dsv3-dispatch-chunks", "dsv3_dispatch_chunks", positive_int),
    ("--ranks-per-node", "ranks_per_node", positive_int),
    ("--pipeline-model-parallel-size", "pipeline_model_parallel_size", positive_int),
    ("--virtual-pipeline-model-parallel-size", "virtual_pipeline_model_parallel_size",
     positive_int),
    ("--num-layers-per-virtual-pipeline-stage", "num_layers_per_virtual_pipeline_stage",
     positive_int),
    ("--mtp-num-layers", "mtp_num_layers", non_negative_int.with_note("0 = none")),
)


def add_dsv3_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron's `extra_args_provider`: registers our flags on Megatron's (or any) parser."""
    group = parser.add_argument_group(title="megatron-dsv3")
    if "--pipeline-schedule" not in parser._option_string_actions:  # patches/ register it too
        group.add_argument("--pipeline-schedule", choices=SCHEDULES, default=None,
                           help="pipeline schedule by name (default: Megatron's choice)")
    group.add_argument("--dsv3-fp8-recipe", choices=FP8_RECIPES, default=None,
                       help="DeepSeek fine-grained FP8 (1x128 / 128x128 scaling)")
    group.add_argument("--dsv3-dispatcher", choices=DISPATCHERS, default="node-aware",
                       help="expert dispatcher (default: node-aware)")
    group.add_argument("--dsv3-dispatch-chunks", type=positive_int, default=2,
                       help="chunks the node-aware dispatch is pipelined over (>= 1)")
    group.add_argument("--dsv3-dispatch-fp8", action="store_true",
                       help="FP8 payload for the expert all-to-all")
    group.add_argument("--ranks-per-node", type=positive_int, default=None,
                       help="ranks per node for the node-aware dispatcher, >= 1 "
                       "(default: LOCAL_WORLD_SIZE)")
    return parser


def validate_dsv3_args(args) -> None:
    """Ranges and checks across flags; raises ValueError naming the flag and what is allowed."""
    from megatron_dsv3.configs import layout as layout_rules

    for flag, dest, allowed in NUMERIC_FLAGS:  # also for values that did not come through argparse
        if getattr(args, dest, None) is not None:
            allowed.check(flag, getattr(args, dest))
    schedule = getattr(args, "pipeline_schedule", None)
    pp = getattr(args, "pipeline_model_parallel_size", None)
    pp = 1 if pp is None else pp
    vp = getattr(args, "virtual_pipeline_model_parallel_size", None)
    # the layout rules the planner, the converter and the trainer apply (configs/layout.py)
    if schedule is not None:
        if schedule in layout_rules.DUALPIPE_SCHEDULES and getattr(
                args, "num_layers_per_virtual_pipeline_stage", None):
            raise ValueError(f"--pipeline-schedule {schedule} places its two chunks per rank "
                             "itself: --num-layers-per-virtual-pipeline-stage must not be set")
        layout_rules.check_schedule(schedule, pp, mtp=getattr(args, "mtp_num_layers", None),
                                    vpp=vp, names=layout_rules.MEGATRON_FLAGS, allowed=SCHEDULES)
    num_layers = getattr(args, "num_layers", None)
    if schedule in layout_rules.DUALPIPE_SCHEDULES and num_layers:
        # Megatron checks its own schedules' split; ours places the chunks itself
        # (model_chunks.build_model_chunks)
        layout_rules.stage_layer_counts(
            num_layers, schedule, pp, getattr(args, "decoder_first_pipeline_num_layers", None),
            getattr(args, "decoder_last_pipeline_num_layers", None),
            names=layout_rules.MEGATRON_FLAGS)
    world = getattr(args, "world_size", None)
    if world is not None:
        tp = getattr(args, "tensor_model_parallel_size", None) or 1
        ep = getattr(args, "expert_model_parallel_size", None) or 1
        layout_rules.check_world_size(world, tp, pp, ep, names=layout_rules.MEGATRON_FLAGS)
    if getattr(args, "dsv3_dispatch_fp8", False) and getattr(args, "dsv3_dispatcher", None) == "local":
        raise ValueError("--dsv3-dispatch-fp8 needs --dsv3-dispatcher node-aware or flat "
                         "(the local dispatcher sends nothing)")


def parse_dsv3_args(argv: List[str], world_size: Optional[int] = None):
    """Our flags (and the Megatron flags they depend on) from a command line, validated: used
    before Megatron starts so mistakes fail at once with our messages. `world_size` (torchrun's
    WORLD_SIZE), when given, is checked against the TP x PP x EP flags."""
    parser = argparse.ArgumentParser(prog="megatron_dsv3.pretrain_gpt", add_help=False,
                                     allow_abbrev=False)
    add_dsv3_args(parser)
    types = {flag: allowed for flag, _, allowed in NUMERIC_FLAGS}
    parser.add_argument("--pipeline-model-parallel-size",
                        type=types["--pipeline-model-parallel-size"], default=1)
    for flag in ("--virtual-pipeline-model-parallel-size",
                 "--num-layers-per-virtual-pipeline-stage", "--mtp-num-layers"):
        parser.add_argument(flag, type=types[flag], default=None)
    for flag in ("--tensor-model-parallel-size", "--expert-model-parallel-size", "--num-layers",
                 "--decoder-first-pipeline-num-layers", "--decoder-last-pipeline-num-layers"):
        parser.add_argument(flag, type=positive_int, default=None)
    args, _ = parser.parse_known_args(argv)
    args.world_size = world_size
    try:
        validate_dsv3_args(args)
    except ValueError as e:
        parser.error(str(e))
    return args


def apply_dsv3_args(args) -> None:
    """Process-wide effects of our flags: topology for the dispatcher, the training loop's
    schedule."""
    if getattr(args, "ranks_per_node", None):
        os.environ["MEGATRON_DSV3_RANKS_PER_NODE"] = str(args.ranks_per_node)
    if getattr(args, "pipeline_schedule", None):
        from megatron_dsv3.pipeline import use_in_megatron_training

        use_in_megatron_training(args.pipeline_schedule)


def config_from_args(args, config=None):
    """DeepSeekV3Config from Megatron's parsed args (Megatron's own field mapping) plus ours."""
    from megatron.training.arguments import core_transformer_config_from_args

    from megatron_dsv3.configs import DeepSeekV3Config

    if config is None:
        config = core_transformer_config_from_args(args, config_class=DeepSeekV3Config)
    if not isinstance(config, DeepSeekV3Config):
        # (Megatron picks MLATransformerConfig itself under --multi-latent-attention)
        config = DeepSeekV3Config(**{f.name: getattr(config, f.name)
                                     for f in dataclasses.fields(config) if f.init})
    config.vocab_size = getattr(args, "padded_vocab_size", None) or args.vocab_size
    config.max_position_embeddings = max(args.seq_length, args.max_position_embeddings or 0)
    config.dsv3_fp8_recipe = getattr(args, "dsv3_fp8_recipe", None)
    config.dsv3_dispatch_chunks = getattr(args, "dsv3_dispatch_chunks", 2)
    config.dsv3_dispatch_fp8 = getattr(args, "dsv3_dispatch_fp8", False)
    config.dsv3_dispatcher = getattr(args, "dsv3_dispatcher", "node-aware")
    if getattr(args, "seed", None) is not None:
        config.init_seed = args.seed
    return config


def model_provider(pre_process: bool = True, post_process: bool = True,
                   vp_stage: Optional[int] = None, config=None, pg_collection=None):
    """Megatron's model_provider signature: DeepSeekV3Model, or for dualpipe/dualpipev this rank's
    two V-placed chunks (a list, which Megatron's get_model keeps as its model list)."""
    from megatron.training import get_args

    from megatron_dsv3.model import DeepSeekV3Model
    from megatron_dsv3.model_chunks import build_model_chunks

    args = get_args()
    apply_dsv3_args(args)
    config = config_from_args(args, config)
    use_te = args.transformer_impl == "transformer_engine"
    schedule = getattr(args, "pipeline_schedule", None)
    if schedule in ("dualpipe", "dualpipev"):
        from megatron.core import parallel_state

        return build_model_chunks(config, schedule,
                                  parallel_state.get_pipeline_model_parallel_rank(),
                                  args.pipeline_model_parallel_size, pg_collection=pg_collection,
                                  use_te=use_te)
    kwargs = {} if pg_collection is None else {"pg_collection": pg_collection}
    return DeepSeekV3Model(config, pre_process=pre_process, post_process=post_process,
                           vp_stage=vp_stage, use_te=use_te, **kwargs)


def _megatron_lm_on_path() -> None:
    path = os.environ.get("MEGATRON_LM_PATH")
    if path and path not in sys.path:
        sys.path.insert(0, path)


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    world = os.environ.get("WORLD_SIZE")
    parse_dsv3_args(argv, int(world) if world else None)  # our errors before Megatron's start-up
    _megatron_lm_on_path()
    sys.argv = [sys.argv[0]] + list(argv)
    import megatron.core  # noqa: F401  (installed megatron-core wins over the checkout's copy)
    try:
        import pretrain_gpt as mlm  # Megatron-LM's script: forward_step, datasets
    except ImportError as e:
        raise SystemExit("megatron_dsv3.pretrain_gpt needs Megatron-LM's pretrain_gpt.py and "
                         "megatron.training importable: set MEGATRON_LM_PATH to a Megatron-LM "
                         f"checkout or put it on PYTHONPATH ({e})")
    from megatron.core.enums import ModelType
    from megatron.training import pretrain

    mlm.train_valid_test_datasets_provider.is_distributed = True
    pretrain(mlm.train_valid_test_datasets_provider, model_provider,
             ModelType.encoder_or_decoder, mlm.forward_step,
             extra_args_provider=add_dsv3_args,
             args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
             get_embedding_ranks=getattr(mlm, "get_embedding_ranks", None))


if __name__ == "__main__":
    main()
