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
  which `moe.dispatcher.default_dispatcher` reads: node-aware or flat with expert parallelism,
  local without);
- `model_provider`: DeepSeekV3Model (our layer spec and MTP) from a DeepSeekV3Config made by
  Megatron's `core_transformer_config_from_args`; for dualpipe/dualpipev it returns this rank's two
  V-placed chunks (`pipeline.build_chunks`) as Megatron's model list;
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

SCHEDULES = ("1f1b", "interleaved", "no_pipelining", "dualpipe", "dualpipev")
FP8_RECIPES = ("deepseek", "deepseek-pow2")
DISPATCHERS = ("node-aware", "flat", "local")


def _positive_int(flag: str):
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            raise argparse.ArgumentTypeError(
                f"{flag} {value!r} is invalid: allowed values are integers >= 1")
        return n
    return parse


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
    group.add_argument("--dsv3-dispatch-chunks", type=_positive_int("--dsv3-dispatch-chunks"),
                       default=2, help="chunks the node-aware dispatch is pipelined over")
    group.add_argument("--dsv3-dispatch-fp8", action="store_true",
                       help="FP8 payload for the expert all-to-all")
    group.add_argument("--ranks-per-node", type=_positive_int("--ranks-per-node"), default=None,
                       help="ranks per node for the node-aware dispatcher "
                       "(default: LOCAL_WORLD_SIZE)")
    return parser


def validate_dsv3_args(args) -> None:
    """Checks across flags; raises ValueError naming the flag and what is allowed."""
    schedule = getattr(args, "pipeline_schedule", None)
    pp = getattr(args, "pipeline_model_parallel_size", 1) or 1
    vp = getattr(args, "virtual_pipeline_model_parallel_size", None)
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"--pipeline-schedule {schedule!r} is invalid: allowed values are "
                         f"{', '.join(SCHEDULES)}")
    if schedule in ("dualpipe", "dualpipev"):
        if pp < 2:
            raise ValueError(f"--pipeline-schedule {schedule} needs "
                             f"--pipeline-model-parallel-size >= 2 (got {pp})")
        if vp is not None or getattr(args, "num_layers_per_virtual_pipeline_stage", None):
            raise ValueError(f"--pipeline-schedule {schedule} places its two chunks itself: "
                             "--virtual-pipeline-model-parallel-size / "
                             "--num-layers-per-virtual-pipeline-stage must not be set")
        if schedule == "dualpipe" and getattr(args, "mtp_num_layers", None):
            raise ValueError("--pipeline-schedule dualpipe with --mtp-num-layers is not "
                             "supported: allowed are --pipeline-schedule dualpipev (DeepSeek-V3's "
                             "choice) or no --mtp-num-layers")
        if schedule == "dualpipe" and pp % 2:
            raise ValueError(f"--pipeline-schedule dualpipe needs an even "
                             f"--pipeline-model-parallel-size (got {pp})")
    if schedule == "interleaved" and vp is None:
        raise ValueError("--pipeline-schedule interleaved needs "
                         "--virtual-pipeline-model-parallel-size")
    if getattr(args, "dsv3_dispatch_fp8", False) and getattr(args, "dsv3_dispatcher", None) == "local":
        raise ValueError("--dsv3-dispatch-fp8 needs --dsv3-dispatcher node-aware or flat "
                         "(the local dispatcher sends nothing)")


def parse_dsv3_args(argv: List[str]):
    """Our flags (and the Megatron flags they depend on) from a command line, validated: used
    before Megatron starts so mistakes fail at once with our messages."""
    parser = argparse.ArgumentParser(prog="megatron_dsv3.pretrain_gpt", add_help=False,
                                     allow_abbrev=False)
    add_dsv3_args(parser)
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parser.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None)
    parser.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    parser.add_argument("--mtp-num-layers", type=int, default=None)
    args, _ = parser.parse_known_args(argv)
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
    from megatron_dsv3.pipeline import build_chunks

    args = get_args()
    apply_dsv3_args(args)
    config = config_from_args(args, config)
    use_te = args.transformer_impl == "transformer_engine"
    schedule = getattr(args, "pipeline_schedule", None)
    if schedule in ("dualpipe", "dualpipev"):
        from megatron.core import parallel_state

        return build_chunks(config, schedule, parallel_state.get_pipeline_model_parallel_rank(),
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
    parse_dsv3_args(argv)  # our errors before Megatron's start-up
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
