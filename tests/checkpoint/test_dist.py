"""Megatron distributed checkpoints of our model: saved at (PP, EP) = (2, 2), loaded at (1, 1)
and at (1, 4), the logits are those of the model that was saved."""

import os
import time

import pytest
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


def _dualpipe_save(rank, world, ckpt_dir, seed):
    from megatron_dsv3.checkpoint import dist
    from megatron_dsv3.model_chunks import build_model_chunks

    chunks = build_model_chunks(_config(init_seed=seed, mtp_num_layers=None), "dualpipe", rank,
                                world)
    dist.save(chunks, ckpt_dir)
    return True


def _dualpipe_load(rank, world, ckpt_dir):
    from megatron_dsv3.checkpoint import dist
    from megatron_dsv3.model_chunks import build_model_chunks
    from megatron_dsv3.testing.pipeline_checks import global_name

    chunks = build_model_chunks(_config(init_seed=999, mtp_num_layers=None), "dualpipe", rank,
                                world)
    dist.load(chunks, ckpt_dir)
    return {global_name(c, name): p.detach().clone()
            for c in chunks for name, p in c.named_parameters()}


def _single(rank, world, ckpt_dir, what):
    from megatron_dsv3.checkpoint import dist
    from megatron_dsv3.model import DeepSeekV3Model

    if what == "save":
        dist.save([DeepSeekV3Model(_config(init_seed=11, mtp_num_layers=None))], ckpt_dir)
        return True
    model = DeepSeekV3Model(_config(init_seed=999, mtp_num_layers=None))
    dist.load([model], ckpt_dir)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_dualpipe_chunks_save_and_load_their_mirrored_copies_once(tmp_path, single_rank_world):
    """DualPipe keeps every stage twice (chunk 0 of rank s, chunk 1 of rank P-1-s): both copies
    claimed to be the main one, and megatron-core refused every save and load (found by review).
    The second copy is a replica: a DualPipe checkpoint loads into one rank, and back."""
    from megatron_dsv3.model import DeepSeekV3Model

    pp = {"pipeline_model_parallel_size": 2}
    saved, single = str(tmp_path / "dualpipe"), str(tmp_path / "single")
    assert run_distributed(_dualpipe_save, 2, args=(saved, 11), megatron_parallel=pp) == [True] * 2
    reference = DeepSeekV3Model(_config(init_seed=11, mtp_num_layers=None))  # keyed: the same
    loaded = run_distributed(_single, 1, args=(saved, "load"), megatron_parallel={})[0]
    for name, p in reference.named_parameters():
        assert torch.equal(loaded[name], p), name
    assert run_distributed(_single, 1, args=(single, "save"), megatron_parallel={}) == [True]
    for part in run_distributed(_dualpipe_load, 2, args=(single,), megatron_parallel=pp):
        for name, value in part.items():
            assert torch.equal(value, dict(reference.named_parameters())[name]), name


def _load_other_architecture(rank, world, ckpt_dir):
    import pytest

    from megatron_dsv3.checkpoint import dist
    from megatron_dsv3.configs import get_config
    from megatron_dsv3.model import DeepSeekV3Model

    smaller = DeepSeekV3Model(get_config("deepseek-v3-tiny", num_layers=3, mtp_num_layers=None,
                                         first_k_dense_replace=1, moe_aux_loss_coeff=0.0))
    with pytest.raises(ValueError, match="does not fit this model"):
        dist.load([smaller], ckpt_dir)
    return True


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path, single_rank_world):
    """A 4-layer checkpoint into a 3-layer model: megatron-core's default strictness left layer 4
    unread and loaded the rest without a word."""
    ckpt = str(tmp_path / "four")
    assert run_distributed(_single, 1, args=(ckpt, "save"), megatron_parallel={}) == [True]
    assert run_distributed(_load_other_architecture, 1, args=(ckpt,),
                           megatron_parallel={}) == [True]


def _save_refused(rank, world, path):
    import pytest

    from megatron_dsv3.checkpoint import dist

    with pytest.raises(ValueError, match="holds files but no checkpoint_manifest.json"):
        dist.save([], path)  # (rank 1 met a collective timeout instead)
    return True


def test_a_refused_save_is_refused_on_every_rank_at_once(tmp_path, single_rank_world):
    """Rank 0 decides whether `path` may be replaced; every rank raises its refusal (the others
    used to wait in a collective for rank 0 until the timeout)."""
    path = tmp_path / "megatron_lm"
    path.mkdir()
    (path / "latest_checkpointed_iteration.txt").write_text("release")
    assert run_distributed(_save_refused, 2, args=(str(path),), megatron_parallel={}) == [True] * 2
    assert sorted(os.listdir(path)) == ["latest_checkpointed_iteration.txt"]


def _save_fails_on_rank0(rank, world, path, stage):
    import torch.distributed as tdist

    from megatron_dsv3.checkpoint import commit, dist

    if rank == 0 and stage == "publish":  # the publication fails after every rank has written
        point = commit.fault_point

        def failing(label):
            point(label)
            if label.endswith(": publish"):
                raise OSError(28, "No space left on device")
        commit.fault_point = failing
    try:
        dist.save([], path)
        return "saved"
    except Exception as error:  # every rank must raise, at once
        kind = type(error).__name__
    finally:
        if rank == 0 and stage == "publish":
            commit.fault_point = point
    t = torch.ones(1)
    tdist.all_reduce(t)  # the ranks are still paired: the next collective is the same on all
    return kind, float(t)


@pytest.mark.parametrize("stage", ["create", "publish"])
def test_a_file_system_error_on_rank0_is_raised_on_every_rank_at_once(tmp_path,
                                                                      single_rank_world, stage):
    """Only rank 0 makes and publishes the directory. An OSError there (here: the parent is a
    file; no space left when publishing) escaped on rank 0 alone: the others waited out the
    collective timeout in the broadcast or barrier that followed, and the ranks' collectives were
    paired wrongly after. Every rank now raises at once (rank 0 its own error, the others a
    RuntimeError naming it) and the ranks stay paired."""
    if stage == "create":
        (tmp_path / "afile").write_text("")
        path = tmp_path / "afile" / "ckpt"
    else:
        path = tmp_path / "ckpt"
    start = time.monotonic()
    got = run_distributed(_save_fails_on_rank0, 2, args=(str(path), stage), megatron_parallel={},
                          timeout=120)
    assert time.monotonic() - start < 60
    assert got[0][0] in ("NotADirectoryError", "FileNotFoundError", "FileExistsError", "OSError")
    assert got[1] == ("RuntimeError", 2.0) and got[0][1] == 2.0, got
    if stage == "publish":
        assert not path.exists()  # nothing published, the partial directory removed
        assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []
