"""AdamW with moments stored in BF16, as DeepSeek-V3 trains (report section 3.3.3).

Master weights and gradients stay FP32; the first and second moments are kept in `moment_dtype`
(BF16 by default) and every update is computed in FP32 from them:
    m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2          (stored back in moment_dtype)
    p = p (1 - lr wd) - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
Halves the optimizer's moment memory (8 -> 4 bytes per parameter). Parameters must be FP32 (the
master weights); BF16 model weights get FP32 copies from the caller (ZeroOneOptimizer). Megatron-LM's equivalent
flags are --exp-avg-dtype bf16 --exp-avg-sq-dtype bf16 (Transformer Engine's FusedAdam).
"""

from __future__ import annotations

import torch


class AdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, moment_dtype: torch.dtype = torch.bfloat16):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdamW: invalid lr={lr}, betas={betas}, eps={eps} or "
                             f"weight_decay={weight_decay} (allowed: lr, eps, weight_decay >= 0; "
                             "0 <= beta < 1)")
        if moment_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"AdamW: moment_dtype={moment_dtype} is invalid: allowed values are "
                             "torch.bfloat16, torch.float16, torch.float32")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        low = [tuple(p.shape) for g in self.param_groups for p in g["params"]
               if p.dtype != torch.float32]
        if low:
            raise ValueError(f"AdamW: params must be the FP32 master weights (allowed dtype: "
                             f"torch.float32); got lower-precision parameters of shapes {low[:4]}. "
                             "Keep BF16 model weights and hand FP32 copies to the optimizer "
                             "(megatron_dsv3.training.zero.ZeroOneOptimizer does)")
        self.moment_dtype = moment_dtype

    def load_state_dict(self, state_dict):
        # torch casts loaded state to the parameters' dtype; the moments belong in moment_dtype
        # (exact: they were saved from moment_dtype tensors)
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(self.moment_dtype)
            if "step" in state:
                state["step"] = state["step"].clone()

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype)
                state["step"] = state["step"] + 1  # a new tensor: never shared with a loader
                t = state["step"].item()
                g = p.grad.float()
                m = state["exp_avg"].float().mul_(b1).add_(g, alpha=1 - b1)
                v = state["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                update = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
                master = p.float()
                if wd:
                    master.mul_(1 - lr * wd)
                master.add_(update, alpha=-lr)
                p.copy_(master)
        return loss


# Devices and dtypes torch's fused AdamW kernel takes (one pass over parameter, gradient and both
# moments per element instead of about ten foreach passes: ~10x faster on CPU for a few flat
# buffers of a few million values, and what HF transformers' Trainer uses by default).
FUSED_DEVICES = ("cpu", "cuda")
FUSED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def torch_adamw(params_like):
    """torch.optim.AdamW, fused where every tensor of `params_like` allows it (device type in
    FUSED_DEVICES, dtype in FUSED_DTYPES); else the foreach form. -> (constructor, 'fused' |
    'foreach'). Both compute the same update; they may round its last bit differently."""
    import functools

    tensors = list(params_like)
    if tensors and all(t.device.type in FUSED_DEVICES and t.dtype in FUSED_DTYPES
                       for t in tensors):
        return functools.partial(torch.optim.AdamW, fused=True), "fused"
    return torch.optim.AdamW, "foreach"
