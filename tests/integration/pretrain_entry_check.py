"""Megatron-LM's parse_args with megatron_dsv3.pretrain_gpt's extra-args hook, then our
model_provider, on CPU (gloo, world size 1). Run as: python pretrain_entry_check.py <Megatron-LM
checkout> [extra flags...]; prints one JSON line with the findings."""

import inspect
import json
import os
import sys

import megatron_dsv3  # noqa: F401
import megatron.core  # noqa: F401  (the installed megatron-core, not the checkout's copy)

MLM, EXTRA = sys.argv[1], sys.argv[2:]
sys.path.insert(0, MLM)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from megatron_dsv3 import pretrain_gpt as entry  # noqa: E402

from tiny_args_check import TINY, parse_megatron_args  # noqa: E402

argv = TINY + EXTRA
entry.parse_dsv3_args(argv)
args = parse_megatron_args(argv, extra_args_provider=entry.add_dsv3_args)

import megatron.training.training as training  # noqa: E402
from megatron.core.pipeline_parallel import schedules  # noqa: E402

from megatron_dsv3.model import DeepSeekV3Model  # noqa: E402

torch.manual_seed(0)
model = entry.model_provider(True, True)
config = entry.config_from_args(args)
torch.manual_seed(0)
direct = DeepSeekV3Model(config, use_te=False)
direct.load_state_dict(model.state_dict(), strict=True)
ids = torch.randint(0, 256, (2, 32))
pos = torch.arange(32).expand(2, 32)
model.eval(), direct.eval()
with torch.no_grad():
    loss_entry = model(ids, pos, None, labels=ids).float().mean()
    loss_direct = direct(ids, pos, None, labels=ids).float().mean()
fb = training.get_forward_backward_func()

# One step through the schedule the training loop now uses (forward only: Megatron-LM's default
# dropouts would make training-mode losses random). Megatron-LM's own get_batch moves tensors with
# .cuda(), so this forward step feeds the batch directly.
from megatron_dsv3.testing.megatron_cpu import megatron_schedules_on_cpu  # noqa: E402


def forward_step(data_iterator, model):
    tokens = next(data_iterator)
    out = model(tokens, pos, None, labels=tokens)
    return out, lambda o: (o.float().mean(), {"lm loss": o.float().mean().detach()})


with megatron_schedules_on_cpu(), torch.no_grad():
    losses = fb(forward_step_func=forward_step, data_iterator=iter([ids]), model=[model],
                num_microbatches=1, seq_length=32, micro_batch_size=2, forward_only=True)
print(json.dumps({
    "model_class": type(model).__name__,
    "config_class": type(model.config).__name__,
    "layer_classes": sorted({type(l).__name__ for l in model.decoder.layers}),
    "is_moe": [bool(l.is_moe_layer) for l in model.decoder.layers],
    "has_mtp": getattr(model, "mtp", None) is not None,
    "dsv3": [args.dsv3_dispatcher, args.dsv3_dispatch_chunks, args.dsv3_dispatch_fp8,
             args.pipeline_schedule],
    "ranks_per_node_env": os.environ.get("MEGATRON_DSV3_RANKS_PER_NODE"),
    "loss_entry": loss_entry.item(),
    "loss_direct": loss_direct.item(),
    "schedule": fb.__name__,  # (our loop wrapper keeps the name; inspect.unwrap: the schedule)
    "schedule_loss": float(losses[0]["lm loss"]),
    "schedule_is_mcore": inspect.unwrap(fb) is getattr(schedules, fb.__name__, None),
}))
