"""The three GEMMs of a linear layer, behind one small strategy object.

A linear layer y = x W^T runs three GEMMs: forward (fprop), input gradient (dgrad) and weight
gradient (wgrad). Keeping them behind `Gemm` lets the FP8 recipe swap in quantised GEMMs and lets
the pipeline schedules defer wgrad (zero-bubble), without either knowing about the other.
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional

import torch


def _onednn_linear():
    """torch's oneDNN linear kernel (`mkldnn::_linear_pointwise`), or None where this torch has
    none or `MEGATRON_DSV3_CPU_GEMM=torch` asks for torch's default (MKL) GEMM (read once, at
    import)."""
    choice = os.environ.get("MEGATRON_DSV3_CPU_GEMM", "auto")
    if choice not in ("auto", "torch"):
        raise ValueError(f"MEGATRON_DSV3_CPU_GEMM={choice!r}: allowed values are 'auto' (oneDNN's "
                         "kernel for large float32 CPU GEMMs where torch has it) and 'torch'")
    if choice == "torch":
        return None
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


ONEDNN_LINEAR = _onednn_linear()
ONEDNN_MIN_FLOPS = 1 << 24
"""Smaller float32 CPU GEMMs keep torch's default: below ~16 MFLOP oneDNN's per-call set-up
costs more than its faster kernel saves (2 cores: [256, 64] x [64, 256] as a weight gradient
67 us against 59)."""


def matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b[N, K]^T -> [M, N] (a and b may be transposed views). float32 CPU GEMMs of at
    least `ONEDNN_MIN_FLOPS` run on oneDNN's kernel: the same float32 products and float32
    accumulation as torch's default (MKL) GEMM, in another order, and on CPUs where MKL takes its
    slower code path much faster (AMD EPYC Zen 5, 2 cores: 372-418 GFLOP/s against 163-199 for
    [1024, 256] x [256, 512] forward and input gradient, 258 against 174 as a weight gradient:
    docs/benchmarks.md). `MEGATRON_DSV3_CPU_GEMM=torch` keeps torch's default everywhere. Not
    differentiable through oneDNN: inputs that autograd tracks take torch's GEMM."""
    if ONEDNN_LINEAR is not None and a.dtype is torch.float32 and b.dtype is torch.float32 \
            and a.device.type == "cpu" and b.device.type == "cpu" \
            and 2 * a.shape[0] * a.shape[1] * b.shape[0] >= ONEDNN_MIN_FLOPS \
            and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)):
        return ONEDNN_LINEAR(a, b, None, "none", [], "")
    return a @ b.t()


class Gemm:
    """Plain GEMMs in the inputs' dtype. Shapes: x [M, K], w [N, K], dy [M, N]."""

    name = "default"

    def fprop(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return matmul_nt(x, w)

    def dgrad(self, dy: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return matmul_nt(dy, w.t())

    def wgrad(self, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return matmul_nt(dy.t(), x.t())

    # -- grouped entry points (routed experts: rows sorted by group, w [G, N, K]) --------------
    # By default one GEMM per group through the methods above; a strategy overrides them to
    # batch work across groups (e.g. quantise every expert's weight at once) or to call a
    # grouped kernel. counts: rows per group (host integers).

    def grouped_fprop(self, x: torch.Tensor, w: torch.Tensor, counts: List[int]) -> torch.Tensor:
        outs = [self.fprop(xg, w[g]) for g, xg in enumerate(torch.split(x, counts, dim=0))]
        return torch.cat(outs, 0) if outs else x.new_zeros(0, w.shape[1])

    def grouped_dgrad(self, dy: torch.Tensor, w: torch.Tensor, counts: List[int]) -> torch.Tensor:
        return torch.cat([self.dgrad(dyg, w[g])
                          for g, dyg in enumerate(torch.split(dy, counts, dim=0))], 0)

    def grouped_wgrad(self, dy: torch.Tensor, x: torch.Tensor, counts: List[int],
                      w: torch.Tensor) -> torch.Tensor:
        """-> [G, N, K] like `w` (zeros for a group without rows)."""
        return torch.stack([self.wgrad(dyg, xg) if n else torch.zeros_like(w[g])
                            for g, (dyg, xg, n) in enumerate(zip(torch.split(dy, counts, dim=0),
                                                                 torch.split(x, counts, dim=0),
                                                                 counts))])


DEFAULT_GEMM = Gemm()


class _Deferring:
    """WeightGradStore.deferring's block (a class, not a generator: the pipeline enters one per
    backward pass)."""

    __slots__ = ("store", "enabled", "previous")

    def __init__(self, store, enabled: bool):
        self.store, self.enabled = store, enabled

    def __enter__(self) -> None:
        self.previous, self.store._enabled = self.store._enabled, self.enabled

    def __exit__(self, *exc) -> bool:
        self.store._enabled = self.previous
        return False


class WeightGradStore:
    """Deferred weight-gradient work (zero-bubble pipelining).

    Inside `WeightGradStore.deferring()`, linear layers of ours queue their wgrad GEMM instead of
    running it during backward (`defer`); the schedule later calls `flush()` to close the queue as
    one unit of W work and `pop()` to run the oldest unit where its timeline has a gap. A deferred
    gradient reaches its parameter the way autograd's would (`accumulate_grad`), so Megatron's
    DistributedDataParallel sees it like any other.
    """

    _enabled = False
    _pending: List[Callable[[], None]] = []
    _units: List[List[Callable[[], None]]] = []

    @classmethod
    def deferring(cls, enabled: bool = True) -> "_Deferring":
        """`with WeightGradStore.deferring(enabled):` deferral on (or off) inside the block."""
        return _Deferring(cls, enabled)

    @classmethod
    def is_deferring(cls) -> bool:
        return cls._enabled

    @classmethod
    def put(cls, fn: Callable[[], None]) -> None:
        cls._pending.append(fn)

    @classmethod
    def defer(cls, param: torch.nn.Parameter,
              weight_grad: Callable[[], torch.Tensor]) -> Optional[torch.Tensor]:
        """Queue `accumulate_grad(param, weight_grad())`; -> what the deferring backward returns
        for `param` now (`placeholder_grad`)."""
        cls.put(lambda: accumulate_grad(param, weight_grad()))
        return placeholder_grad(param)

    @classmethod
    def flush(cls) -> None:
        cls._units.append(cls._pending)
        cls._pending = []

    @classmethod
    def pop(cls) -> None:
        if not cls._units:
            raise RuntimeError("WeightGradStore.pop() with no deferred weight-gradient unit")
        # as inside autograd's backward: no graph recorded, and the GEMMs see untracked inputs
        # (matmul_nt keeps torch's GEMM for tracked ones: a deferred gradient would otherwise
        # differ from an immediate one in the last bits)
        with torch.no_grad():
            for fn in cls._units.pop(0):
                fn()

    @classmethod
    def size(cls) -> int:
        return len(cls._units)

    @classmethod
    def clear(cls) -> None:
        cls._pending, cls._units = [], []

    @classmethod
    def check_drained(cls, where: str) -> None:
        """RuntimeError unless every deferred weight gradient has run: queued work left at the
        end of a step would never reach its parameters (their gradients would stay the
        placeholders). The queue is cleared either way."""
        left = len(cls._pending) + sum(len(u) for u in cls._units)
        if left:
            units = len(cls._units) + bool(cls._pending)
            cls.clear()
            raise RuntimeError(f"{where}: {left} deferred weight-gradient GEMMs in {units} "
                               "unit(s) were never run (WeightGradStore.flush/pop): their "
                               "gradients would be lost")


def accumulate_grad(param: torch.nn.Parameter, grad: torch.Tensor) -> None:
    """Add a weight gradient computed outside autograd's backward, the way autograd would have:
    through the parameter's own gradient accumulator (AccumulateGrad), so every hook on it runs
    as in a backward: Megatron's DistributedDataParallel adds the gradient into `main_grad` and,
    with overlap_grad_reduce, marks it ready for its bucket's reduction; post-accumulate-grad
    hooks run too."""
    torch.autograd.backward(param, grad.to(param.dtype))


def placeholder_grad(param: torch.nn.Parameter) -> Optional[torch.Tensor]:
    """The gradient a backward returns for `param` when its real one is deferred.

    Autograd runs `param`'s AccumulateGrad (and the hooks on it) whether or not a gradient
    arrives. Without Megatron's DDP nothing needs one: None. Under DDP (which gave the param a
    `main_grad`) the hook adds `param.grad` into main_grad and, with overlap_grad_reduce, refuses
    a missing gradient: zeros, which change no sum. The real gradient follows through the same
    hook at W (`accumulate_grad`); the counts of DDP's readiness marks are the same every step,
    and a param's last mark is its last contribution, so a bucket is reduced only when complete.
    """
    return torch.zeros_like(param) if hasattr(param, "main_grad") else None


class LinearFunction(torch.autograd.Function):
    """y = x W^T with pluggable GEMMs and optional wgrad deferral."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, gemm: Gemm):
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        ctx.save_for_backward(x2d, weight)
        ctx.gemm, ctx.shape = gemm, shape
        return gemm.fprop(x2d, weight).view(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2d, weight = ctx.saved_tensors
        gemm: Gemm = ctx.gemm
        dy2d = dy.reshape(-1, dy.shape[-1])
        dx = gemm.dgrad(dy2d, weight).view(ctx.shape) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            if WeightGradStore.is_deferring():
                dw = WeightGradStore.defer(weight, lambda: gemm.wgrad(dy2d, x2d))
            else:
                dw = gemm.wgrad(dy2d, x2d)
        return dx, dw, None


def linear(x: torch.Tensor, weight: torch.Tensor, gemm: Optional[Gemm] = None) -> torch.Tensor:
    return LinearFunction.apply(x, weight, gemm or DEFAULT_GEMM)


class SharedInputLinearFunction(torch.autograd.Function):
    """[y_1 | y_2 | ...] = x [W_1; W_2; ...]^T: linear layers that read the same input, as one GEMM
    per pass (forward, input gradient, weight gradient) over their stacked weights, in plain
    GEMMs. The input gradient comes out of one GEMM already summed over the layers (no separate
    products to add), and each weight gets its rows of the one weight-gradient GEMM, deferred as
    one unit under WeightGradStore like any linear layer's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, *weights: torch.Tensor):
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        stacked = torch.cat(weights, 0)
        ctx.save_for_backward(x2d, stacked)
        ctx.shape, ctx.rows = shape, [w.shape[0] for w in weights]
        ctx.weights = weights
        return matmul_nt(x2d, stacked).view(*shape[:-1], stacked.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2d, stacked = ctx.saved_tensors
        dy2d = dy.reshape(-1, dy.shape[-1])
        dx = matmul_nt(dy2d, stacked.t()).view(ctx.shape) if ctx.needs_input_grad[0] else None
        weights, rows = ctx.weights, ctx.rows
        need = [ctx.needs_input_grad[1 + i] for i in range(len(weights))]
        if not any(need):
            return (dx,) + (None,) * len(weights)

        def weight_grads():
            return torch.split(matmul_nt(dy2d.t(), x2d.t()), rows, 0)

        if WeightGradStore.is_deferring():
            def deferred():
                for w, g, n in zip(weights, weight_grads(), need):
                    if n:
                        accumulate_grad(w, g)
            WeightGradStore.put(deferred)
            return (dx,) + tuple(placeholder_grad(w) if n else None for w, n in zip(weights, need))
        return (dx,) + tuple(g if n else None for g, n in zip(weight_grads(), need))


def shared_input_linear(x: torch.Tensor, weights: List[torch.Tensor]) -> torch.Tensor:
    """x [..., K], weights [N_i, K] -> [..., sum N_i]: `SharedInputLinearFunction`."""
    return SharedInputLinearFunction.apply(x, *weights)
