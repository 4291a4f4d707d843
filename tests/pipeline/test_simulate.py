"""The simulator, built from the executor's schedule data, reproduces DeepSeek's table."""

import json
import subprocess
import sys

import pytest

from megatron_dsv3.pipeline.schedules import build, layout, neighbours, with_comm
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


@pytest.mark.parametrize("P", [2, 4])
def test_overhead_and_latency_in_1f1b_closed_forms(P):
    """Every forward and backward pays `overhead` d: 1F1B takes (N + P - 1)(F + B + 2d); one
    micro-batch is a chain of P forwards and P backwards with 2(P - 1) transfers of latency L."""
    t, d, L = Times(1, 2, 1, 3), 0.1, 0.05
    for N in (2, 4, 8):
        res = simulate("1f1b", P, N, t, overhead=d)
        assert res["total"] == pytest.approx((N + P - 1) * (t.F + t.B + 2 * d))
        assert res["bubble"] == pytest.approx(res["total"] - N * (t.F + t.B))  # d is bubble
    one = simulate("1f1b", P, 1, t, overhead=d, latency=L)
    assert one["total"] == pytest.approx(P * (t.F + t.B + 2 * d) + 2 * (P - 1) * L)


def _longest_paths(name, P, N, t, d, L, pairs="sequential"):
    """Independent of the simulator's event loop: every op's end time as the least fixed point
    of end = max(previous op on its rank, its inputs' arrival) + duration; pairs run forward
    half then backward half, each half's output ready when it ends ("sequential"), or take FB
    plus both halves' overhead with both outputs ready at the end ("overlapped"). -> the
    bubble."""
    ops, lay = build(name, P, N), layout(name, P)

    def key(r, c):
        return lay.stage(r, c), c if name == "dualpipe" else 0

    half_end, op_end = {}, {}
    for _ in range(sum(map(len, ops)) + 1):
        changed = False
        for r, rank_ops in enumerate(ops):
            clock = 0.0
            for i, op in enumerate(rank_ops):
                if op.kind == "W":
                    end = clock + t.W + d
                else:
                    end = clock
                    halves = [("F", op.chunk, op.mb), ("B", op.chunk2, op.mb2)] \
                        if op.kind == "FB" else [(op.kind, op.chunk, op.mb)]
                    arrivals = []
                    for kind, c, m in halves:
                        prev, nxt = neighbours(lay, r, c)
                        src = prev if kind == "F" else nxt
                        inputs = [] if kind == "F" else [half_end.get(("F", key(r, c), m), 0.0)]
                        if src is not None:
                            inputs.append(half_end.get((kind, key(*src), m), 0.0)
                                          + (L if src[0] != r else 0.0))
                        arrivals.append(inputs)
                    if op.kind == "FB" and pairs == "overlapped":
                        end = max([end] + arrivals[0] + arrivals[1]) + t.FB + 2 * d
                        ends = [end, end]
                    else:
                        ends = []
                        for (kind, c, m), inputs in zip(halves, arrivals):
                            dur = t.F if kind == "F" else (t.B - t.W if op.zb else t.B)
                            end = max([end] + inputs) + dur + d
                            ends.append(end)
                    for (kind, c, m), half in zip(halves, ends):
                        if half_end.get((kind, key(r, c), m)) != half:
                            half_end[(kind, key(r, c), m)], changed = half, True
                op_end[(r, i)] = clock = end
        if not changed:
            break
    total = max(op_end.values())
    pair = t.F + t.B if pairs == "sequential" else t.FB
    compute = [sum(t.W if o.kind == "W" else pair if o.kind == "FB" else
                   t.F if o.kind == "F" else (t.B - t.W if o.zb else t.B) for o in rank_ops)
               for rank_ops in ops]
    return max(total - c for c in compute)


@pytest.mark.parametrize("name,P,N", [("dualpipe", 4, 16), ("dualpipe", 4, 32),
                                      ("dualpipev", 4, 10), ("dualpipe", 6, 24)])
def test_sequential_pairs_equal_an_independent_longest_path(name, P, N):
    for t in (Times(1, 2, 1, 3), Times(2, 3, 1, 5), Times(1, 3, 1, 4)):
        for d, L in ((0.0, 0.0), (0.03, 0.01), (0.04, 0.025)):
            res = simulate(name, P, N, t, pairs="sequential", overhead=d, latency=L)
            assert res["bubble"] == pytest.approx(_longest_paths(name, P, N, t, d, L)), \
                (vars(t), d, L)
            # each half's output leaves earlier than at the pair's end: never a later finish
            over = simulate(name, P, N, t, pairs="overlapped", overhead=d, latency=L)
            assert res["total"] <= over["total"] + 1e-9
            assert over["bubble"] == pytest.approx(
                _longest_paths(name, P, N, t, d, L, pairs="overlapped")), (vars(t), d, L)


def test_simulator_refuses_bad_pair_modes_and_negative_costs():
    t = Times()
    with pytest.raises(ValueError, match="pairs='both' is invalid: allowed values are "
                                         "'overlapped', 'sequential'"):
        simulate("dualpipe", 4, 16, t, pairs="both")
    with pytest.raises(ValueError, match="overhead=-0.1 is invalid: allowed values are numbers"):
        simulate("dualpipe", 4, 16, t, overhead=-0.1)
    with pytest.raises(ValueError, match="latency=nan is invalid"):
        simulate("dualpipe", 4, 16, t, latency=float("nan"))


def test_command_line_prints_json_and_plots(tmp_path, capsys):
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
    from megatron_dsv3.pipeline.simulate import main

    main(["--schedule", "dualpipe", "--pp", "4", "--microbatches", "16", "--FB", "3", "--pairs",
          "sequential", "--overhead", "0.03", "--latency", "0.01", "--json"])
    seq = json.loads(capsys.readouterr().out)
    assert (seq["pairs"], seq["overhead"], seq["latency"]) == ("sequential", 0.03, 0.01)
    assert seq["bubble"] == pytest.approx(simulate("dualpipe", 4, 16, Times(1, 2, 1, 3),
                                                   pairs="sequential", overhead=0.03,
                                                   latency=0.01)["bubble"])
