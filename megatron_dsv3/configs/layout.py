"""The parallel-layout rules, in one place: the planner (`megatron_dsv3.plan`), the checkpoint
converter, the trainer, the pretrain_gpt entry point and the DualPipe chunk builder all ask here.

A layout is tensor (TP), pipeline (PP) and expert (EP) parallel sizes, the world size they share
(DP = world / (TP x PP)), a pipeline schedule and the split of the decoder layers over the
pipeline stages. Each rule raises `LayoutError` (a ValueError) naming the flag or config field in
the caller's vocabulary (`FLAGS`, `MEGATRON_FLAGS` or `FIELDS`) and the values allowed.

The uneven split uses Megatron's own fields: `num_layers_in_first_pipeline_stage` /
`num_layers_in_last_pipeline_stage` (flags `--decoder-first-pipeline-num-layers` /
`--decoder-last-pipeline-num-layers`), with Megatron's meaning: the decoder layers held by the
first and the last pipeline *rank*, over all the model chunks of that rank; the other ranks split
the rest evenly. Megatron requires each set value > 0, the rest to divide over the middle ranks,
and (with V virtual stages) every rank's count to divide by V. How a rank's count maps to stages:

- 1f1b / no_pipelining: rank r is stage r.
- interleaved (V chunks per rank): chunk v of rank r is stage v*PP + r and holds count_r / V.
- dualpipe: rank r holds stage r (direction 0) and the mirrored copy of stage PP-1-r; stage s
  holds count_s.
- dualpipev: rank r holds stage r (chunk 0) and stage 2PP-1-r (chunk 1); its count is split
  between them, the earlier stage taking the odd layer. So DeepSeek-V3's 61 layers on PP16 with
  first 1 and last 4 give stage 0 one layer (plus the embedding), stage 31 none (final norm, head
  and MTP), every other stage two.

Without the fields Megatron's schedules need num_layers divisible by PP (and by V per rank), while
DualPipe(V) split the layers over their stages as evenly as possible, earlier stages taking the
remainder (only the last stage may then hold no decoder layer).

Imports nothing heavy: pure integer rules on sizes and a config's fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

SCHEDULES = ("1f1b", "interleaved", "no_pipelining", "dualpipe", "dualpipev")
DUALPIPE_SCHEDULES = ("dualpipe", "dualpipev")


class LayoutError(ValueError):
    """A layout that does not divide or does not fit; the message names the flag (or config
    field) and the allowed values."""


@dataclasses.dataclass(frozen=True)
class Names:
    """How a caller's user spells each setting: flags ('--pp 16') or config fields
    ('pipeline_model_parallel_size=16')."""

    tp: str
    pp: str
    ep: str
    schedule: str
    first: str
    last: str
    vpp: str
    mtp: str
    sep: str  # between the name and its value

    def show(self, key: str, value: Any) -> str:
        return f"{getattr(self, key)}{self.sep}{value}"


FLAGS = Names("--tp", "--pp", "--ep", "--schedule", "--decoder-first-pipeline-num-layers",
              "--decoder-last-pipeline-num-layers", "--virtual-pipeline-model-parallel-size",
              "--mtp", " ")
TRAINER_FLAGS = dataclasses.replace(FLAGS, tp="")
"""The example trainer's flags (examples/pretrain_tiny.py): no tensor parallelism, no --tp."""
MEGATRON_FLAGS = Names("--tensor-model-parallel-size", "--pipeline-model-parallel-size",
                       "--expert-model-parallel-size", "--pipeline-schedule",
                       "--decoder-first-pipeline-num-layers",
                       "--decoder-last-pipeline-num-layers",
                       "--num-virtual-stages-per-pipeline-rank", "--mtp-num-layers", " ")
FIELDS = Names("tensor_model_parallel_size", "pipeline_model_parallel_size",
               "expert_model_parallel_size", "schedule", "num_layers_in_first_pipeline_stage",
               "num_layers_in_last_pipeline_stage", "virtual_pipeline_model_parallel_size",
               "mtp_num_layers", "=")


def divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def is_int(value: Any) -> bool:
    """An integer that is not a bool (a count, never a switch)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_sizes(tp: int = 1, pp: int = 1, ep: int = 1, vpp: Optional[int] = None, *,
                names: Names = FLAGS) -> None:
    """Every parallel size a positive integer."""
    for key, value in (("tp", tp), ("pp", pp), ("ep", ep), ("vpp", vpp)):
        if key == "vpp" and value is None:
            continue
        if not is_int(value) or value < 1:
            raise LayoutError(f"{names.show(key, repr(value))} is invalid: allowed values are "
                              "integers >= 1")


def check_world_size(world: int, tp: int = 1, pp: int = 1, ep: int = 1, *, etp: int = 1,
                     names: Names = FLAGS, source: str = "WORLD_SIZE") -> int:
    """World = TP x PP x DP, and EP x ETP inside DP x TP (Megatron's rule: the expert groups of
    a pipeline stage are carved out of its data x tensor parallel ranks; ETP, the experts' own
    tensor parallelism, is 1 for DeepSeek-V3 and our dispatchers, Megatron's default is TP).
    Returns DP."""
    check_sizes(tp, pp, ep, names=names)
    # (a caller without tensor parallelism, e.g. the example trainer, names no TP flag)
    sizes = " x ".join(([names.show("tp", tp)] if names.tp else []) + [names.show("pp", pp)])
    if world % (tp * pp):
        allowed = [p for p in divisors(world) if world % (tp * p) == 0]
        if not names.tp:  # (no tensor parallelism to name: tp is 1)
            raise LayoutError(f"{sizes} does not fit world size {world} ({source}): {names.pp} "
                              f"must divide it; allowed {names.pp} values: {divisors(world)}")
        hint = (f"allowed {names.pp} values with {names.show('tp', tp)}: {allowed}" if allowed
                else f"allowed {names.tp} values: {divisors(world)}")
        raise LayoutError(f"{sizes} does not fit world size {world} ({source}): TP x PP = "
                          f"{tp * pp} does not divide it; {hint}")
    dp = world // (tp * pp)
    if (dp * tp) % (ep * etp):
        within = dp * tp // etp if (dp * tp) % etp == 0 else 0
        expert_tp = "" if etp == 1 else (
            f" x the experts' tensor parallelism {etp} (--expert-tensor-parallel-size; "
            "Megatron's default is the tensor-parallel size, DeepSeek-V3 uses 1)")
        raise LayoutError(
            f"{sizes} x {names.show('ep', ep)} does not fit world size {world} ({source}): "
            f"{names.show('ep', ep)}{expert_tp} must divide DP x TP = {dp} x {tp} = {dp * tp} "
            f"(expert parallelism lives inside data x tensor parallelism); allowed values are "
            f"{divisors(within) if within else 'none'}")
    return dp


def check_model_split(config, tp: int = 1, ep: int = 1, *, names: Names = FLAGS) -> None:
    """TP divides every tensor-parallel dimension; EP divides the routed experts."""
    split_by_tp = {"num_attention_heads": config.num_attention_heads,
                   "ffn_hidden_size": getattr(config, "ffn_hidden_size", None),
                   "vocab_size": getattr(config, "vocab_size", None),
                   "hidden_size": config.hidden_size,
                   "moe_shared_expert_intermediate_size":
                       getattr(config, "moe_shared_expert_intermediate_size", None)}
    split_by_tp = {k: v for k, v in split_by_tp.items() if v}
    for field, size in split_by_tp.items():
        if size % tp:
            allowed = [d for d in divisors(config.num_attention_heads)
                       if all(v % d == 0 for v in split_by_tp.values())]
            raise LayoutError(f"{names.show('tp', tp)} does not divide {field}={size}; allowed "
                              f"values: {allowed}")
    experts = getattr(config, "num_moe_experts", None) or 0
    if experts and experts % ep:
        raise LayoutError(f"{names.show('ep', ep)} does not divide num_moe_experts={experts}; "
                          f"allowed values: {divisors(experts)}")


def check_expert_nodes(ep: int, gpus_per_node: int, config, *, names: Names = FLAGS) -> None:
    """Expert groups align with nodes, and span at least M = moe_router_group_topk nodes when
    they leave one (node-limited routing sends a token to at most M nodes)."""
    if ep > 1 and ep % gpus_per_node and gpus_per_node % ep:
        raise LayoutError(f"{names.show('ep', ep)} must be a multiple or a divisor of "
                          f"--gpus-per-node {gpus_per_node} so that expert groups align with nodes")
    ep_nodes = max(1, ep // gpus_per_node)
    groups = getattr(config, "moe_router_num_groups", None) or 1
    m = getattr(config, "moe_router_group_topk", None)
    if getattr(config, "num_moe_experts", None) and ep_nodes > 1 and groups % ep_nodes:
        # (the node-aware dispatcher's rule: each node holds whole routing groups, so a token's
        # M groups reach at most M nodes)
        fits = [gpus_per_node * n for n in divisors(groups) if n > 1 and n >= (m or 1)]
        raise LayoutError(f"{names.show('ep', ep)} spans {ep_nodes} nodes, which "
                          f"moe_router_num_groups={groups} does not divide: node-limited routing "
                          f"needs each node to hold whole groups; allowed are {names.ep} <= "
                          f"{gpus_per_node} (inside one node) or one of {fits}")
    if getattr(config, "num_moe_experts", None) and ep_nodes > 1 and m and ep_nodes < m:
        raise LayoutError(f"{names.show('ep', ep)} spans {ep_nodes} nodes, fewer than the node "
                          f"limit M = moe_router_group_topk = {m}: allowed are {names.ep} >= "
                          f"{m * gpus_per_node} or {names.ep} <= {gpus_per_node} (inside one node)")


def check_schedule(schedule: str, pp: int, *, mtp: Optional[int] = None,
                   vpp: Optional[int] = None, names: Names = FLAGS,
                   allowed: Sequence[str] = SCHEDULES) -> None:
    """The schedule's constraints on the layout (micro-batch counts are the schedule's own,
    see megatron_dsv3.pipeline.schedules.check)."""
    if schedule not in allowed:
        raise LayoutError(f"{names.show('schedule', repr(schedule))} is invalid: allowed values "
                          f"are {', '.join(allowed)}")
    this = names.show("schedule", schedule)
    if schedule in DUALPIPE_SCHEDULES:
        if pp < 2:
            raise LayoutError(f"{this} needs {names.pp} >= 2 (got {pp})")
        if vpp is not None:
            raise LayoutError(f"{this} places its two chunks per rank itself: {names.vpp} must "
                              "not be set")
    if schedule == "dualpipe" and pp % 2:
        raise LayoutError(f"{this} needs an even {names.pp} (got {pp}): allowed values are "
                          "2, 4, 6, ...")
    if schedule == "dualpipe" and mtp:
        raise LayoutError(f"{this} with {names.mtp} is not supported: allowed are "
                          f"{names.show('schedule', 'dualpipev')} (DeepSeek-V3's choice) or no "
                          f"{names.mtp}")
    if schedule == "interleaved" and vpp is None:
        raise LayoutError(f"{this} needs {names.vpp}")
    if schedule in ("1f1b", "no_pipelining") and vpp:
        raise LayoutError(f"{this} runs one model chunk per rank: {names.vpp} must not be set "
                          f"(virtual stages need {names.show('schedule', 'interleaved')})")
    if schedule == "no_pipelining" and pp != 1:
        raise LayoutError(f"{this} needs {names.pp} 1 (got {pp})")


# -- the split of the decoder layers ------------------------------------------------------------

def num_stages(schedule: str, pp: int, vpp: Optional[int] = None) -> int:
    """Stages a micro-batch traverses: 2 x PP under DualPipeV, PP x V interleaved, else PP."""
    if schedule == "dualpipev":
        return 2 * pp
    if schedule == "interleaved":
        return pp * (vpp or 1)
    return pp


def even_split(num_layers: int, stages: int) -> List[int]:
    """As even as possible, the earlier stages taking the remainder."""
    base, extra = divmod(num_layers, stages)
    return [base + (1 if s < extra else 0) for s in range(stages)]


def rank_layer_counts(num_layers: int, pp: int, first: Optional[int] = None,
                      last: Optional[int] = None, vpp: Optional[int] = None, *,
                      names: Names = FIELDS) -> List[int]:
    """Decoder layers per pipeline rank with first/last set, validated as Megatron's
    TransformerConfig does (values > 0, the rest dividing over the middle ranks, per-rank counts
    divisible by V)."""
    for key, value in (("first", first), ("last", last)):
        if value is not None and (not is_int(value) or value < 1):
            raise LayoutError(f"{names.show(key, repr(value))} is invalid: allowed values are "
                              f"integers from 1 to num_layers={num_layers} (Megatron's rule)")
    if pp < 2:
        raise LayoutError(f"{names.first} / {names.last} split the layers over pipeline ranks: "
                          f"allowed with {names.pp} >= 2 only (got {pp})")
    middle_ranks = pp - (first is not None) - (last is not None)
    middle = num_layers - (first or 0) - (last or 0)
    given = " and ".join(names.show(k, v) for k, v in (("first", first), ("last", last))
                         if v is not None)
    def fits(rest: int) -> bool:  # `rest` layers left for the middle ranks
        return rest == 0 if not middle_ranks else rest > 0 and rest % middle_ranks == 0

    if not fits(middle):
        if (first is None) != (last is None):  # one value given: list that flag's allowed values
            key, other = ("first", last) if first is not None else ("last", first)
            allowed = [v for v in range(1, num_layers + 1)
                       if fits(num_layers - v - (other or 0))]
            if not allowed:
                shown = "none"
            elif len(allowed) > 8:
                shown = f"{', '.join(map(str, allowed[:6]))}, ..., {allowed[-1]}"
            else:
                shown = ", ".join(map(str, allowed))
            raise LayoutError(
                f"{given} is invalid with {names.show('pp', pp)} and num_layers={num_layers}: the "
                f"other {middle_ranks} pipeline rank(s) must get the remaining layers in equal "
                f"shares of at least 1; allowed {getattr(names, key)} values are {shown}")
        if middle_ranks:
            need = (f"what they leave must divide evenly over the {middle_ranks} middle ranks, "
                    "at least 1 layer each")
        else:
            need = f"with {names.pp} {pp} the two values must add up to num_layers={num_layers}"
        raise LayoutError(f"{given} leave {middle} of num_layers={num_layers} layers for "
                          f"{middle_ranks} middle pipeline ranks: {need}")
    per_middle = middle // middle_ranks if middle_ranks else 0
    counts = [per_middle] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    if vpp is not None:  # each rank's layers are split evenly over its virtual stages
        checks = [(names.show(key, value), value) for key, value in (("first", first),
                                                                        ("last", last))
                  if value is not None]
        if middle_ranks:
            checks.append((f"the {per_middle} layers of each middle rank", per_middle))
        for what, value in checks:
            if value % vpp:
                raise LayoutError(f"{what} must divide by {names.show('vpp', vpp)} (each rank's "
                                  "layers are split evenly over its virtual stages)")
    return counts


def stage_layer_counts(num_layers: int, schedule: str, pp: int, first: Optional[int] = None,
                       last: Optional[int] = None, vpp: Optional[int] = None, *,
                       names: Names = FIELDS) -> List[int]:
    """Decoder layers of each stage, in the order a micro-batch traverses them."""
    if not is_int(num_layers) or num_layers < 1:
        raise LayoutError(f"num_layers={num_layers!r} is invalid: allowed values are >= 1")
    check_sizes(pp=pp, vpp=vpp, names=names)
    stages = num_stages(schedule, pp, vpp)
    this = names.show("schedule", schedule)
    if first is not None or last is not None:
        ranks = rank_layer_counts(num_layers, pp, first, last,
                                  vpp if schedule == "interleaved" else None, names=names)
        if schedule == "dualpipev":  # rank r: stage r then stage 2PP-1-r, the earlier one first
            return [(ranks[s] + 1) // 2 if s < pp else ranks[stages - 1 - s] // 2
                    for s in range(stages)]
        if schedule == "interleaved":  # chunk v of rank r is stage v*PP + r
            return [ranks[s % pp] // vpp for s in range(stages)]
        return ranks
    if schedule in DUALPIPE_SCHEDULES:
        # only the last stage may hold no decoder layer (it still runs norm, head and MTP)
        if num_layers < stages - 1:
            per = 2 if schedule == "dualpipev" else 1
            largest = (num_layers + 1) // per
            allowed = (f"{names.pp} <= {largest}" if largest >= 2 else
                       f"no {names.pp} (the smallest, 2, needs {2 * per - 1} layers): another "
                       "schedule")
            raise LayoutError(f"{names.show('pp', pp)} gives {stages} stages under {this} but "
                              f"the model has {num_layers} layers: allowed are {allowed}")
        return even_split(num_layers, stages)
    # Megatron's schedules without first/last: the same number of layers on every stage
    if num_layers % pp:
        raise LayoutError(f"{names.show('pp', pp)} does not divide num_layers={num_layers} "
                          f"under {this} (Megatron splits the layers evenly); allowed values: "
                          f"{divisors(num_layers)}, or set {names.first} / {names.last}")
    if vpp is not None and (num_layers // pp) % vpp:
        raise LayoutError(f"{names.show('vpp', vpp)} does not divide the {num_layers // pp} "
                          f"layers per pipeline rank; allowed values: "
                          f"{divisors(num_layers // pp)}")
    return even_split(num_layers, stages)


def stage_layer_ranges(num_layers: int, schedule: str, pp: int, first: Optional[int] = None,
                       last: Optional[int] = None, vpp: Optional[int] = None, *,
                       names: Names = FIELDS) -> List[Tuple[int, int]]:
    """[(first, last + 1)] global 1-based layer numbers of each stage, in stage order."""
    out, start = [], 1
    for n in stage_layer_counts(num_layers, schedule, pp, first, last, vpp, names=names):
        out.append((start, start + n))
        start += n
    return out


def stage_split_of(config) -> Dict[str, Optional[int]]:
    """first/last from a config: Megatron's num_layers_in_first/last_pipeline_stage."""
    return {"first": getattr(config, "num_layers_in_first_pipeline_stage", None),
            "last": getattr(config, "num_layers_in_last_pipeline_stage", None)}


def check_layout(config, *, tp: int = 1, pp: int = 1, ep: int = 1, schedule: str = "1f1b",
                 first: Optional[int] = None, last: Optional[int] = None,
                 vpp: Optional[int] = None, mtp: Optional[int] = None,
                 world: Optional[int] = None, world_source: str = "WORLD_SIZE",
                 gpus_per_node: Optional[int] = None, names: Names = FIELDS,
                 schedules: Sequence[str] = SCHEDULES) -> List[int]:
    """Every layout rule for `config` (a Megatron TransformerConfig or anything with its fields)
    on this layout, in a fixed order; returns the decoder layers of each stage. `world` and
    `gpus_per_node` are checked when known (the planner knows both, the converter neither)."""
    check_sizes(tp, pp, ep, vpp, names=names)
    if world is not None:
        check_world_size(world, tp, pp, ep, names=names, source=world_source)
    check_model_split(config, tp, ep, names=names)
    if gpus_per_node is not None:
        check_expert_nodes(ep, gpus_per_node, config, names=names)
    if mtp is None:
        mtp = getattr(config, "mtp_num_layers", None)
    check_schedule(schedule, pp, mtp=mtp, vpp=vpp, names=names, allowed=schedules)
    return stage_layer_counts(config.num_layers, schedule, pp, first, last, vpp, names=names)
