"""Megatron distributed checkpoints of our model: saved at (PP, EP) = (2, 2), loaded at (1, 1)
and at (1, 4), the logits are those of the model that was saved."""

import os

import torch

from megatron_dsv3.testing.distributed import run_distributed


def _config(**kw):
    from megatron_dsv3.configs import get_config

    return get_config("deepseek-v3-tiny", num_layers=4, first_k_dense_replace=1,
                      moe_aux_loss_coeff=0.0, **kw)


def _ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))


def _save(rank, world, hf_dir, ckpt_dir):
    from megatron.core import parallel_state

    from megatron_dsv3.checkpoint import dist
    from megatron_dsv3.checkpoint.hf import load_hf
    from megatron_dsv3.model import DeepSeekV3Model

    pp = parallel_state.get_pipeline_model_parallel_rank()
    cfg = _config(pipeline_model_parallel_size=2, expert_model_parallel_size=2)
    model = DeepSeekV3Model(cfg, pre_process=pp == 0, post_process=pp == 1)
    load_hf(model, hf_dir)  # this rank's layers and experts only
    dist.save([model], ckpt_dir)
    return [l.layer_number for l in model.decoder.layers], model.decoder.layers[-1].mlp.experts.local_expert_offset


def _load(rank, world, ckpt_dir):
    from megatron_dsv3.checkpoint import dist
    from megatron_dsv3.model import DeepSeekV3Model

    cfg = _config(expert_model_parallel_size=world, init_seed=999)  # different initial weights
    model = DeepSeekV3Model(cfg).eval()
    dist.load([model], ckpt_dir)
    ids = _ids()
    with torch.no_grad():
        return model(ids, torch.arange(12).expand(2, 12), None)


def test_save_at_pp2_ep2_load_at_1x1_and_ep4(tmp_path, single_rank_world):
    from megatron_dsv3.checkpoint.hf import save_hf
    from megatron_dsv3.model import DeepSeekV3Model

    torch.manual_seed(0)
    ref = DeepSeekV3Model(_config(init_seed=5)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the keyed initial values of any seed
        for m in ref.modules():
            if getattr(m, "expert_bias", None) is not None:
                m.expert_bias.copy_(0.05 * torch.randn_like(m.expert_bias))
        expected = ref(_ids(), torch.arange(12).expand(2, 12), None)
    hf_dir, ckpt = str(tmp_path / "hf"), str(tmp_path / "dist")
    save_hf(ref, hf_dir, fp8=False)
    os.makedirs(ckpt)
    layout = run_distributed(_save, 4, args=(hf_dir, ckpt),
                             megatron_parallel={"pipeline_model_parallel_size": 2,
                                                "expert_model_parallel_size": 2})
    assert [l[0] for l in layout] == [[1, 2], [1, 2], [3, 4], [3, 4]]
    assert [l[1] for l in layout] == [0, 8, 0, 8]
    single = run_distributed(_load, 1, args=(ckpt,), megatron_parallel={})
    torch.testing.assert_close(single[0], expected, rtol=1e-5, atol=1e-5)
    ep4 = run_distributed(_load, 4, args=(ckpt,),
                          megatron_parallel={"expert_model_parallel_size": 4})
    for logits in ep4:
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
