"""The main job (examples/pretrain_tiny.py) at test size: it learns, logs and saves."""

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_dsv3.training.trainer import TrainArgs, Trainer, lr_at

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_tiny_run_loss_falls_and_writes_logs_plots_checkpoint(tmp_path, single_rank_world):
    args = TrainArgs(steps=40, micro_batch_size=8, log_interval=10, save_dir=str(tmp_path / "run"),
                     cache_dir=str(tmp_path / "cache"), corpus_bytes=1 << 20)
    lines = []
    history = Trainer(args, log=lines.append).train()
    first = sum(r["lm_loss"] for r in history[:5]) / 5
    last = sum(r["lm_loss"] for r in history[-5:]) / 5
    assert first > 5.0  # ~ln(256) at initialisation
    assert last < first - 1.5, (first, last)
    assert all(r["mtp_loss"] is not None and r["mtp_loss"][0] > 0 for r in history)
    assert all(len(r["expert_load_max_over_mean"]) == 3 for r in history)  # 2 MoE layers + MTP
    assert any("tok/s" in line and "load max/mean" in line for line in lines)
    run = tmp_path / "run"
    records = [json.loads(l) for l in open(run / "metrics.jsonl")]
    assert [r["step"] for r in records] == list(range(1, 41))
    for name in ("loss.png", "expert_load.png", "checkpoints/step_000040/rank0.pt",
                 "checkpoints/step_000040/checkpoint_manifest.json", "checkpoints/latest.json"):
        assert (run / name).stat().st_size > 0
    ckpt = torch.load(run / "checkpoints" / "step_000040" / "rank0.pt", weights_only=False)
    assert ckpt["step"] == 40
    biases = [k for k in ckpt["models"][0] if k.endswith("router.expert_bias")]
    assert len(biases) == 3 and any(ckpt["models"][0][k].abs().sum() > 0 for k in biases)


def test_lr_schedule_warms_up_then_decays_to_min():
    args = TrainArgs(steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, args) == 0.1 and abs(lr_at(9, args) - 1.0) < 1e-12
    assert abs(lr_at(100, args) - 0.1) < 1e-12
    values = [lr_at(s, args) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_example_cli_parses_flags():
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from pretrain_tiny import parse_args

    args = parse_args(["--steps", "7", "--recompute", "--save-dir", "/tmp/x"])
    assert args.steps == 7 and args.recompute and args.save_dir == "/tmp/x"


def test_the_logged_aux_loss_counts_routers_without_an_expert_bias(tmp_path, single_rank_world):
    """The step's aux_loss summed only routers with an aux-loss-free bias: with the bias off and
    the sequence-wise aux loss on, it read 0. At step 1 the bias is still 0, so both runs route
    alike and log the same aux loss."""
    logged = []
    for bias in (True, False):
        args = TrainArgs(steps=1, micro_batch_size=2, seq_length=32, log_interval=1,
                         save_dir=str(tmp_path / f"run{bias}"), cache_dir=str(tmp_path / "cache"),
                         corpus_bytes=1 << 16,
                         config_overrides={"moe_router_enable_expert_bias": bias})
        logged.append(Trainer(args, log=lambda line: None).train()[0]["aux_loss"])
    assert logged[0] > 0 and logged[1] == logged[0], logged
    # the z-loss (it joins the backward pass too) is counted: alone it read 0
    args = TrainArgs(steps=1, micro_batch_size=2, seq_length=32, save_dir=None,
                     cache_dir=str(tmp_path / "cache"), corpus_bytes=1 << 16,
                     config_overrides={"moe_aux_loss_coeff": 0.0, "moe_z_loss_coeff": 1e-2})
    trainer = Trainer(args, log=lambda line: None)
    aux = trainer.train()[0]["aux_loss"]
    z = sum(float(m.last_z_loss) for m in trainer.models[0].modules()
            if getattr(m, "last_z_loss", None) is not None)
    assert aux > 0 and aux == pytest.approx(z, rel=1e-6), (aux, z)
