"""Selective recomputation under Megatron's own `recompute_modules` names.

`layernorm` (the RMSNorms in front of attention and MLP), `mla_up_proj` (MLA's query and KV
up-projections with RoPE) and `moe_act` (SwiGLU of routed experts, shared expert and dense MLP)
keep only their inputs: the output lives while the next module's forward needs it, its storage is
then released, and it is recomputed into the same storage just before the next module's backward
reads it. The recomputed functions are deterministic, so gradients are bit-identical.
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch

SUPPORTED = ("layernorm", "mla_up_proj", "moe_act")


def recompute_enabled(config, name: str) -> bool:
    return (getattr(config, "recompute_granularity", None) == "selective"
            and name in (getattr(config, "recompute_modules", None) or ()))


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
        outputs = _Discardable.apply(self, *inputs)
        self.outputs = _as_tuple(outputs)
        return outputs

    def release(self, consumer_output: torch.Tensor) -> None:
        """Free the outputs' storage now that `consumer_output` (which saved them) exists; they
        are recomputed when the gradient of `consumer_output` arrives."""
        if not consumer_output.requires_grad:
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
    if recompute_enabled(config, name) and torch.is_grad_enabled():
        holder = DiscardedOutput(fn)
        return holder, holder.release
    return fn, lambda _consumer_output: None
