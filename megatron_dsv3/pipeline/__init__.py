"""DualPipe and DualPipeV for Megatron: schedules as data, an executor with Megatron's
forward-backward signature, layer placement, a simulator and pictures.

Generic over model chunks: the chunks themselves (DeepSeek-V3's, placed as `StageLayers` says)
come from megatron_dsv3.model_chunks."""

from __future__ import annotations

import functools
from typing import Callable

from megatron_dsv3.pipeline.executor import forward_backward_dualpipe, forward_backward_dualpipev
from megatron_dsv3.pipeline.placement import StageLayers, stage_layer_ranges

NAMES = ("1f1b", "interleaved", "no_pipelining", "dualpipe", "dualpipev")


def get_forward_backward_func(name: str = None, pp_size: int = None, vp_size: int = None, *,
                              overlap: Callable = None) -> Callable:
    """Megatron's own schedules ('1f1b', 'interleaved', 'no_pipelining') or ours ('dualpipe',
    'dualpipev') by name; without a name, Megatron's choice from parallel_state. `overlap`: the
    F&B pair runner ours use (megatron_dsv3.pipeline.overlap; default: one half after the
    other)."""
    from megatron.core.pipeline_parallel import schedules as mcore

    if name is None:
        return mcore.get_forward_backward_func()
    table = {"1f1b": mcore.forward_backward_pipelining_without_interleaving,
             "interleaved": mcore.forward_backward_pipelining_with_interleaving,
             "no_pipelining": mcore.forward_backward_no_pipelining,
             "dualpipe": forward_backward_dualpipe, "dualpipev": forward_backward_dualpipev}
    if name not in table:
        raise ValueError(f"pipeline schedule {name!r} is unknown: allowed values are "
                         f"{', '.join(NAMES)}")
    if overlap is not None and name in ("dualpipe", "dualpipev"):
        return functools.partial(table[name], overlap=overlap)
    return table[name]


def use_in_megatron_training(name: str, overlap: Callable = None) -> None:
    """The one place Megatron-LM's training loop is pointed at our schedule: megatron.training
    calls `get_forward_backward_func()` (imported into megatron.training.training) at every
    train/eval step; it is replaced by one that returns `name`'s schedule (with `overlap` as
    the F&B pair runner of ours)."""
    import megatron.training.training as training

    func = get_forward_backward_func(name, overlap=overlap)
    training.get_forward_backward_func = lambda *a, **k: func


__all__ = ["NAMES", "StageLayers", "forward_backward_dualpipe", "forward_backward_dualpipev",
           "get_forward_backward_func", "stage_layer_ranges", "use_in_megatron_training"]
