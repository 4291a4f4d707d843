"""Megatron-LM's own parse_args + gpt_builder on a checkout with patches/ applied, on CPU:
`--spec megatron_dsv3.layer_specs` (one token) with `--mtp-num-layers 1` and
`--pipeline-schedule`. Run as: python patched_spec_check.py <patched checkout> [flags...]; prints
one JSON line."""

import json
import os
import sys

import megatron_dsv3  # noqa: F401
import megatron.core  # noqa: F401  (the installed megatron-core, not the checkout's copy)

MLM, EXTRA = sys.argv[1], sys.argv[2:]
sys.path.insert(0, MLM)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from tiny_args_check import TINY, parse_megatron_args  # noqa: E402

args = parse_megatron_args(["--spec", "megatron_dsv3.layer_specs"] + TINY + EXTRA)

import megatron.training.training as training  # noqa: E402
from gpt_builders import gpt_builder  # noqa: E402

torch.manual_seed(0)
model = gpt_builder(args, True, True)
fb = training.get_forward_backward_func()
print(json.dumps({
    "spec": args.spec,
    "layer_classes": sorted({type(l).__name__ for l in model.decoder.layers}),
    "mtp_layer_classes": sorted({type(m).__name__ for l in getattr(model, "mtp").layers
                                 for m in l.modules() if "DeepSeek" in type(m).__name__
                                 or "MultiTokenPrediction" in type(m).__name__}),
    "mtp_transformer_layers": sorted({type(l.transformer_layer).__name__
                                      for l in model.mtp.layers
                                      if hasattr(l, "transformer_layer")}),
    "schedule": fb.__module__ + "." + fb.__name__,
}))
