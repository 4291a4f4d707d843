"""The trainer's checkpoints: no silent overwrite of a run, resume refuses another architecture,
manifests catch damaged files, leftovers of interrupted saves are cleared, and a non-finite loss or
gradient stops training (or is skipped and counted when asked)."""

import json
import os

import pytest
import torch

from megatron_dsv3.checkpoint.commit import CheckpointStore
from megatron_dsv3.checkpoint.errors import CheckpointFileError
from megatron_dsv3.training.trainer import NonFiniteError, TrainArgs, Trainer


def _args(tmp, **kw):
    base = dict(steps=2, save_interval=1, micro_batch_size=2, seq_length=16, log_interval=100,
                warmup_steps=1, corpus_bytes=1 << 18, cache_dir=str(tmp / "cache"),
                save_dir=str(tmp / "run"))
    base.update(kw)
    if base["save_dir"] is None and "save_interval" not in kw:
        base["save_interval"] = 0  # (it writes into save_dir)
    return TrainArgs(**base)


@pytest.fixture
def run(tmp_path, single_rank_world):
    """A finished 2-step run in tmp_path/run (checkpoints of steps 1 and 2); its losses."""
    history = Trainer(_args(tmp_path)).train()
    return tmp_path, [r["lm_loss"] for r in history]


def test_a_new_run_into_a_used_directory_needs_resume_or_overwrite(run):
    tmp, _ = run
    with pytest.raises(ValueError, match="already holds a run.*--resume.*--overwrite"):
        Trainer(_args(tmp))
    with pytest.raises(ValueError, match="exclude each other"):
        Trainer(_args(tmp, resume="auto", overwrite=True))
    assert CheckpointStore(str(tmp / "run" / "checkpoints")).latest_step() == 2  # untouched


def test_overwrite_keeps_the_old_checkpoint_until_the_new_run_publishes(run, monkeypatch):
    tmp, _ = run
    store = CheckpointStore(str(tmp / "run" / "checkpoints"))
    old = store.latest()
    trainer = Trainer(_args(tmp, overwrite=True, steps=1))
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        trainer.train()  # the new run's first save fails
    assert store.latest() == old and os.path.isfile(os.path.join(old, "rank0.pt"))
    monkeypatch.undo()
    Trainer(_args(tmp, overwrite=True, steps=1)).train()
    state = store.read_tracker()
    assert state["step"] == 1 and state["kept"] == [state["latest"]]  # the old run is forgotten
    assert sorted(n for n in os.listdir(store.root) if n.startswith("step_")) == [state["latest"]]


def test_resuming_after_an_overwrite_that_never_published_restores_the_old_metrics(
        run, monkeypatch):
    """--overwrite starts metrics.jsonl afresh; killed before its first checkpoint, the old run's
    checkpoint stays published, and resuming it must bring back its own metrics (each checkpoint
    holds a copy up to its step), not the new run's lines."""
    tmp, losses = run
    metrics = tmp / "run" / "metrics.jsonl"
    trainer = Trainer(_args(tmp, overwrite=True, steps=2, save_interval=2, lr=1e-2))
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        trainer.train()
    monkeypatch.undo()
    new_run = [json.loads(line)["lm_loss"] for line in open(metrics)]
    assert new_run[1] != losses[1]  # metrics.jsonl now holds the new run's steps
    Trainer(_args(tmp, steps=3, resume="auto")).train()
    records = [json.loads(line) for line in open(metrics)]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["lm_loss"] for r in records[:2]] == losses


def test_resume_continues_and_cuts_metrics_to_the_checkpoint(run):
    tmp, losses = run
    metrics = tmp / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:  # a crashed run logged a step its checkpoint does not hold
        f.write(json.dumps({"step": 3, "lm_loss": 0.0}) + "\n" + '{"step": 4, "lm')
    history = Trainer(_args(tmp, steps=4, resume="auto")).train()
    assert [r["step"] for r in history] == [3, 4]
    assert [json.loads(line)["step"] for line in open(metrics)] == [1, 2, 3, 4]


def test_a_resume_at_or_beyond_steps_trains_and_saves_nothing(run):
    """--steps is the run's total length: a resume already there (a requeued finished job) ends
    without writing a checkpoint (which would evict an older real one); a smaller --steps is
    refused naming both steps."""
    tmp, _ = run
    ckpts = tmp / "run" / "checkpoints"
    before = sorted(os.listdir(ckpts))
    assert Trainer(_args(tmp, steps=2, resume="auto")).train() == []
    assert sorted(os.listdir(ckpts)) == before
    with pytest.raises(ValueError, match=r"--steps 1 is below the resumed checkpoint's step 2"):
        Trainer(_args(tmp, steps=1, resume="auto"))
    assert sorted(os.listdir(ckpts)) == before


def test_a_metrics_rewrite_cut_by_a_kill_leaves_no_temporary_copy(run):
    tmp, _ = run
    leftover = tmp / "run" / ".metrics.jsonl.tmp-0123abcd"
    leftover.write_text('{"step": 1}\n')
    Trainer(_args(tmp, steps=3, resume="auto")).train()
    assert not leftover.exists()


def test_complete_checkpoints_without_a_tracker_are_a_run_and_resumable(run):
    """A kill between the first save's rename and its tracker (or a copied-in checkpoint) leaves
    complete step directories and no tracker: a new run there is refused naming them (it used to
    start fresh and the next start deleted them), and --resume takes the newest."""
    tmp, _ = run
    ckpts = tmp / "run" / "checkpoints"
    os.remove(ckpts / "latest.json")
    with pytest.raises(ValueError, match=r"already holds a run \(complete checkpoint\(s\) "
                                         r"step_000001, step_000002 without a tracker"):
        Trainer(_args(tmp, steps=3))
    assert sorted(os.listdir(ckpts)) == ["step_000001", "step_000002"]
    logged = []
    history = Trainer(_args(tmp, steps=3, resume="auto"), log=logged.append).train()
    assert [r["step"] for r in history] == [3]
    assert any("resuming from the newest complete checkpoint there, step_000002" in line
               for line in logged), logged
    assert CheckpointStore(str(ckpts)).latest_step() == 3


def test_resume_refuses_a_different_architecture_naming_each_field(run):
    tmp, _ = run
    change = {"moe_router_topk": 1, "moe_router_num_groups": 1, "moe_router_group_topk": 1}
    with pytest.raises(ValueError) as error:
        Trainer(_args(tmp, steps=3, resume="auto", config_overrides=change))
    message = str(error.value)
    for field in change:
        assert field in message
    assert "checkpoint 2, this run 1" in message  # moe_router_topk of tiny is 2


@pytest.mark.parametrize("change", [{"micro_batch_size": 4}, {"seed": 7},
                                    {"lr": 1e-2, "warmup_steps": 5}, {"bf16_moments": True}])
def test_resume_refuses_other_data_or_optimizer_settings_unless_overridden(run, change):
    """The data position is the step times the batch shape and the schedule continues from the
    step: a resume with other values would silently skip data or jump the schedule."""
    tmp, _ = run
    with pytest.raises(ValueError, match="--override-saved-args") as error:
        Trainer(_args(tmp, steps=3, resume="auto", **change))
    for field in change:
        assert f"--{field.replace('_', '-')}" in str(error.value)
    trainer = Trainer(_args(tmp, steps=3, resume="auto", override_saved_args=True, **change))
    assert trainer.step == 2


def test_resume_refuses_another_layout_even_overridden_and_logs_a_new_length(run):
    """--zero1 (like --pp and --ep: the optimizer shards' layout) is refused whatever
    --override-saved-args says; a new --steps is taken and logged."""
    tmp, _ = run
    for override in (False, True):
        with pytest.raises(ValueError, match=r"was written with --zero1 False; this run has "
                                             r"--zero1 True \(resume with the same layout\)"):
            Trainer(_args(tmp, steps=3, resume="auto", zero1=True, override_saved_args=override))
    lines = []
    trainer = Trainer(_args(tmp, steps=5, resume="auto"), log=lines.append)
    assert trainer.step == 2
    assert any("--steps 2 -> 5" in line and "follow the new length" in line for line in lines)


def test_loading_names_a_truncated_or_corrupted_file(run):
    tmp, _ = run
    latest = CheckpointStore(str(tmp / "run" / "checkpoints")).latest()
    file = os.path.join(latest, "rank0.pt")
    data = bytearray(open(file, "rb").read())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    open(file, "wb").write(bytes(data))
    with pytest.raises(CheckpointFileError, match="rank0.pt.*checksum"):
        Trainer(_args(tmp, steps=3, resume="auto"))
    open(file, "wb").write(bytes(data[:100]))
    with pytest.raises(CheckpointFileError, match="rank0.pt has 100 bytes"):
        Trainer(_args(tmp, steps=3, resume="auto"))


def test_leftovers_of_interrupted_saves_are_cleared_and_the_run_goes_on(run):
    tmp, _ = run
    root = tmp / "run" / "checkpoints"
    (root / ".partial-step_000003-deadbeef").mkdir()
    (root / ".partial-step_000003-deadbeef" / "rank0.pt").write_bytes(b"half")
    (root / ".deleting-step_000001-abc").mkdir()
    (root / ".latest.json.tmp-1234").write_text("{")
    (root / "step_000003").mkdir()  # renamed into place, never published
    Trainer(_args(tmp, steps=3, resume="auto")).train()
    # the unpublished step_000003 was removed at start; the new one took its name
    assert sorted(os.listdir(root)) == ["latest.json", "step_000002", "step_000003"]
    assert CheckpointStore(str(root)).latest_step() == 3
    assert (root / "step_000003" / "checkpoint_manifest.json").is_file()


def test_a_checkpoint_resumed_from_or_without_tracker_is_never_cleared(run):
    """A complete checkpoint copied into a new run directory (no tracker there): resuming from it
    explicitly must not clear it as a leftover, and a complete checkpoint whose tracker is gone
    is left in place too (only a tracker can say a step directory is stale); once the run
    publishes, they are its checkpoints under --keep-checkpoints."""
    import shutil

    tmp, _ = run
    src = CheckpointStore(str(tmp / "run" / "checkpoints")).latest()
    root = tmp / "seeded" / "checkpoints"
    copy = root / "step_000002"
    shutil.copytree(src, copy)
    stray = root / "step_000001"
    shutil.copytree(os.path.join(os.path.dirname(src), "step_000001"), stray)
    trainer = Trainer(_args(tmp, steps=3, save_dir=str(tmp / "seeded"), resume=str(copy)))
    assert (copy / "rank0.pt").is_file() and (stray / "rank0.pt").is_file()  # at start
    history = trainer.train()
    assert [r["step"] for r in history] == [3]
    assert CheckpointStore(str(root)).latest_step() == 3
    # the first publication takes the complete checkpoints it found into the tracker, and
    # --keep-checkpoints (2) keeps the newest: the one resumed from stays a kept checkpoint (it
    # was left out, and the next start cleared it as a leftover), the older stray is pruned
    tracker = json.loads((root / "latest.json").read_text())
    assert tracker["kept"] == ["step_000002", "step_000003"], tracker
    Trainer(_args(tmp, steps=4, save_dir=str(tmp / "seeded"), resume="auto"))  # a next start
    assert sorted(os.listdir(root)) == ["latest.json", "step_000002", "step_000003"]


def test_expert_loads_are_per_step_without_the_bias_too(tmp_path, single_rank_world):
    """Each step's logged expert load counts that step's tokens (T x top-k per MoE layer; at MTP
    depth k the last k positions of a sequence read no token), with the aux-loss-free bias off as
    well (its update used to be the only reset)."""
    args = _args(tmp_path, steps=3, save_dir=None,
                 config_overrides={"moe_router_enable_expert_bias": False})
    history = Trainer(args).train()
    config = Trainer(args).config
    depths = config.mtp_num_layers or 0
    b, s, topk = args.micro_batch_size, args.seq_length, config.moe_router_topk
    for record in history:
        decoder = len(record["expert_load"]) - depths
        assert [sum(load) for load in record["expert_load"]] == \
            [b * s * topk] * decoder + [b * (s - k) * topk for k in range(1, depths + 1)]


def test_the_plots_of_a_resumed_run_show_the_whole_run(tmp_path, single_rank_world):
    """loss.png and expert_load.png were drawn from the resumed process's own steps (a resume
    at --steps redrew them empty); they show every step metrics.jsonl holds."""
    import unittest.mock

    from megatron_dsv3.training import plots

    drawn = {}
    real = plots.plot_loss

    def plot_loss(records, path, **kw):
        drawn["steps"] = [r["step"] for r in records]
        real(records, path, **kw)

    with unittest.mock.patch.object(plots, "plot_loss", plot_loss):
        Trainer(_args(tmp_path, steps=4, exit_interval=2)).train()
        assert drawn["steps"] == [1, 2]
        Trainer(_args(tmp_path, steps=4, resume="auto")).train()
        assert drawn["steps"] == [1, 2, 3, 4]
        drawn.clear()
        Trainer(_args(tmp_path, steps=4, resume="auto")).train()  # nothing to train
        assert drawn["steps"] == [1, 2, 3, 4]


def _poison_gradients_at(trainer, step):
    original = trainer.forward_backward

    def forward_backward():
        out = original()
        if trainer.step + 1 == step:
            next(trainer.models[0].parameters()).grad.fill_(float("nan"))
        return out

    trainer.forward_backward = forward_backward


def test_a_non_finite_gradient_stops_training_naming_the_step(tmp_path, single_rank_world):
    trainer = Trainer(_args(tmp_path, steps=3, save_dir=None))
    _poison_gradients_at(trainer, 2)
    with pytest.raises(NonFiniteError, match="step 2: non-finite gradients"):
        trainer.train()
    assert trainer.step == 1  # the optimizer never stepped on the bad gradients


def test_skip_nonfinite_steps_skips_counts_and_changes_nothing(tmp_path, single_rank_world):
    trainer = Trainer(_args(tmp_path, steps=3, save_dir=None, skip_nonfinite_steps=True))
    _poison_gradients_at(trainer, 2)
    snapshots = []
    original = trainer.train_step

    def train_step():
        snapshots.append([p.detach().clone() for m in trainer.models for p in m.parameters()]
                         + [b.clone() for m in trainer.models for n, b in m.named_buffers()
                            if n.endswith("expert_bias")])
        return original()

    trainer.train_step = train_step
    history = trainer.train()
    assert [r["skipped"] for r in history] == [False, True, False]
    assert history[-1]["skipped_steps"] == 1
    before_skip, after_skip = snapshots[1], snapshots[2]
    assert all(torch.equal(a, b) for a, b in zip(before_skip, after_skip))  # weights and biases
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[1]))


@pytest.mark.parametrize("edit, message", [
    ({"latest": "step_2"}, "field 'latest' holds 'step_2'"),  # a typo for step_000002
    ({"latest": "step_000009"}, "latest='step_000009', which is missing"),  # no such directory
    ({"kept": ["step_000001", 2]}, "field 'kept' holds 2"),
    ({"step": "two"}, "field 'step' is 'two'"),
])
def test_a_tracker_edited_wrong_is_refused_before_recovery_deletes_anything(run, edit, message):
    """Recovery deletes the step directories the tracker does not name: a tracker whose names
    cannot be trusted must stop the run, naming the field, with every checkpoint still there."""
    tmp, _ = run
    root = tmp / "run" / "checkpoints"
    state = json.loads((root / "latest.json").read_text())
    (root / "latest.json").write_text(json.dumps({**state, **edit}))
    before = sorted(os.listdir(root))
    with pytest.raises(CheckpointFileError, match=f"latest.json .*{message}"):
        Trainer(_args(tmp, steps=3, resume="auto"))
    with pytest.raises(CheckpointFileError, match=message):
        CheckpointStore(str(root)).recover()
    assert sorted(os.listdir(root)) == before == ["latest.json", "step_000001", "step_000002"]


def test_a_resume_path_that_holds_no_checkpoint_is_refused_before_recovery(run):
    tmp, _ = run
    root = tmp / "run" / "checkpoints"
    (root / "step_000003").mkdir()  # an unpublished leftover, which recovery would clear
    with pytest.raises(ValueError, match="step_2 holds no checkpoint"):
        Trainer(_args(tmp, steps=3, resume=str(root / "step_2")))
    assert (root / "step_000003").is_dir()  # nothing was touched


@pytest.mark.parametrize("entry, message", [
    ({}, "field 'size' is None"),
    (5, "field 'size' is None"),
    ({"size": "10", "crc32": 1}, "field 'size' is '10'"),
    ({"size": 10, "crc32": None}, "field 'crc32' is None"),
])
def test_a_damaged_manifest_entry_is_named_with_its_field(run, entry, message):
    tmp, _ = run
    manifest = tmp / "run" / "checkpoints" / "step_000002" / "checkpoint_manifest.json"
    data = json.loads(manifest.read_text())
    data["files"]["rank0.pt"] = entry
    manifest.write_text(json.dumps(data))
    with pytest.raises(CheckpointFileError,
                       match=f"checkpoint_manifest.json entry 'rank0.pt': {message}; allowed"):
        Trainer(_args(tmp, steps=3, resume="auto"))


def test_a_resume_loads_in_the_watchdogs_load_phase(run, monkeypatch):
    """Start-up shares one slow allowance; the resume's load (which reads every file twice: its
    checksum, then torch.load) gets the "load" phase's own, and each start-up stage that ends
    reports progress (before, a job whose save allowance covered its slowest save was ended on
    every resume whose start-up took longer in total)."""
    import contextlib

    import megatron_dsv3.liveness as liveness

    events = []

    class Recording:
        def start(self):
            return self

        def progress(self, step, phase="train"):
            events.append(("progress", phase))

        @contextlib.contextmanager
        def phase(self, name):
            events.append(("enter", name))
            yield
            events.append(("leave", name))

        def close(self):
            events.append(("close", None))

    monkeypatch.setattr(liveness, "make_watchdog", lambda *a, **k: Recording())
    real_load = Trainer.load
    monkeypatch.setattr(Trainer, "load",
                        lambda self, path: (events.append(("load", None)), real_load(self, path)))
    tmp, _ = run
    Trainer(_args(tmp, steps=3, resume="auto"))
    start = events.index(("enter", "load"))
    assert events[start:start + 3] == [("enter", "load"), ("load", None), ("leave", "load")]
    assert events[:start].count(("progress", "startup")) >= 3  # groups, run directory, data
