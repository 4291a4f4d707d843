"""RMSNorm as DeepSeek and HF compute it: statistics in float32, weight applied in the input dtype."""

import torch

from megatron.core.transformer.module import MegatronModule


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
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)
