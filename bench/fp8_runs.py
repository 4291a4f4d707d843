"""What the FP8 benches share (bench/fp8_vs_bf16.py, bench/fp8_fidelity.py and
tests/fp8/test_fidelity.py): training runs of the example trainer with the FP8 recipe on or off
(on CPU or a GPU), the one-rounding nudge of the noise floor, held-out data and loss (from
megatron_dsv3.corpus), the same weights evaluated under another GEMM recipe, and a mean with its
95% confidence interval.

Importable without side effects (bench scripts run with bench/ on sys.path; the test loads it by
path). Megatron-core is imported only inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Dict, List, Optional, Sequence

import torch

# held-out data and loss: used by the benches through this module
from megatron_dsv3.corpus import heldout_batches, heldout_loss  # noqa: F401

# recipe name (as in the tables) -> dsv3_fp8_recipe (None: the config's own precision)
RECIPES = {"bf16": None, "fp8": "deepseek", "fp8-pow2": "deepseek-pow2"}


# -- training -----------------------------------------------------------------------------------
@contextlib.contextmanager
def patched_build_model(transform):
    """While active, megatron_dsv3.model.build_model returns transform(model) (the trainer imports
    build_model when it is constructed, so the patch reaches every Trainer made inside)."""
    import megatron_dsv3.model as model_module

    build = model_module.build_model
    model_module.build_model = lambda config, **kwargs: transform(build(config, **kwargs))
    try:
        yield
    finally:
        model_module.build_model = build


def nudge(model):
    """Embedding [0, 0] x (1 + 2^-7), one BF16 step: the smallest change a run can see (the noise
    floor: how far two runs that differ by one rounding drift apart)."""
    with torch.no_grad():
        model.embedding.word_embeddings.weight[0, 0] *= 1 + 2 ** -7
    return model


def make_trainer(args, device: str = "cpu", nudged: bool = False, log=print):
    """The example trainer (megatron_dsv3.training.trainer.Trainer) for `args`, its model built on
    `device` (before the optimizer takes FP32 master copies) and nudged if asked; its batches
    follow the model to the device. On CUDA the one-rank world is gloo (the trainer's bookkeeping
    collectives use CPU tensors), set up here before the trainer would pick NCCL."""
    from megatron_dsv3.training.trainer import Trainer

    class DeviceTrainer(Trainer):
        def micro_batch(self, step, j):
            return {k: v.to(device) for k, v in super().micro_batch(step, j).items()}

    if device != "cpu":
        _gloo_world()

    def place(model):
        model = model.to(device)
        return nudge(model) if nudged else model

    with patched_build_model(place):
        return DeviceTrainer(args, log=log)


def _gloo_world():
    import os
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    os.environ.setdefault("WORLD_SIZE", "1")


def run(steps, fp8, cache_dir, bf16_moments, seed, nudged=False, device="cpu", log_prefix=None,
        **train_args) -> List[Dict]:
    """One training run; its per-step records (lm_loss, ...). Extra TrainArgs fields as keywords."""
    from megatron_dsv3.training.trainer import TrainArgs

    train_args.setdefault("log_interval", 50)
    args = TrainArgs(steps=steps, bf16=True, bf16_moments=bf16_moments, fp8=fp8, save_dir=None,
                     cache_dir=cache_dir, seed=seed, **train_args)
    prefix = log_prefix if log_prefix is not None else ("fp8 " if fp8 else "bf16 ")
    trainer = make_trainer(args, device, nudged, log=lambda m: print(prefix + m, flush=True))
    return trainer.train()


# -- held-out data and loss ---------------------------------------------------------------------
def config_with(config, recipe: Optional[str] = None, dtype: torch.dtype = torch.bfloat16,
                gemm_backend: Optional[str] = None):
    """A copy of `config` that builds the same model with GEMM recipe `recipe` (dsv3_fp8_recipe:
    None, 'deepseek', 'deepseek-pow2') in `dtype` parameters and activations (bfloat16 or
    float32, whatever `config` trained in), on `gemm_backend` if given. No random initialisation
    (weights are loaded)."""
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"dtype={dtype}: allowed values are torch.bfloat16, torch.float32")
    c = copy.copy(config)
    c.dsv3_fp8_recipe = recipe
    c.perform_initialization = False
    c.bf16, c.fp16 = dtype == torch.bfloat16, False
    c.params_dtype = c.pipeline_dtype = dtype
    if gemm_backend is not None:
        c.dsv3_gemm_backend = gemm_backend
    return c


class SameWeights:
    """One model per evaluation variant (same architecture, different GEMM recipe or dtype);
    `losses(state_dict)` loads the same weights into each and returns {variant: held-out loss}.

    variants: {name: dict(recipe=..., dtype=...)}, as `config_with` takes them."""

    def __init__(self, config, variants: Dict[str, Dict], batches, device="cpu",
                 gemm_backend: Optional[str] = None):
        from megatron_dsv3.model import build_model

        self.batches = batches
        self.models = {name: build_model(config_with(config, gemm_backend=gemm_backend, **v))
                       .to(device) for name, v in variants.items()}

    def losses(self, state_dict) -> Dict[str, float]:
        out = {}
        for name, model in self.models.items():
            model.load_state_dict(state_dict)
            out[name] = heldout_loss(model, self.batches)
        return out


# -- statistics ---------------------------------------------------------------------------------
# two-sided 95% quantiles of Student's t, df = 1..30 (beyond: 1.96 is within 2% of t)
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_ci95(values: Sequence[float]):
    """(mean, half-width of the 95% confidence interval of the mean, by Student's t)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("inf")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = _T95[n - 2] if n - 1 <= len(_T95) else 1.96
    return mean, t * sd / math.sqrt(n)


def smooth(values: Sequence[float], window: int) -> List[float]:
    """Trailing moving average (the first points average what exists)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out
