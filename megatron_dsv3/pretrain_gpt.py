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
- the schedule: the training loop's `get_forward_backward_func` answers with the named schedule
  (or Megatron's choice) wrapped by `megatron_loop_schedule`: DualPipe(V)'s losses handed to the
  last pipeline rank, where Megatron reduces and logs them; each chunk its own iterator over the
  step's micro-batches and the script's stage checks answering for the chunk; our MTP losses
  into Megatron's MTP logging helper ("mtp_1 loss"); on DualPipeV the MTP chunk's embedding copy
  (`untie_shared_embedding`) summed with the first chunk's after finalize_model_grads, the
  embedding group being rank 0 alone (`embedding_ranks`).

Where it works: Megatron-LM's whole `pretrain()` (core_v0.16.1 and core_v0.19.0; 0.19's
config-container `pretrain()` included) with 1F1B and DualPipeV, MTP and our FP8 recipe, tested on
CPU/gloo with Megatron-LM's CUDA call sites redirected (tests/integration/test_megatron_lm_loop.py,
test_pretrain_entry.py). The DualPipe chunks need pipeline size >= 2. Megatron-LM >= 0.17's
training code needs Python >= 3.12.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import List, Optional

from megatron_dsv3.cli import non_negative_int, positive_int
from megatron_dsv3.compat import MTP_ON_THIS_RANK_NAMES, pretrain_takes_config_container

SCHEDULES = ("1f1b", "interleaved", "no_pipelining", "dualpipe", "dualpipev")
FP8_RECIPES = ("deepseek", "deepseek-pow2")
DISPATCHERS = ("node-aware", "flat", "local")


# (flag, args attribute, allowed values) of every numeric flag we register or read; None = unset
NUMERIC_FLAGS = (
    ("--dsv3-dispatch-chunks", "dsv3_dispatch_chunks", positive_int),
    ("--ranks-per-node", "ranks_per_node", positive_int),
    ("--pipeline-model-parallel-size", "pipeline_model_parallel_size", positive_int),
    ("--num-virtual-stages-per-pipeline-rank", "num_virtual_stages_per_pipeline_rank",
     positive_int),
    ("--num-layers-per-virtual-pipeline-stage", "num_layers_per_virtual_pipeline_stage",
     positive_int),
    ("--expert-tensor-parallel-size", "expert_tensor_parallel_size", positive_int),
    ("--mtp-num-layers", "mtp_num_layers", non_negative_int.with_note("0 = none")),
)

# Megatron-LM's flags that turn on its virtual pipeline (at most one; Megatron derives
# args.virtual_pipeline_model_parallel_size from it, None where that comes out as 1)
VIRTUAL_PIPELINE_FLAGS = (
    ("--num-virtual-stages-per-pipeline-rank", "num_virtual_stages_per_pipeline_rank"),
    ("--num-layers-per-virtual-pipeline-stage", "num_layers_per_virtual_pipeline_stage"),
    ("--pipeline-model-parallel-layout", "pipeline_model_parallel_layout"),
)


def virtual_pipeline(args, pp: int):
    """-> (the virtual-pipeline flag set on `args` or None, the virtual stages per rank it gives:
    None for none or 1, as Megatron, and where it does not divide, which Megatron refuses with
    its own message). Args that Megatron has validated carry the size itself
    (virtual_pipeline_model_parallel_size)."""
    given = [(flag, dest) for flag, dest in VIRTUAL_PIPELINE_FLAGS
             if getattr(args, dest, None) is not None]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(f for f, _ in given)} are both set: allowed is at most "
                         "one of " + ", ".join(f for f, _ in VIRTUAL_PIPELINE_FLAGS))
    if not given:
        return None, getattr(args, "virtual_pipeline_model_parallel_size", None)
    flag, dest = given[0]
    value = getattr(args, dest)
    if dest == "num_virtual_stages_per_pipeline_rank":
        vp = value
    elif dest == "num_layers_per_virtual_pipeline_stage":
        layers = getattr(args, "num_layers", None)
        vp = layers // pp // value if layers and layers % (pp * value) == 0 else None
    else:
        from megatron.core.transformer.pipeline_parallel_layer_layout import (
            PipelineParallelLayerLayout)

        try:
            stages = PipelineParallelLayerLayout.get_num_stages_from_str(value)
        except Exception as e:  # (Megatron's own parser: its message)
            raise ValueError(f"{flag} {value!r} is invalid: {e}") from None
        vp = stages // pp if stages % pp == 0 else None
    return flag, (None if vp == 1 else vp)


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
    vflag, vp = virtual_pipeline(args, pp)
    # the layout rules the planner, the converter and the trainer apply (configs/layout.py)
    if schedule is not None:
        names = layout_rules.MEGATRON_FLAGS
        if vflag is not None:  # (the messages name the flag given)
            names = dataclasses.replace(names, vpp=vflag)
        if schedule in layout_rules.DUALPIPE_SCHEDULES and vflag is not None:
            vp = vp or 1  # (a layout flag with DualPipe is refused even where it gives 1)
        layout_rules.check_schedule(schedule, pp, mtp=getattr(args, "mtp_num_layers", None),
                                    vpp=vp, names=names, allowed=SCHEDULES)
    num_layers = getattr(args, "num_layers", None)
    if schedule in layout_rules.DUALPIPE_SCHEDULES and num_layers:
        # Megatron checks its own schedules' split; ours places the chunks itself
        # (model_chunks.build_model_chunks)
        layout_rules.stage_layer_counts(
            num_layers, schedule, pp, getattr(args, "decoder_first_pipeline_num_layers", None),
            getattr(args, "decoder_last_pipeline_num_layers", None),
            names=layout_rules.MEGATRON_FLAGS)
    tp = getattr(args, "tensor_model_parallel_size", None) or 1
    # Megatron's expert tensor parallelism defaults to TP; our experts are split by expert
    # parallelism only (the config refuses any other when the model is built)
    etp = getattr(args, "expert_tensor_parallel_size", None) or tp
    if etp != 1 and getattr(args, "num_experts", None):
        given = getattr(args, "expert_tensor_parallel_size", None)
        source = (f"--expert-tensor-parallel-size {given}" if given else
                  f"the expert tensor-parallel size ({etp}: Megatron's default, "
                  f"--tensor-model-parallel-size {tp})")
        raise ValueError(f"{source} is invalid: allowed value 1 (DeepSeek-V3's experts are "
                         "split by expert parallelism only): pass --expert-tensor-parallel-size 1")
    world = getattr(args, "world_size", None)
    if world is not None:
        ep = getattr(args, "expert_model_parallel_size", None) or 1
        layout_rules.check_world_size(world, tp, pp, ep, etp=etp,
                                      names=layout_rules.MEGATRON_FLAGS)
    if schedule in layout_rules.DUALPIPE_SCHEDULES and world is not None:
        _check_micro_batches(args, schedule, pp, world)
    if getattr(args, "dsv3_dispatch_fp8", False) and \
            getattr(args, "dsv3_dispatcher", None) == "local":
        raise ValueError("--dsv3-dispatch-fp8 needs --dsv3-dispatcher node-aware or flat "
                         "(the local dispatcher sends nothing)")
    if getattr(args, "dsv3_fp8_recipe", None) and getattr(args, "fp8", None):
        raise ValueError(f"--dsv3-fp8-recipe {args.dsv3_fp8_recipe} and --fp8-format {args.fp8} "
                         "are both given: allowed is one of them (--fp8-format would run the "
                         "Transformer Engine layers with Megatron's recipe and --dsv3-fp8-recipe "
                         "the routed experts)")


def _check_micro_batches(args, schedule: str, pp: int, world: int) -> None:
    """DualPipe(V)'s micro-batch rule (pipeline.schedules.check) for every global batch size of
    the run (--rampup-batch-size start, start + increment, ..., --global-batch-size), with the
    flags that set the count: global batch / (micro-batch x data-parallel size)."""
    from megatron_dsv3.pipeline.schedules import check

    gbs, mbs = getattr(args, "global_batch_size", None), getattr(args, "micro_batch_size", None)
    if not mbs:
        return
    tp = getattr(args, "tensor_model_parallel_size", None) or 1
    cp = getattr(args, "context_parallel_size", None) or 1
    if world % (tp * pp * cp):
        return  # (check_world_size names that)
    dp = world // (tp * pp * cp)
    gbs = gbs or mbs * dp  # Megatron's default: one micro-batch per step
    sizes = [gbs]
    ramp = getattr(args, "rampup_batch_size", None)
    if ramp:
        start, step = int(ramp[0]), int(ramp[1])
        if step > 0:
            sizes = list(range(start, gbs, step)) + [gbs]
    for size in sizes:
        if size % (mbs * dp):
            continue  # Megatron refuses a global batch that does not split into micro-batches
        count = size // (mbs * dp)
        try:
            check(schedule, pp, count)
        except ValueError as e:
            flag = "--global-batch-size" if size == gbs else "--rampup-batch-size (a ramp value)"
            raise ValueError(f"{flag} {size} / (--micro-batch-size {mbs} x data-parallel size "
                             f"{dp}) = {count} micro-batches per step, too few or odd for "
                             f"--pipeline-schedule {schedule}: {e}") from None


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
    for flag in ("--num-virtual-stages-per-pipeline-rank",
                 "--num-layers-per-virtual-pipeline-stage", "--mtp-num-layers",
                 "--expert-tensor-parallel-size"):
        parser.add_argument(flag, type=types[flag], default=None)
    parser.add_argument("--pipeline-model-parallel-layout", default=None)
    for flag in ("--tensor-model-parallel-size", "--expert-model-parallel-size", "--num-layers",
                 "--num-experts",
                 "--decoder-first-pipeline-num-layers", "--decoder-last-pipeline-num-layers",
                 "--context-parallel-size", "--global-batch-size", "--micro-batch-size"):
        parser.add_argument(flag, type=positive_int, default=None)
    parser.add_argument("--rampup-batch-size", nargs="*", default=None)
    parser.add_argument("--fp8-format", dest="fp8", default=None)
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
    from megatron_dsv3.configs import DeepSeekV3Config
    from megatron_dsv3.configs.config import check_megatron_rope_reading

    if getattr(args, "mtp_num_layers", None) == 0:
        args.mtp_num_layers = None  # --mtp-num-layers 0 = no MTP, which our config spells None
    if config is None:
        from megatron.training.arguments import core_transformer_config_from_args

        config = core_transformer_config_from_args(args, config_class=DeepSeekV3Config)
    # (Megatron-LM's flags, whatever the class: a DeepSeekV3Config is not checked by itself)
    check_megatron_rope_reading(config)
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
    use_in_megatron_loop(args)
    config = config_from_args(args, config)
    use_te = args.transformer_impl == "transformer_engine"
    schedule = getattr(args, "pipeline_schedule", None)
    if schedule in ("dualpipe", "dualpipev"):
        from megatron.core import parallel_state

        chunks = build_model_chunks(config, schedule,
                                    parallel_state.get_pipeline_model_parallel_rank(),
                                    args.pipeline_model_parallel_size,
                                    pg_collection=pg_collection, use_te=use_te)
        untie_shared_embedding(chunks)
        return ModelChunks(chunks)
    kwargs = {} if pg_collection is None else {"pg_collection": pg_collection}
    return DeepSeekV3Model(config, pre_process=pre_process, post_process=post_process,
                           vp_stage=vp_stage, use_te=use_te, **kwargs)


# -- Megatron-LM's training loop with this rank's two chunks (DualPipe / DualPipeV) -------------

class ModelChunks(list):
    """This rank's model chunks as the model provider hands them to Megatron-LM's `get_model`:
    a list (get_model keeps a list as its model list), on which get_model's
    `model.model_type = ...` (meant for one model) sets the attribute on every chunk."""

    def __setattr__(self, name, value):
        for chunk in self:
            setattr(chunk, name, value)
        super().__setattr__(name, value)


def untie_shared_embedding(chunks) -> None:
    """DualPipeV's rank 0 holds the first stage (embedding) and the last (MTP, which reads the
    embedding); build_model_chunks gives both one Parameter. Megatron-LM wraps each chunk in its
    own DistributedDataParallel and builds its optimizer over every chunk's parameters: one
    Parameter in two chunks would have its gradient land in one chunk's buffer only, be counted
    twice by the gradient norm and be stepped twice by the optimizer. So in Megatron's loop the
    MTP chunk gets its own copy (same values), and `sum_embedding_copies` adds the two copies'
    gradients after Megatron's finalize_model_grads, which is what Megatron's embedding group does
    between ranks: both copies take the same step and stay equal. Like Megatron's last-stage copy
    the MTP chunk's is marked `shared`, so the gradient norm counts the embedding once."""
    import torch

    if len(chunks) != 2 or getattr(chunks[1], "embedding", None) is None or \
            getattr(chunks[0], "embedding", None) is None:
        return
    shared = chunks[0].embedding.word_embeddings.weight
    if chunks[1].embedding.word_embeddings.weight is not shared:
        return
    copy = torch.nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)
    for name, value in vars(shared).items():  # tensor-parallel attributes and the like
        setattr(copy, name, value)
    # as Megatron marks the last stage's embedding copy: left out of the gradient norm (and the
    # zero count), which counts the first stage's copy
    copy.shared = True
    copy.shared_embedding = True
    chunks[1].embedding.word_embeddings.weight = copy


def _embedding_copies(model) -> list:
    from megatron.core.utils import get_attr_wrapped_model

    weights = []
    for chunk in model:
        inner = get_attr_wrapped_model(chunk, "pre_process", return_model_obj=True)
        embedding = getattr(inner, "embedding", None)
        if embedding is not None:
            weights.append(embedding.word_embeddings.weight)
    return weights


def sum_embedding_copies(model) -> None:
    """Both embedding copies on this rank (see untie_shared_embedding) get the sum of their
    gradients (Megatron's `main_grad` under its DDP, else `.grad`)."""
    weights = _embedding_copies(model)
    if len(weights) < 2:
        return
    grads = [getattr(w, "main_grad", None) if hasattr(w, "main_grad") else w.grad
             for w in weights]
    if any(g is None for g in grads):
        return
    total = sum(g.float() for g in grads)
    for g in grads:
        g.copy_(total)


def embedding_ranks(schedule: Optional[str]):
    """Megatron's `get_embedding_ranks` for pretrain(): the pipeline ranks holding a copy of the
    word embedding, whose gradients Megatron all-reduces. DualPipeV keeps the first and the last
    stage (the MTP's embedding) on pipeline rank 0, so its group is rank 0 alone (the two
    copies there are summed by sum_embedding_copies); other schedules keep Megatron's
    default."""
    if schedule != "dualpipev":
        return None

    def get_embedding_ranks(pp_ranks, *_a, **_k):
        return [pp_ranks[0]]
    return get_embedding_ranks


def megatron_loop_schedule(schedule_func, schedule: Optional[str], mtp_num_layers: int):
    """The schedule as Megatron-LM's train_step / evaluate call it, around `schedule_func`:
    - DualPipe / DualPipeV compute losses on pipeline rank 0 (and, for DualPipe, on the last);
      Megatron reduces and logs them on its last pipeline stage (train_step's
      `is_pipeline_last_stage`, training_log's `print_rank_last`): every rank's loss dicts are
      handed to the last pipeline rank, which returns them all; the others return none;
    - our MTP losses (DeepSeekV3Model.pop_mtp_losses) go to Megatron's MTP logging helper, so
      training_log writes "mtp_1 loss" as it does for its own MTP;
    - on DualPipeV, Megatron's finalize_model_grads is followed by sum_embedding_copies."""
    import functools

    import torch.distributed as dist

    @functools.wraps(schedule_func)
    def forward_backward(*, model, num_microbatches, forward_only=False, **kwargs):
        from megatron.core import parallel_state
        from megatron.core.utils import get_model_config

        config = get_model_config(model[0])
        finalize = config.finalize_model_grads_func
        if schedule == "dualpipev" and finalize is not None and \
                not getattr(finalize, "_dsv3_sums_embedding_copies", False):
            def finalize_and_sum(model_, *a, _finalize=finalize, **k):
                out = _finalize(model_, *a, **k)
                sum_embedding_copies(model_)
                return out
            finalize_and_sum._dsv3_sums_embedding_copies = True
            config.finalize_model_grads_func = finalize_and_sum
        if schedule in ("dualpipe", "dualpipev"):
            kwargs["data_iterator"] = _per_chunk_batches(kwargs.get("data_iterator"), schedule,
                                                         num_microbatches)
            kwargs["forward_step_func"] = _script_sees_chunk_stage(kwargs["forward_step_func"])
        losses = schedule_func(model=model, num_microbatches=num_microbatches,
                               forward_only=forward_only, **kwargs)
        if mtp_num_layers and not forward_only:
            _track_mtp_losses(model, num_microbatches, mtp_num_layers)
        if schedule not in ("dualpipe", "dualpipev"):
            return losses
        group = parallel_state.get_pipeline_model_parallel_group()
        if dist.get_world_size(group) == 1:
            return losses
        gathered = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, [{k: v.detach().cpu() for k, v in d.items()}
                                          if isinstance(d, dict) else d for d in losses],
                               group=group)
        if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            return []
        device = next(model[0].parameters()).device
        if schedule == "dualpipe":
            # Megatron's order, micro-batches 0..N-1: direction 0 (the first half of the batch)
            # ends on the last pipeline rank, direction 1 (the second half) on rank 0
            gathered = gathered[::-1]
        return [{k: v.to(device) for k, v in d.items()} if isinstance(d, dict) else d
                for part in gathered for d in part]
    return forward_backward


class _StageView:
    """megatron.core.parallel_state as Megatron-LM's script sees it while one chunk runs: first /
    last pipeline stage are the chunk's (its pre_process / post_process)."""

    def __init__(self, module, first: bool, last: bool):
        self._module, self._first, self._last = module, first, last

    def is_pipeline_first_stage(self, *_a, **_k):
        return self._first

    def is_pipeline_last_stage(self, *_a, **_k):
        return self._last

    def __getattr__(self, name):
        return getattr(self._module, name)


def _script_sees_chunk_stage(forward_step_func):
    """Megatron-LM's forward_step (its script's get_batch and loss_func) decides what a stage
    reads from the pipeline rank: 0.19's get_batch drops labels and loss mask on the first
    rank, where DualPipeV's last stage (the loss and the MTP, which reads the tokens) lives
    beside the first. While a chunk runs, the script's `mpu`, `is_first_or_last_pipeline_stage`
    and `mtp_on_this_rank(_func)` answer for the chunk (pre_process / post_process /
    mtp_process); the model code itself is not affected."""
    import contextlib

    from megatron.core.utils import get_attr_wrapped_model

    names = getattr(forward_step_func, "__globals__", None)
    if names is None:
        return forward_step_func

    @contextlib.contextmanager
    def chunk_stage(chunk):
        inner = get_attr_wrapped_model(chunk, "pre_process", return_model_obj=True)
        first, last = bool(inner.pre_process), bool(inner.post_process)
        saved = {}
        if "mpu" in names:
            saved["mpu"] = names["mpu"]
            names["mpu"] = _StageView(names["mpu"], first, last)
        mtp = bool(getattr(inner, "mtp_process", False))
        answers = {"is_first_or_last_pipeline_stage": first or last,
                   **{name: mtp for name in MTP_ON_THIS_RANK_NAMES}}  # (its version's name)
        for name, answer in answers.items():
            if name in names:
                saved[name] = names[name]
                names[name] = lambda *_a, _answer=answer, **_k: _answer
        try:
            yield
        finally:
            names.update(saved)

    def forward_step(data_iterator, model, *a, **k):
        with chunk_stage(model):
            return forward_step_func(data_iterator, model, *a, **k)
    return forward_step


def _per_chunk_batches(data_iterator, schedule: str, num_microbatches: int):
    """One iterator per chunk over this step's micro-batches. Megatron-LM hands a rank one
    iterator (the same sample order on every pipeline rank of a data-parallel replica) and its
    get_batch reads it on every first or last stage, which both chunks of DualPipe(V)'s end
    ranks are: read in turn, chunk 0 would get the tokens of one micro-batch and chunk 1 the
    labels of the next. So the step's micro-batches are read once, in order, and DualPipeV's
    chunks (stages r and 2P-1-r of the same micro-batches) each go through all of them;
    DualPipe's chunk 0 (direction 0) takes the first half and chunk 1 (direction 1) the second."""
    if isinstance(data_iterator, list):
        return data_iterator
    if data_iterator is None:
        return [None, None]
    import copy

    batches = [next(data_iterator) for _ in range(num_microbatches)]
    if schedule == "dualpipev":  # (each chunk its own dicts: 0.19's get_batch edits them)
        return [iter([copy.copy(b) for b in batches]), iter([copy.copy(b) for b in batches])]
    half = num_microbatches // 2
    return [iter(batches[:half]), iter(batches[half:])]


def _track_mtp_losses(model, num_microbatches: int, depth: int) -> None:
    """This step's MTP losses per depth into Megatron's MTP logging helper, on every rank (zeros
    where no chunk runs MTP) and summed over the pipeline group, averaged over data-parallel
    ranks. Megatron's tracker holds the sum over micro-batches and its training_log multiplies by
    1 / micro-batches: the mean over micro-batches (pop_mtp_losses) is saved times their
    number."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.utils import get_attr_wrapped_model

    from megatron_dsv3.compat import save_mtp_loss_to_megatron_tracker

    device = next(model[0].parameters()).device
    total = torch.zeros(depth, device=device)
    for chunk in model:
        inner = get_attr_wrapped_model(chunk, "pre_process", return_model_obj=True)
        pop = getattr(inner, "pop_mtp_losses", None)
        got = pop() if pop is not None else None
        if got is not None:
            total += got.to(device) * num_microbatches
    for k in range(depth):
        save_mtp_loss_to_megatron_tracker(
            total[k], k, depth,
            reduce_group=parallel_state.get_pipeline_model_parallel_group(),
            avg_group=parallel_state.get_data_parallel_group(with_context_parallel=True))


def use_in_megatron_loop(args) -> None:
    """Point Megatron-LM's training loop (megatron.training.training.get_forward_backward_func)
    at the named schedule (or Megatron's own choice), wrapped by megatron_loop_schedule."""
    import megatron.training.training as training

    schedule = getattr(args, "pipeline_schedule", None)
    if getattr(training.get_forward_backward_func, "_dsv3_loop", ()) == (schedule,):
        return
    if schedule:
        from megatron_dsv3.pipeline import get_forward_backward_func

        base = get_forward_backward_func(schedule)
        choose = lambda *a, **k: base  # noqa: E731
    else:
        choose = training.get_forward_backward_func
    mtp = getattr(args, "mtp_num_layers", None) or 0

    def get_forward_backward(*a, **k):
        return megatron_loop_schedule(choose(*a, **k), schedule, mtp)
    get_forward_backward._dsv3_loop = (schedule,)
    training.get_forward_backward_func = get_forward_backward


def _megatron_lm_on_path() -> None:
    path = os.environ.get("MEGATRON_LM_PATH")
    if path and path not in sys.path:
        sys.path.insert(0, path)


def dsv3_help() -> str:
    """Our flags' help: Megatron-LM's --help is printed by a parse inside pretrain() that does
    not know them (its fault-tolerance setup parses without our extra_args_provider)."""
    parser = argparse.ArgumentParser(
        prog="python -m megatron_dsv3.pretrain_gpt", add_help=False,
        usage="%(prog)s <Megatron-LM pretrain_gpt.py arguments> [megatron-dsv3 arguments]",
        description="Megatron-LM's pretrain() with megatron-dsv3's model provider. Megatron-LM's "
                    "own arguments follow (from its parser, when Megatron-LM is importable).")
    add_dsv3_args(parser)
    return parser.format_help()


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    helping = bool({"-h", "--help"} & set(argv))
    if helping:
        print(dsv3_help())
    world = os.environ.get("WORLD_SIZE")
    ours = parse_dsv3_args(argv, int(world) if world else None)  # our errors before Megatron's
    _megatron_lm_on_path()
    sys.argv = [sys.argv[0]] + list(argv)
    import megatron.core  # noqa: F401  (installed megatron-core wins over the checkout's copy)
    try:
        import pretrain_gpt as mlm  # Megatron-LM's script: forward_step, datasets
    except ImportError as e:
        if helping:
            print("(Megatron-LM's own arguments: set MEGATRON_LM_PATH to a Megatron-LM "
                  "checkout, or run its pretrain_gpt.py --help)")
            return
        raise SystemExit("megatron_dsv3.pretrain_gpt needs Megatron-LM's pretrain_gpt.py and "
                         "megatron.training importable: set MEGATRON_LM_PATH to a Megatron-LM "
                         f"checkout or put it on PYTHONPATH ({e})")
    from megatron.core.enums import ModelType
    from megatron.training import pretrain

    mlm.train_valid_test_datasets_provider.is_distributed = True
    ranks = embedding_ranks(ours.pipeline_schedule) or getattr(mlm, "get_embedding_ranks", None)
    defaults = {"tokenizer_type": "GPT2BPETokenizer"}
    if pretrain_takes_config_container(pretrain):
        # Megatron-LM 0.19+: without a model config in the container, pretrain() builds with
        # `model_provider`
        from megatron.training.argument_utils import pretrain_cfg_container_from_args
        from megatron.training.arguments import parse_and_validate_args

        args = parse_and_validate_args(extra_args_provider=add_dsv3_args, args_defaults=defaults)
        pretrain(pretrain_cfg_container_from_args(args, None),
                 mlm.train_valid_test_datasets_provider, ModelType.encoder_or_decoder,
                 mlm.forward_step, model_provider=model_provider, get_embedding_ranks=ranks)
    else:  # Megatron-LM 0.16 - 0.18
        pretrain(mlm.train_valid_test_datasets_provider, model_provider,
                 ModelType.encoder_or_decoder, mlm.forward_step,
                 extra_args_provider=add_dsv3_args, args_defaults=defaults,
                 get_embedding_ranks=ranks)


if __name__ == "__main__":
    main()
