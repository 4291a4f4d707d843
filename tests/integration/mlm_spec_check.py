"""Build our layers through Megatron-LM's own argument parsing and GPT builder (gpt_builders.py),
as `pretrain_gpt.py --spec megatron_dsv3.layer_specs layer_spec ...` does, and compare the result
with DeepSeekV3Model built from the same parsed config. Run as a script: python mlm_spec_check.py
<Megatron-LM checkout> [spec attribute]; prints one JSON line with the findings.
"""

import json
import os
import sys

import megatron_dsv3  # noqa: F401
import megatron.core  # the installed megatron-core, not the checkout's copy

MLM, ATTR = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "layer_spec")
sys.path.insert(0, MLM)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from megatron.training.arguments import core_transformer_config_from_args  # noqa: E402

from tiny_args_check import TINY, parse_megatron_args  # noqa: E402

args = parse_megatron_args(["--spec", "megatron_dsv3.layer_specs", ATTR] + TINY)

from gpt_builders import gpt_builder  # noqa: E402

from megatron_dsv3.model import DeepSeekV3Model  # noqa: E402

torch.manual_seed(0)
mlm_model = gpt_builder(args, True, True)
config = core_transformer_config_from_args(args)
config.vocab_size, config.max_position_embeddings = args.padded_vocab_size, args.seq_length
ours = DeepSeekV3Model(config, mtp_process=False)
missing = ours.load_state_dict(mlm_model.state_dict(), strict=True)

ids = torch.randint(0, 256, (2, 32))
pos = torch.arange(32).expand(2, 32)
mlm_model.eval(), ours.eval()  # Megatron-LM's default dropouts (0.1) are active in training
with torch.no_grad():
    logits_mlm = mlm_model(ids, pos, None)
    logits_ours = ours(ids, pos, None)
mlm_model.train()
loss = mlm_model(ids, pos, None, labels=ids).mean()
loss.backward()
grads = [n for n, p in mlm_model.named_parameters() if p.grad is None]
print(json.dumps({
    "model_class": type(mlm_model).__name__,
    "layer_classes": sorted({type(l).__name__ for l in mlm_model.decoder.layers}),
    "is_moe": [bool(l.is_moe_layer) for l in mlm_model.decoder.layers],
    "max_abs_logit_diff": (logits_mlm - logits_ours).abs().max().item(),
    "loss": loss.item(),
    "params_without_grad": grads,
}))
