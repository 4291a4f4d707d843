"""The training job over several gloo ranks equals the single-process job, and resumes exactly."""

import math

import pytest
import torch

from megatron_dsv3.testing.distributed import run_distributed
from megatron_dsv3.training.trainer import TrainArgs, Trainer


def _args(tmp, **kw):
    base = dict(steps=4, micro_batch_size=4, micro_batches=1, seq_length=64, log_interval=100,
                save_dir=None, cache_dir=str(tmp / "cache"), corpus_bytes=1 << 19, warmup_steps=2,
                watchdog_timeout=60.0)  # (slow allowance 180 s < the launcher's timeout)
    base.update(kw)
    return TrainArgs(**base)


def _train(rank, world, args):
    return [(r["lm_loss"], r["mtp_loss"][0], r["grad_norm"]) for r in Trainer(args).train()]


def test_data_parallel_zero1_matches_single_process(tmp_path, single_rank_world):
    single = [(r["lm_loss"], r["mtp_loss"][0], r["grad_norm"])
              for r in Trainer(_args(tmp_path, micro_batches=2)).train()]
    results = run_distributed(_train, 2, args=(_args(tmp_path, zero1=True),), megatron_parallel={})
    assert results[0] == results[1]
    # Same samples, same weights; only the order of the gradient all-reduce differs.
    for (a, b, c), (x, y, z) in zip(single, results[0]):
        assert math.isclose(a, x, rel_tol=2e-5) and math.isclose(b, y, rel_tol=2e-5)
        assert math.isclose(c, z, rel_tol=2e-4)


def test_expert_parallel_gradients_are_the_single_process_ones(tmp_path, single_rank_world):
    """--ep 2 over 2 ranks (dp 2): each expert's local gradient sums both ranks' tokens, and is
    divided by the data-parallel size like the dense ones. Before, it was divided by the
    expert-data-parallel size (1 here): expert gradients twice too large, a larger gradient norm
    from the first step (identical weights) and a drifting trajectory."""
    single = [(r["lm_loss"], r["mtp_loss"][0], r["grad_norm"])
              for r in Trainer(_args(tmp_path, micro_batches=2)).train()]
    results = run_distributed(_train, 2, args=(_args(tmp_path, ep=2),))  # the trainer's layout
    assert results[0] == results[1]
    for (a, b, c), (x, y, z) in zip(single, results[0]):
        assert math.isclose(a, x, rel_tol=2e-5) and math.isclose(b, y, rel_tol=2e-5)
        assert math.isclose(c, z, rel_tol=2e-5), (c, z)


def test_bf16_gradients_accumulate_in_float32(tmp_path, single_rank_world):
    """--bf16: each micro-batch's gradient is computed in BF16 and added into float32 (as
    DeepSeek-V3 and Megatron's main_grad accumulate), so two micro-batches on one rank give the
    gradient norm of one micro-batch on each of two data-parallel ranks (summed in float32 by the
    all-reduce). Accumulated in BF16 they differed by ~1e-4 from the first step."""
    single = [r["grad_norm"] for r in Trainer(_args(tmp_path, micro_batches=2, bf16=True,
                                                    steps=2)).train()]
    results = run_distributed(_train, 2, args=(_args(tmp_path, bf16=True, steps=2),),
                              megatron_parallel={})
    assert math.isclose(single[0], results[0][0][2], rel_tol=1e-6), (single, results[0])


def _other_layout(rank, world, args):
    with pytest.raises(ValueError, match=r"expert_model_parallel_size=1 \(asked: 2\)"):
        Trainer(args)
    return True


def test_a_parallel_state_of_another_layout_is_refused(tmp_path):
    """Megatron's parallel_state set up before the trainer (here with expert parallelism 1): the
    trainer asked for --ep 2 went on without it, silently."""
    assert run_distributed(_other_layout, 2, args=(_args(tmp_path, ep=2),),
                           megatron_parallel={}) == [True, True]


def _interrupted(rank, world, tmp):
    first = Trainer(_args(tmp, steps=6, exit_interval=3, save_dir=str(tmp / "run"),
                          zero1=True)).train()
    resumed = Trainer(_args(tmp, steps=6, save_dir=str(tmp / "run"), zero1=True,
                            resume="auto")).train()
    return [r["lm_loss"] for r in first + resumed]


def _straight(rank, world, tmp):
    return [r["lm_loss"] for r in Trainer(_args(tmp, steps=6, zero1=True)).train()]


def test_resume_continues_with_identical_losses(tmp_path):
    straight = run_distributed(_straight, 2, args=(tmp_path,), megatron_parallel={})[0]
    resumed = run_distributed(_interrupted, 2, args=(tmp_path,), megatron_parallel={})[0]
    assert resumed == straight  # bit-identical: model, router bias, MTP, optimizer shards, step


def test_interrupted_save_keeps_the_last_good_checkpoint(tmp_path, single_rank_world, monkeypatch):
    trainer = Trainer(_args(tmp_path, steps=2, save_dir=str(tmp_path / "run")))
    trainer.train()
    good = tmp_path / "run" / "checkpoints" / "step_000002" / "rank0.pt"
    before = good.read_bytes()
    trainer.step += 1

    def fail(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        trainer.save()
    assert trainer.store.latest() == str(good.parent)
    assert good.read_bytes() == before
    assert torch.load(good, weights_only=False)["step"] == 2


def test_the_mtp_loss_masks_what_the_lm_loss_masks(tmp_path, single_rank_world):
    """A loss mask with zeros (end-of-document or padding masking): the trainer's MTP loss
    leaves those positions out, as its LM loss does (it was computed over every position)."""
    from megatron_dsv3.model import build_model

    trainer = Trainer(_args(tmp_path, steps=1))
    unmasked = trainer.micro_batch

    def masked(step, j):
        batch = unmasked(step, j)
        batch["loss_mask"][:, -24:] = 0
        return batch

    trainer.micro_batch = masked
    model = build_model(trainer.config)  # the trainer's initial weights (keyed initialisation)
    model.load_state_dict(trainer.models[0].state_dict())
    batch = masked(0, 0)
    with torch.no_grad():
        model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
              loss_mask=batch["loss_mask"])
    want = float(model.pop_mtp_losses()[0])
    with torch.no_grad():
        model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    assert abs(float(model.pop_mtp_losses()[0]) - want) > 1e-4  # the mask matters here
    record = trainer.train_step()
    assert math.isclose(record["mtp_loss"][0], want, rel_tol=1e-6)
