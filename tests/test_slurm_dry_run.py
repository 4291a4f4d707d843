"""The sbatch files' DRY_RUN=1 mode, without SLURM: the commands each node would run, the derived
world and parallel sizes, and the per-rank layer placement printed by the planner."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_dsv3.pipeline.placement import StageLayers
from megatron_dsv3.pretrain_gpt import parse_dsv3_args

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "examples" / "slurm"

# file: (nodes, gpus per node, tp, pp, ep, num_layers, schedule)
EXPECTED = {
    "deepseek_v3_671b.sbatch": (256, 8, 1, 16, 64, 61, "dualpipev"),
    "deepseek_v3_16b_proxy.sbatch": (8, 8, 1, 4, 16, 27, "dualpipev"),
    "smoke_2node.sbatch": (2, 8, 1, 2, 8, 4, "dualpipev"),
}


def dry_run(name, tmp_path, refused=False, **env_extra):
    """stdout of the file's DRY_RUN=1 run (its stderr where `refused`, which it must be)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(DRY_RUN="1", PYTHON=sys.executable, RUN_DIR=str(tmp_path / "run"),
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), **env_extra)
    out = subprocess.run(["bash", str(SLURM / name)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    if refused:
        assert out.returncode != 0, out.stdout[-3000:]
        return out.stderr
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def node_commands(stdout):
    cmds = {}
    for line in stdout.splitlines():
        m = re.match(r"node (\d+) (\S+): (.*)$", line)
        if m:
            cmds[int(m.group(1))] = (m.group(2), shlex.split(m.group(3)))
    return cmds


def flag(argv, name, n=1):
    i = argv.index(name)
    return argv[i + 1] if n == 1 else argv[i + 1:i + 1 + n]


def placement_table(stdout):
    table = {}
    for line in stdout.splitlines():
        m = re.match(r"\s+pp_rank\s+(\d+): (.*?)(\s+\[.*\])?$", line)
        if m:
            chunks = []
            for c in re.findall(r"chunk\d=(\S+)", m.group(2)):
                a, b = (c, c) if "-" not in c else c.split("-")
                chunks.append([] if c == "-" else list(range(int(a), int(b) + 1)))
            table[int(m.group(1))] = (chunks, m.group(3) or "")
    return table


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dry_run_prints_each_nodes_command_with_sizes_derived_from_slurm(name, tmp_path):
    nodes, gpn, tp, pp, ep, layers, schedule = EXPECTED[name]
    out = dry_run(name, tmp_path)
    cmds = node_commands(out)
    assert sorted(cmds) == list(range(nodes))
    hosts = [h for h, _ in cmds.values()]
    assert len(set(hosts)) == nodes
    for rank, (host, argv) in cmds.items():
        assert argv[:1] == ["torchrun"] and "megatron_dsv3.pretrain_gpt" in argv
        assert flag(argv, "--nnodes") == str(nodes) and flag(argv, "--node-rank") == str(rank)
        assert flag(argv, "--nproc-per-node") == str(gpn)
        assert flag(argv, "--master-addr") == hosts[0]  # the first host of the node list
        assert (flag(argv, "--tensor-model-parallel-size"), flag(argv, "--pipeline-model-parallel-size"),
                flag(argv, "--expert-model-parallel-size")) == (str(tp), str(pp), str(ep))
        assert flag(argv, "--pipeline-schedule") == schedule
        assert flag(argv, "--num-layers") == str(layers)
        # experts split by expert parallelism only (Megatron's default would be TP)
        assert flag(argv, "--expert-tensor-parallel-size") == "1"
        if "--vocab-size" in argv and "--make-vocab-size-divisible-by" in argv:
            # 129280 rows as DeepSeek-V3's checkpoint with the mock tokenizer's 129279 + 1 and
            # with DeepSeek-V3's own (128815 entries, where Megatron ignores --vocab-size)
            multiple = int(flag(argv, "--make-vocab-size-divisible-by")) * tp
            assert [-(-n // multiple) * multiple for n in (129280, 128815)] == [129280] * 2
        assert flag(argv, "--spec", 2) == ["megatron_dsv3.layer_specs", "layer_spec"]
        assert "--use-distributed-optimizer" in argv and flag(argv, "--exp-avg-dtype") == "bf16"
        assert flag(argv, "--save") == str(tmp_path / "run" / "checkpoints")
        assert "--load" not in argv  # nothing to resume yet
        # DeepSeek-V3's values where Megatron's defaults differ (dropout 0.1, epsilon 1e-5)
        assert (flag(argv, "--hidden-dropout"), flag(argv, "--attention-dropout"),
                flag(argv, "--norm-epsilon")) == ("0", "0", "1e-6")
        # our checks of the command line, as the entry point runs them at start (one FP8
        # switch; DualPipeV's micro-batch count from the global batch and the world size)
        start = argv.index("megatron_dsv3.pretrain_gpt") + 1
        parse_dsv3_args(argv[start:], world_size=nodes * gpn)
    world = nodes * gpn
    summary = re.search(r"summary: .*world_size=(\d+) tp=(\d+) pp=(\d+) ep=(\d+) dp=(\d+)", out)
    assert summary and tuple(map(int, summary.groups())) == (world, tp, pp, ep, world // (tp * pp))
    assert "CUDA_DEVICE_MAX_CONNECTIONS=1" in out


def test_671b_dry_run_has_deepseek_v3_features_and_v_placement(tmp_path):
    out = dry_run("deepseek_v3_671b.sbatch", tmp_path)
    _, argv = node_commands(out)[0]
    assert (flag(argv, "--num-experts"), flag(argv, "--moe-router-topk"),
            flag(argv, "--moe-router-num-groups"), flag(argv, "--moe-router-group-topk")) == (
        "256", "8", "8", "4")
    assert flag(argv, "--mtp-num-layers") == "1" and flag(argv, "--dsv3-fp8-recipe") == "deepseek"
    assert flag(argv, "--dsv3-dispatcher") == "node-aware" and "--dsv3-dispatch-fp8" in argv
    assert flag(argv, "--recompute-granularity") == "selective"
    assert flag(argv, "--recompute-modules", 3) == ["layernorm", "mla_up_proj", "moe_act"]
    assert flag(argv, "--ranks-per-node") == "8"
    # EP64 over 8 nodes: an expert group of consecutive ranks spans 64 / 8 nodes >= M = 4
    assert int(flag(argv, "--expert-model-parallel-size")) // 8 >= int(
        flag(argv, "--moe-router-group-topk"))
    # Megatron's uneven split flags reach both the ranks and the planner's placement
    first, last = (int(flag(argv, "--decoder-first-pipeline-num-layers")),
                   int(flag(argv, "--decoder-last-pipeline-num-layers")))
    assert (first, last) == (1, 4)
    table = placement_table(out)
    expected = StageLayers("dualpipev", 16, 61, first, last).table()
    assert {r: c for r, (c, _) in table.items()} == expected
    assert sorted(g for chunks in expected.values() for c in chunks for g in c) == list(range(1, 62))
    # stage 0: one layer with the embedding; stage 31: none (head + MTP); every other stage two
    assert expected[0] == [[1], []] and all(len(c) == 2 for r in range(1, 16) for c in expected[r])
    assert "embedding" in table[0][1] and "output_head" in table[0][1] and "mtp" in table[0][1]


def test_dry_run_resumes_from_an_existing_checkpoint(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("10")
    out = dry_run("smoke_2node.sbatch", tmp_path)
    for _, argv in node_commands(out).values():
        assert flag(argv, "--load") == flag(argv, "--save") == str(ckpt)
        assert "--exit-signal-handler" in argv
    assert "resume from" in out and "iteration 10" in out


def test_a_fresh_run_starts_from_converted_weights_and_a_requeued_one_from_its_own(tmp_path):
    """INIT_CKPT becomes Megatron's --pretrained-checkpoint, which Megatron reads only while
    --load holds no checkpoint: a requeued job resumes from its own; a directory without
    Megatron's tracker (where Megatron would start from random weights) is refused."""
    init = tmp_path / "converted"
    init.mkdir()
    err = subprocess.run(["bash", str(SLURM / "smoke_2node.sbatch")], cwd=tmp_path,
                         env={**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable,
                              "RUN_DIR": str(tmp_path / "run"), "INIT_CKPT": str(init)},
                         capture_output=True, text=True, timeout=120)
    assert err.returncode == 2 and "latest_checkpointed_iteration.txt" in err.stderr
    (init / "latest_checkpointed_iteration.txt").write_text("release")
    argv = node_commands(dry_run("smoke_2node.sbatch", tmp_path, INIT_CKPT=str(init)))[0][1]
    assert flag(argv, "--pretrained-checkpoint") == str(init)
    assert flag(argv, "--load") == str(tmp_path / "run" / "checkpoints")
    ckpt = tmp_path / "run" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("10")
    argv = node_commands(dry_run("smoke_2node.sbatch", tmp_path, INIT_CKPT=str(init)))[0][1]
    assert "--pretrained-checkpoint" not in argv and flag(argv, "--load") == str(ckpt)


def test_extra_args_from_the_environment_are_split_into_words(tmp_path):
    """bash cannot export an array: a string EXTRA_ARGS is split like a command line (it was one
    word, which Megatron rejects)."""
    out = dry_run("smoke_2node.sbatch", tmp_path, EXTRA_ARGS="--seed 7 --log-throughput")
    argv = node_commands(out)[0][1]
    assert argv[-3:] == ["--seed", "7", "--log-throughput"]


def test_dry_run_takes_the_node_list_and_port_from_the_environment(tmp_path):
    # (4 nodes: DP 16, so the file's global batch of 32 is 2 micro-batches, too few for
    # DualPipeV over 2 ranks: the dry run refuses it, as the job would at start)
    env = dict(SLURM_JOB_NUM_NODES="4", MASTER_PORT="29123")
    err = dry_run("smoke_2node.sbatch", tmp_path, refused=True, **env)
    assert "DualPipeV needs micro-batches >= 2 x ranks = 4; got 2" in err, err
    out = dry_run("smoke_2node.sbatch", tmp_path, EXTRA_ARGS="--global-batch-size 64", **env)
    cmds = node_commands(out)
    assert sorted(cmds) == [0, 1, 2, 3]
    assert all(flag(a, "--master-port") == "29123" for _, a in cmds.values())
    assert all(a[len(a) - 1 - a[::-1].index("--global-batch-size") + 1] == "64"
               for _, a in cmds.values())  # (the last one counts)
    assert re.search(r"world_size=32 tp=1 pp=2 ep=8 dp=16", out)


def test_sbatch_headers_request_requeue_and_a_signal_before_the_limit():
    for name, (nodes, gpn, *_rest) in EXPECTED.items():
        text = (SLURM / name).read_text()
        assert f"#SBATCH --nodes={nodes}\n" in text and f"#SBATCH --gpus-per-node={gpn}\n" in text
        assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@" in text
        assert f"DRY_NODES={nodes} DRY_GPUS_PER_NODE={gpn}" in text
    common = (SLURM / "common.sh").read_text()
    assert "scontrol show hostnames" in common and "scontrol requeue" in common
    # the preemption signal goes to the job's steps (srun would turn SIGTERM into SIGKILL), and
    # torchrun waits for the ranks' save longer than its default 30 s
    assert 'scancel --signal=TERM "$SLURM_JOB_ID"' in common and 'kill -TERM "$SRUN_PID"' not in common
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-540}" in common


def test_usr1_saves_through_the_steps_and_requeues_even_when_the_step_exits_non_zero(tmp_path):
    """The batch script's USR1 trap with SLURM's commands stubbed: scancel --signal=TERM reaches
    the step, and `scontrol requeue` follows although the step exits 1 (as torchrun does after a
    forwarded SIGTERM, the ranks having saved): under `set -e` the trap's `wait` used to end the
    script there, and the job ended FAILED, not requeued."""
    import signal
    import time

    stubs, log = tmp_path / "bin", tmp_path / "slurm.log"
    stubs.mkdir()
    scripts = {
        # the step stands in for torchrun: exits 1 on SIGTERM; its pid for scancel
        "srun": 'echo "srun $*" >> "$LOG"\n"$(dirname "$0")/step" &\nwait $!',
        "step": 'sleep 60 > /dev/null &\ntrap "kill $!; exit 1" TERM\necho $$ > "$LOG.pid"\n'
                "wait",
        "scancel": 'echo "scancel $*" >> "$LOG"\nkill -TERM "$(cat "$LOG.pid")"',
        "scontrol": 'echo "scontrol $*" >> "$LOG"',
    }
    for name, body in scripts.items():
        (stubs / name).write_text("#!/bin/bash\n" + body + "\n")
        (stubs / name).chmod(0o755)
    job = tmp_path / "job.sbatch"
    job.write_text(f"JOB_NAME=trap TP=1 PP=1 EP=1 SCHEDULE=1f1b MTP=0\n"
                   f"source {SLURM / 'common.sh'}\n"
                   "MODEL_ARGS=() TRAIN_ARGS=() PLAN_ARGS=()\ndsv3_main\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{stubs}{os.pathsep}{env['PATH']}", LOG=str(log), SLURM_JOB_ID="4242",
               SLURM_JOB_NUM_NODES="1", GPUS_PER_NODE="1", RUN_DIR=str(tmp_path / "run"))
    output = tmp_path / "job.out"
    with open(output, "w") as out:
        proc = subprocess.Popen(["bash", str(job)], env=env, cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not Path(f"{log}.pid").exists():  # the step runs
            assert proc.poll() is None and time.monotonic() < deadline, output.read_text()
            time.sleep(0.05)
        time.sleep(1.0)  # the script sets its trap right after starting the step
        proc.send_signal(signal.SIGUSR1)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = output.read_text()
    calls = log.read_text().splitlines()
    assert "scancel --signal=TERM 4242" in calls, (calls, out)
    assert calls[-1] == "scontrol requeue 4242", (calls, out)
