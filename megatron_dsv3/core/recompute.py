"""Selective recomputation under Megatron's own `recompute_modules` names.

`layernorm` (the RMSNorms in front of attention and MLP), `mla_up_proj` (MLA's query and KV
up-projections with RoPE) and `moe_act` (SwiGLU of routed experts, shared expert and dense MLP)
keep only their inputs: the output lives while the next module's forward needs it, its storage is
then released, and it is recomputed into the same storage just before the next module's backward
reads it. The recomputed functions are deterministic, so gradients are bit-identical.

`core_attn` (the attention core, the default of Megatron's `recompute_modules`), `mlp` (the dense
MLP of non-MoE layers) and `shared_experts` (the MoE layer's shared expert) use ordinary
checkpointing, as Megatron does: only the inputs are kept and the whole module runs again in
backward (`checkpointed`, reentrant like Megatron's; the RNG states are restored, those of
Megatron's model-parallel RNG tracker too, so dropout draws the same mask). Inside such a region
the output-discarding recomputation of the modules above is off (the region keeps none of their
outputs anyway).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Tuple

import torch

from megatron_dsv3.upstream_flags import RECOMPUTE_MODULES, recompute_modules

SUPPORTED = RECOMPUTE_MODULES
_state = threading.local()


def recompute_enabled(config, name: str) -> bool:
    """Megatron's rule: recompute_granularity='selective' and `name` in recompute_modules (None
    means Megatron's default ['core_attn'])."""
    if getattr(config, "recompute_granularity", None) != "selective":
        return False
    return name in recompute_modules(config)


@contextlib.contextmanager
def _inside_checkpoint():
    previous = getattr(_state, "inside", False)
    _state.inside = True
    try:
        yield
    finally:
        _state.inside = previous


def _rng_tracker():
    """Megatron's model-parallel RNG tracker (where TE's and Megatron's attention cores draw their
    dropout) when one was set up, else None; never one made here (its kind is chosen once, by
    Megatron's initialisation)."""
    try:
        from megatron.core.tensor_parallel import random
    except ImportError:
        return None
    tracker = getattr(random, "_CUDA_RNG_STATE_TRACKER", None)
    if not getattr(random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", False) or tracker is None:
        return None
    return tracker if tracker.is_initialized() else None


class _Checkpoint(torch.autograd.Function):
    """Reentrant checkpoint (as Megatron's): forward runs `run` without autograd, keeping its
    tensor inputs and the RNG states; backward runs it again with autograd from the same RNG
    states and back-propagates through the fresh graph. Weight gradients inside reach their
    parameters by that nested backward, so zero-bubble deferral (WeightGradStore) sees ordinary
    backward passes of our linear layers."""

    @staticmethod
    def forward(ctx, run, *args):
        ctx.run = run
        ctx.tensor_at = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        ctx.others = [None if isinstance(a, torch.Tensor) else a for a in args]
        ctx.save_for_backward(*(args[i] for i in ctx.tensor_at))
        ctx.cpu_rng = torch.get_rng_state()
        cuda = [a.device for a in args if isinstance(a, torch.Tensor) and a.is_cuda]
        ctx.cuda_device = cuda[0] if cuda else None
        ctx.cuda_rng = torch.cuda.get_rng_state(ctx.cuda_device) if cuda else None
        tracker = _rng_tracker()
        ctx.tracker_states = None if tracker is None else tracker.get_states()
        with torch.no_grad():
            return run(*args)

    @staticmethod
    def backward(ctx, *grads):
        args = list(ctx.others)
        for i, t in zip(ctx.tensor_at, ctx.saved_tensors):
            args[i] = t.detach().requires_grad_(t.requires_grad)
        devices = [ctx.cuda_device] if ctx.cuda_device is not None else []
        tracker = None if ctx.tracker_states is None else _rng_tracker()
        current = None if tracker is None else tracker.get_states()
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.cuda_device)
            if tracker is not None:  # (the forward's tracker states; the current ones after)
                tracker.set_states(dict(ctx.tracker_states))
            try:
                with torch.enable_grad():
                    outputs = ctx.run(*args)
            finally:
                if tracker is not None:
                    tracker.set_states(current)
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None,) + tuple(a.grad if isinstance(a, torch.Tensor) and a.requires_grad else None
                               for a in args)


def checkpointed(config, name: str, fn: Callable) -> Callable:
    """`fn` itself, or, when `name` is selected for recomputation and autograd records, `fn`
    checkpointed (`_Checkpoint`: inputs kept, the module run again in backward). Keyword
    arguments and non-tensor outputs (e.g. a None bias) pass through."""
    if not (recompute_enabled(config, name) and torch.is_grad_enabled()):
        return fn

    def run(*args, **kwargs):
        if not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            # (e.g. a frozen embedding below): the checkpoint's output would carry no graph to
            # the module's own weights, whose gradients would be lost; run it plainly
            return fn(*args, **kwargs)
        layout = {}

        def tensors_only(*inputs):
            with _inside_checkpoint():
                out = fn(*inputs, **kwargs)
            flat = out if isinstance(out, tuple) else (out,)
            layout.update(is_tuple=isinstance(out, tuple), flat=flat)
            return tuple(o for o in flat if isinstance(o, torch.Tensor))

        tensors = iter(_Checkpoint.apply(tensors_only, *args))
        flat = tuple(next(tensors) if isinstance(o, torch.Tensor) else o for o in layout["flat"])
        is_tuple = layout["is_tuple"]
        # (the layout held the forward's outputs, whose graph holds the closure: a cycle that
        # kept a forward never back-propagated alive until the garbage collector ran)
        layout.clear()
        return flat if is_tuple else flat[0]
    return run


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


class _Discardable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, holder: "DiscardedOutput", *inputs):
        ctx.save_for_backward(*inputs)
        holder.ctx = ctx
        with torch.no_grad():
            outputs = holder.fn(*inputs)
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        inputs, outputs = ctx.recomputed
        ctx.recomputed = None
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None,) + tuple(i.grad if isinstance(i, torch.Tensor) and i.requires_grad else None
                               for i in inputs)


class DiscardedOutput:
    """Run `fn(*inputs)` keeping only the inputs; see the module docstring."""

    def __init__(self, fn: Callable):
        self.fn, self.ctx, self.outputs = fn, None, None

    def __call__(self, *inputs):
        if not any(isinstance(i, torch.Tensor) and i.requires_grad for i in inputs):
            # no input gradient to carry (e.g. a frozen embedding below): run plainly, so the
            # region's own weights keep their gradients, and keep the outputs
            self.outputs = None
            return self.fn(*inputs)
        outputs = _Discardable.apply(self, *inputs)
        self.outputs = _as_tuple(outputs)
        return outputs

    def release(self, consumer_output: torch.Tensor) -> None:
        """Free the outputs' storage now that `consumer_output` (which saved them) exists; they
        are recomputed when the gradient of `consumer_output` arrives."""
        if not consumer_output.requires_grad or self.outputs is None:
            return
        for out in self.outputs:
            out.untyped_storage().resize_(0)
        consumer_output.register_hook(self._recompute)

    def _recompute(self, grad):
        ctx, self.ctx = self.ctx, None
        if ctx is None:
            return grad
        inputs = tuple(t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors)
        with torch.enable_grad():
            fresh = _as_tuple(self.fn(*inputs))
        for out, new in zip(self.outputs, fresh):
            storage = out.untyped_storage()
            storage.resize_(new.untyped_storage().size())
            storage.copy_(new.untyped_storage())
        ctx.recomputed = (inputs, fresh)
        self.outputs = None
        return grad


def recompute_region(config, name: str, fn: Callable) -> Tuple[Callable, Callable]:
    """(run, release): `run(*inputs)` computes fn; call `release(consumer_output)` once the module
    consuming the result has run forward. Without recomputation both are the plain function and a
    no-op."""
    if (recompute_enabled(config, name) and torch.is_grad_enabled()
            and not getattr(_state, "inside", False)):
        holder = DiscardedOutput(fn)
        return holder, holder.release
    return fn, lambda _consumer_output: None
