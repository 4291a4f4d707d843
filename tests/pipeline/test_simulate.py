"""The simulator, built from the executor's schedule data, reproduces DeepSeek's table."""

import json
import subprocess
import sys

import pytest

from megatron_dsv3.pipeline.schedules import build, layout, with_comm
from megatron_dsv3.pipeline.simulate import Times, expected_bubble, simulate

# DeepSeek's closed forms are exact when a weight-gradient chunk costs as much as a forward
# chunk and a backward twice that (W = F, B = 2F); otherwise the simulator gives the bubble of
# the actual schedule (checked against the forms where they are exact).
TIMES = [Times(1, 2, 1, 2.5), Times(1, 2, 1, 3), Times(2, 4, 2, 5), Times(1.5, 3, 1.5, 3.5)]


@pytest.mark.parametrize("name", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
@pytest.mark.parametrize("P,N", [(2, 8), (4, 8), (4, 20), (8, 16), (8, 32)])
def test_bubble_matches_the_table(name, P, N):
    for t in TIMES:
        res = simulate(name, P, N, t)
        assert res["bubble"] == pytest.approx(expected_bubble(name, P, t)), (name, P, N, vars(t))


@pytest.mark.parametrize("P,N", [(2, 8), (4, 8), (8, 16)])
def test_activation_memory_matches_the_table(P, N):
    t = Times()
    assert simulate("1f1b", P, N, t)["peak_activations"] == P
    assert simulate("zb1p", P, N, t)["peak_activations"] == P
    assert simulate("dualpipe", P, N, t)["peak_activations"] == P + 1  # PP + 1
    assert simulate("dualpipev", P, N, t)["peak_activations"] == 2 * P + 1  # PP = 2P stages


def test_every_microbatch_runs_forward_and_backward_once_per_stage():
    for name, P, N in (("dualpipev", 4, 12), ("dualpipe", 4, 12), ("interleaved", 4, 8)):
        ops = build(name, P, N)
        lay = layout(name, P)
        seen = {}
        for r, rank_ops in enumerate(ops):
            for op in rank_ops:
                halves = [("F", op.chunk, op.mb), ("B", op.chunk2, op.mb2)] if op.kind == "FB" \
                    else [(op.kind, op.chunk, op.mb)]
                for kind, c, m in halves:
                    seen[(kind, lay.stage(r, c), c if name == "dualpipe" else 0, m)] = \
                        seen.get((kind, lay.stage(r, c), c if name == "dualpipe" else 0, m), 0) + 1
        per_dir = N // 2 if name == "dualpipe" else N
        dirs = 2 if name == "dualpipe" else 1
        expected = {(k, s, d, m) for k in ("F", "B", "W") for s in range(lay.stages)
                    for d in range(dirs) for m in range(per_dir)}
        fb = {k for k in seen if k[0] in ("F", "B")}
        assert fb == {k for k in expected if k[0] in ("F", "B")} and set(seen.values()) == {1}


def test_comm_ops_pair_up_across_ranks():
    lay = layout("dualpipev", 4)
    sends, recvs = {}, {}
    for r, ops in enumerate(build("dualpipev", 4, 8)):
        for op in with_comm(lay, r, ops):
            if op.kind.startswith("SEND"):
                sends[(op.kind[5:], op.chunk, op.mb, r, op.peer)] = 1
            if op.kind.startswith("RECV"):
                recvs[(op.kind[5:], op.mb, op.peer, r)] = 1
    assert len(sends) == len(recvs) > 0
    assert {(k, m, src, dst) for k, c, m, src, dst in sends} == set(recvs)


def test_command_line_prints_json_and_plots(tmp_path):
    out = tmp_path / "v.png"
    proc = subprocess.run([sys.executable, "-m", "megatron_dsv3.pipeline.simulate", "--schedule",
                           "dualpipev", "--pp", "4", "--microbatches", "10", "--F", "1", "--B",
                           "2", "--W", "1", "--FB", "2.5", "--json", "--plot", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["bubble"] == pytest.approx(3 * (2.5 + 2 - 3))
    assert len(res["timeline"]) == 4 and out.stat().st_size > 10_000
    bad = subprocess.run([sys.executable, "-m", "megatron_dsv3.pipeline.simulate", "--schedule",
                          "dualpipe", "--pp", "3", "--microbatches", "12"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "even number of pipeline ranks" in bad.stderr
