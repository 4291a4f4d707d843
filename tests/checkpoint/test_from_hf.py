"""megatron_dsv3.from_hf: one call from an HF checkpoint directory to a loaded model in eval mode
(transformers' logits, no random initialisation, a world set up when none exists), and
checkpoints written by transformers' save_pretrained, which hold no MTP weights although their
config.json keeps num_nextn_predict_layers: loaded without MTP and a warning, unless mtp=True."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import megatron_dsv3
from megatron_dsv3.checkpoint.hf import config_from_hf, load_hf
from megatron_dsv3.model import build_model

from hf_checkpoints import add_mtp_layers, make_hf_checkpoint

IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
POS = torch.arange(12).expand(2, 12)


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def logits(model):
    with torch.no_grad():
        return model(IDS, POS, None)


@pytest.fixture
def saved_by_transformers(tmp_path):
    """transformers' save_pretrained of a config with num_nextn_predict_layers=1: no
    model.layers.2.* tensors (DeepseekV3ForCausalLM has no MTP modules)."""
    path = str(tmp_path / "hf")
    return path, make_hf_checkpoint(path, num_nextn_predict_layers=1)


def test_from_hf_gives_transformers_logits_in_eval_mode(tmp_path, single_rank_world):
    path = str(tmp_path / "hf")
    hf = make_hf_checkpoint(path)
    model = megatron_dsv3.from_hf(path, torch.float32)
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert relative_error(logits(model), hf(input_ids=IDS).logits) < 1e-5


def test_latent_norms_keep_transformers_epsilon_whatever_rms_norm_eps(tmp_path, single_rank_world):
    """transformers (and DeepSeek's reference) build MLA's q/kv latent norms with eps 1e-6 and
    only the layer norms with rms_norm_eps: a config with another rms_norm_eps gives its logits."""
    path = str(tmp_path / "hf")
    hf = make_hf_checkpoint(path, rms_norm_eps=0.5)  # large, so that the latent eps shows
    model = megatron_dsv3.from_hf(path, torch.float32)
    assert model.config.layernorm_epsilon == 0.5 and model.config.dsv3_latent_norm_epsilon == 1e-6
    reference = hf(input_ids=IDS).logits
    assert relative_error(logits(model), reference) < 1e-5
    # the control: latent norms at rms_norm_eps (Megatron's MLA) are measurably another model
    wrong = build_model(config_from_hf(path, torch.float32, dsv3_latent_norm_epsilon=0.5))
    wrong.load_state_dict(model.state_dict())
    assert relative_error(logits(wrong.eval()), reference) > 1e-3


def test_from_hf_defaults_to_bfloat16(tmp_path, single_rank_world):
    path = str(tmp_path / "hf")
    hf = make_hf_checkpoint(path)
    model = megatron_dsv3.from_hf(path)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    # (the router and the final norm are kept in float32 by the model itself)
    assert dtypes["embedding.word_embeddings.weight"] == dtypes["output_layer.weight"] == \
        torch.bfloat16
    assert sum(d == torch.bfloat16 for d in dtypes.values()) > len(dtypes) - 3
    assert model.config.bf16 and model.config.params_dtype == torch.bfloat16
    assert relative_error(logits(model).float(), hf(input_ids=IDS).logits) < 0.05


def test_from_hf_draws_no_initial_weights(tmp_path, single_rank_world, monkeypatch):
    path = str(tmp_path / "hf")
    make_hf_checkpoint(path)
    draws = []
    real = torch.Tensor.normal_
    monkeypatch.setattr(torch.Tensor, "normal_",
                        lambda self, *a, **k: draws.append(self.shape) or real(self, *a, **k))
    build_model(config_from_hf(path))
    assert draws, "the control (a model built with its default initialisation) draws weights"
    draws.clear()
    megatron_dsv3.from_hf(path)
    assert draws == []


def test_from_hf_sets_up_a_one_rank_world_when_none_exists(tmp_path):
    path = str(tmp_path / "hf")
    hf = make_hf_checkpoint(path)
    expected = hf(input_ids=IDS).logits
    torch.save((IDS, POS, expected), tmp_path / "io.pt")
    script = (
        "import sys, torch, megatron_dsv3\n"
        "ids, pos, expected = torch.load(sys.argv[2])\n"
        "model = megatron_dsv3.from_hf(sys.argv[1], torch.float32)\n"
        "with torch.no_grad():\n"
        "    out = model(ids, pos, None)\n"
        "err = ((out - expected).abs().max() / expected.abs().max()).item()\n"
        "assert err < 1e-5, err\n"
        "assert torch.distributed.get_world_size() == 1\n")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "-c", script, path, str(tmp_path / "io.pt")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_import_stays_light():
    done = subprocess.run(
        [sys.executable, "-c", "import sys, megatron_dsv3; "
         "assert 'torch' not in sys.modules and 'megatron.core' not in sys.modules; "
         "assert callable(megatron_dsv3.from_hf)"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


# -- checkpoints without MTP weights --------------------------------------------------------------
def test_transformers_checkpoint_loads_without_mtp_and_says_so(saved_by_transformers,
                                                               single_rank_world):
    path, hf = saved_by_transformers
    with pytest.warns(UserWarning, match=r"model.safetensors holds no MTP weights "
                                         r"\(model.layers.2.\*\) although its config sets "
                                         r"num_nextn_predict_layers=1.*pass mtp=True"):
        model = megatron_dsv3.from_hf(path, torch.float32)
    assert not model.config.mtp_num_layers and model.mtp_process is False
    assert relative_error(logits(model), hf(input_ids=IDS).logits) < 1e-5


def test_config_from_hf_then_load_hf_also_leaves_out_the_absent_mtp(saved_by_transformers,
                                                                    single_rank_world):
    path, hf = saved_by_transformers
    with pytest.warns(UserWarning, match="holds no MTP weights"):
        config = config_from_hf(path, dtype=torch.float32)
    assert config.mtp_num_layers is None
    model = build_model(config).eval()
    load_hf(model, path)
    assert relative_error(logits(model), hf(input_ids=IDS).logits) < 1e-5


def test_mtp_true_insists_and_names_the_missing_tensors(saved_by_transformers, single_rank_world):
    path, _ = saved_by_transformers
    with pytest.raises(ValueError, match=r"tensor model\.layers\.2\.\S+ is missing from the "
                                         r"checkpoint: .*model\.safetensors does not list it "
                                         r"\(nor \d+ other .*holds no MTP layers"):
        megatron_dsv3.from_hf(path, torch.float32, mtp=True)
    with open(os.path.join(path, "config.json")) as f:
        no_mtp = dict(json.load(f), num_nextn_predict_layers=0)
    with pytest.raises(ValueError, match="mtp=True, but the HF config sets "
                                         "num_nextn_predict_layers=0"):
        config_from_hf(no_mtp, mtp=True)


def test_checkpoint_with_mtp_weights_loads_them_without_a_warning(tmp_path, single_rank_world):
    path = str(tmp_path / "hf")
    hf = make_hf_checkpoint(path)
    add_mtp_layers(path, hf, depth=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = megatron_dsv3.from_hf(path, torch.float32)
    assert not [w for w in caught if "MTP" in str(w.message)]
    assert model.config.mtp_num_layers == 1 and model.mtp_process
    assert relative_error(logits(model), hf(input_ids=IDS).logits) < 1e-5
    # mtp=False leaves them out knowingly (their tensors unread)
    without = megatron_dsv3.from_hf(path, torch.float32, mtp=False)
    assert not without.config.mtp_num_layers
    assert torch.equal(logits(without), logits(model))
    # and so does the config field config_from_hf documents for it (it was refused, naming
    # allow_unused / skip_mtp, which from_hf does not take)
    unset = megatron_dsv3.from_hf(path, torch.float32, mtp_num_layers=None)
    assert not unset.config.mtp_num_layers and torch.equal(logits(unset), logits(model))
    # while a model built without MTP by hand still refuses the unused tensors (nothing dropped
    # silently) unless told
    bare = build_model(config_from_hf(path, dtype=torch.float32, mtp_num_layers=None))
    with pytest.raises(ValueError, match="not used by the model.*skip_mtp=True"):
        load_hf(bare, path)
    load_hf(bare, path, skip_mtp=True)


def _rank_logits(rank, world, path):
    model = megatron_dsv3.from_hf(path, torch.float32)
    assert model.config.tensor_model_parallel_size == 2
    assert model.config.expert_model_parallel_size == 2
    assert model.decoder.layers[1].mlp.experts.num_local_experts == 4  # 8 experts over EP 2
    return logits(model)  # this rank's half of the vocabulary (parallel output)


def test_inside_a_launcher_each_rank_loads_its_tensor_and_expert_parallel_slice(tmp_path):
    from megatron_dsv3.testing import run_distributed

    path = str(tmp_path / "hf")
    hf = make_hf_checkpoint(path)
    halves = run_distributed(_rank_logits, 2, args=(path,), megatron_parallel=dict(
        tensor_model_parallel_size=2, expert_model_parallel_size=2,
        expert_tensor_parallel_size=1))
    assert relative_error(torch.cat(halves, dim=-1), hf(input_ids=IDS).logits) < 1e-5
