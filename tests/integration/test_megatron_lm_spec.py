"""`--spec megatron_dsv3.layer_specs layer_spec` through Megatron-LM's own argument parsing and
GPT builder. Runs when MEGATRON_LM_PATH points at a Megatron-LM checkout (e.g. tag core_v0.16.1,
with triton importable, which Megatron-LM's training package imports); skipped otherwise."""

import json
import math
import os
import subprocess
import sys

import pytest

MLM = os.environ.get("MEGATRON_LM_PATH")
pytestmark = pytest.mark.skipif(not MLM, reason="MEGATRON_LM_PATH not set")


def test_spec_builds_our_layers_through_megatron_lm_builder():
    script = os.path.join(os.path.dirname(__file__), "mlm_spec_check.py")
    proc = subprocess.run([sys.executable, script, MLM, "layer_spec"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["model_class"] == "GPTModel"
    assert result["layer_classes"] == ["DeepSeekV3TransformerLayer"]
    assert result["is_moe"] == [False, True, True]  # --moe-layer-freq ([0]+[1]*2)
    # Same modules, same parameter names: our own model loads its state dict strictly and
    # produces the same logits.
    assert result["max_abs_logit_diff"] == 0.0
    assert abs(result["loss"] - math.log(256)) < 0.5
    assert result["params_without_grad"] == []
