"""RMSNorm as DeepSeek and HF compute it: statistics in float32, weight applied in the input dtype.

One autograd node (forward and backward written out) so that the input gradient leaves the norm as
a single tensor: with or without recomputation, the residual stream adds exactly the same terms in
the same order, and only x and 1/rms are kept for backward.
"""

import torch

from megatron.core.transformer.module import MegatronModule


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float):
        ctx.compute = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64
        xf = x.to(ctx.compute)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1]
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        c = ctx.compute
        xhat = x.to(c) * rstd
        dxhat = dy.to(c) * weight.to(c)
        dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
        dw = (dy.to(c) * xhat.to(x.dtype).to(c)).reshape(-1, x.shape[-1]).sum(0)
        return dx.to(x.dtype), dw.to(weight.dtype), None


class RMSNorm(MegatronModule):
    """y = w * x / sqrt(mean(x^2) + eps). Constructor matches Megatron's norm modules."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__(config=config)
        from megatron_dsv3.core.init import param_device

        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device=param_device(config)))
        setattr(self.weight, "sequence_parallel", False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return RMSNormFunction.apply(x, self.weight, self.eps)
