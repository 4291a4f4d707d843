"""The pipeline's transfers in the order NCCL needs: no hang, no crossed micro-batches.

NCCL matches sends and receives by order on FIFO streams (megatron_dsv3.testing.nccl_p2p models
it). The executor's `p2p_order="ordered"` (NCCL's default) follows `ordered_plan`, DeepSeek's
DualPipe order; `"tagged"` (gloo's default: receives posted ahead, matched by tag) would hang on
NCCL. Checked on the model for many shapes, and on the executor itself: its recorded calls on
gloo are the plan's, and the tagged run's calls deadlock in the model. Also why two threads on
two lanes (F&B pairs, two-micro-batch decoding) are refused on CUDA.
"""

import pytest
import torch

from megatron_dsv3.pipeline.schedules import build, ordered_plan
from megatron_dsv3.testing.distributed import run_distributed
from megatron_dsv3.testing.nccl_p2p import check, programs_from_plans

SHAPES = [(name, P, N) for name in ("dualpipev", "dualpipe") for P in (2, 4, 6, 8)
          for N in (2 * P, 2 * P + 2, 4 * P) if not (name == "dualpipe" and P % 2)]


def test_the_model_sees_the_classic_hang_and_crossed_messages():
    # both ranks receive first, in separate batches: each waits for a send behind the other's
    hang = [[("batch", [("recv", 1, "y")]), ("batch", [("send", 1, "x")])],
            [("batch", [("recv", 0, "x")]), ("batch", [("send", 0, "y")])]]
    assert check(hang).deadlock and check(hang, "rank").deadlock
    grouped = [[("batch", [("recv", 1, "y"), ("send", 1, "x")])],
               [("batch", [("recv", 0, "x"), ("send", 0, "y")])]]
    assert check(grouped).ok
    crossed = [[("batch", [("send", 1, "a"), ("send", 1, "b")])],
               [("batch", [("recv", 0, "b"), ("recv", 0, "a")])]]
    report = check(crossed)
    assert not report.deadlock and (0, 1, "a", "b") in report.crossed
    # a send waits for the compute issued before it, and that compute for its input: each rank
    # waits for the other's output
    cycle = [[("batch", [("recv", 1, "y")]), ("wait", "y"), ("compute", "c"),
              ("batch", [("send", 1, "x")])],
             [("batch", [("recv", 0, "x")]), ("wait", "x"), ("compute", "c"),
              ("batch", [("send", 0, "y")])]]
    assert check(cycle).deadlock
    with pytest.raises(KeyError):  # waiting for a message this rank never posted: an error
        check([[("wait", "y"), ("compute", "c")]])


@pytest.mark.parametrize("name,P,N", SHAPES)
def test_ordered_plan_neither_hangs_nor_crosses_on_nccl(name, P, N):
    for forward_only in (False, True):
        plans = ordered_plan(name, P, N, forward_only)
        if not forward_only:  # the plan's compute ops are the schedule, op for op
            assert [[op for op in plan if op.kind in ("F", "B", "W", "FB")]
                    for plan in plans] == build(name, P, N)
        programs = programs_from_plans(name, plans)
        for streams in ("pair", "rank"):
            report = check(programs, streams)
            assert report.ok, (forward_only, streams, report.stuck[:4], report.crossed[:4])


def _decode(tag):
    kind_dir, rest = divmod(tag, 10_000_000)
    stage, mb = divmod(rest, 100_000)
    return ("F" if kind_dir // 2 == 0 else "B", stage, kind_dir % 2, mb)


def _record(rank, world, schedule, N, p2p_order):
    """This rank's p2p calls, waits and compute, as model events, from a real run on gloo."""
    import torch.distributed as dist

    from megatron_dsv3.pipeline import executor
    from megatron_dsv3.testing.pipeline_checks import TinyStage, tiny_forward_step

    events, state = [], {"computed": True}

    def record_compute():
        if not state["computed"]:
            events.append(("compute",))
            state["computed"] = True

    batched = dist.batch_isend_irecv

    def batch(ops):
        events.append(("batch", [("send" if o.op is dist.isend else "recv", o.peer,
                                  _decode(o.tag)) for o in ops]))
        return batched(ops)

    runner = executor._Runner
    recv, send, fwd, bwd, run_op = (runner._recv, runner._send, runner.forward, runner.backward,
                                    runner._run_op)

    def run_op_(self, op):
        run_op(self, op)
        if op.kind == "W":
            events.append(("compute",))

    post = runner._post

    def post_(self, kind, chunk, mb):  # "tagged": each receive posted on its own
        before = len(self.posted)
        post(self, kind, chunk, mb)
        if len(self.posted) > before:
            src = self.peers[chunk][0 if kind == "F" else 1]
            message = (kind, self.lay.stage(*src), self.directions[chunk], mb)
            events.append(("batch", [("recv", src[0], message)]))

    def recv_(self, kind, chunk, mb):
        src = self.peers[chunk][0 if kind == "F" else 1]
        if src is not None and src[0] != self.rank:
            events.append(("wait", (kind, self.lay.stage(*src), self.directions[chunk], mb)))
        return recv(self, kind, chunk, mb)

    def send_(self, kind, chunk, mb, tensor):
        record_compute()  # the op's compute ran before its output is handed on
        dst = self.peers[chunk][1 if kind == "F" else 0]
        if not self.ordered and dst is not None and dst[0] != self.rank:  # "tagged": sent now
            message = (kind, self.stages[chunk], self.directions[chunk], mb)
            events.append(("batch", [("send", dst[0], message)]))
        return send(self, kind, chunk, mb, tensor)

    def op(fn):
        def run(self, *args):
            state["computed"] = False
            fn(self, *args)
            record_compute()
        return run

    patches = [(dist, "batch_isend_irecv", batch), (runner, "_post", post_),
               (runner, "_recv", recv_), (runner, "_send", send_),
               (runner, "forward", op(fwd)), (runner, "backward", op(bwd)),
               (runner, "_run_op", run_op_)]
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
    for obj, attr, value in patches:
        setattr(obj, attr, value)
    try:
        run = (executor.forward_backward_dualpipev if schedule == "dualpipev"
               else executor.forward_backward_dualpipe)
        chunks = [TinyStage(), TinyStage()]
        data = [torch.ones(4, 1, 8) for _ in range(N)]
        run(forward_step_func=tiny_forward_step, data_iterator=[iter(data), iter(data)],
            model=chunks, num_microbatches=N, seq_length=4, micro_batch_size=1,
            p2p_order=p2p_order)
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)
    return events


@pytest.mark.parametrize("schedule", ["dualpipev", "dualpipe"])
def test_executor_issues_the_plan_and_tagged_order_would_hang_on_nccl(schedule):
    P, N = 4, 8
    ordered = run_distributed(_record, P, args=(schedule, N, "ordered"),
                              megatron_parallel={"pipeline_model_parallel_size": P})
    expected = programs_from_plans(schedule, ordered_plan(schedule, P, N))
    for rank in range(P):  # the executor's own calls, in order, are the plan's
        plan = [("compute",) if e[0] == "compute" else e for e in expected[rank]]
        assert ordered[rank][:len(plan)] == plan, rank
        extra = ordered[rank][len(plan):]
        if schedule == "dualpipe":  # then one batch with the mirror rank: the mirrored gradients
            assert len(extra) == 1 and {peer for _, peer, _ in extra[0][1]} == {P - 1 - rank}
        else:
            assert extra == []
    programs = [[("compute", "") if e[0] == "compute" else e for e in prog] for prog in ordered]
    assert check(programs).ok
    tagged = run_distributed(_record, P, args=(schedule, N, "tagged"),
                             megatron_parallel={"pipeline_model_parallel_size": P})
    programs = [[("compute", "") if e[0] == "compute" else e for e in prog] for prog in tagged]
    assert check(programs).deadlock  # why "tagged" is refused on NCCL


def test_tagged_order_is_refused_on_nccl_and_lookahead_on_ordered():
    import torch.distributed as dist

    from megatron_dsv3.pipeline.executor import _p2p_order

    class Group:
        pass

    real = dist.get_backend
    try:
        dist.get_backend = lambda group: "cpu:gloo,cuda:nccl"
        assert _p2p_order(None, None, Group(), torch.device("cpu")) == "tagged"
        assert _p2p_order(None, None, Group(), torch.device("cuda")) == "ordered"
        with pytest.raises(ValueError, match=r"p2p_order='tagged' needs .* \(gloo\)"):
            _p2p_order("tagged", None, Group(), torch.device("cuda"))
        with pytest.raises(ValueError, match=r"recv_lookahead=2 applies to p2p_order='tagged'"):
            _p2p_order("ordered", 2, Group(), torch.device("cpu"))
    finally:
        dist.get_backend = real
    from megatron_dsv3.pipeline import forward_backward_dualpipev

    with pytest.raises(ValueError, match=r"p2p_order='nccl': allowed values are None"):
        forward_backward_dualpipev(forward_step_func=None, data_iterator=None,
                                   model=[object(), object()], num_microbatches=4, seq_length=4,
                                   micro_batch_size=1, p2p_order="nccl")


def test_two_lanes_on_one_compute_stream_deadlock_when_ranks_interleave_them_differently():
    """Why F&B pairs in two threads are refused on CUDA: each lane has its own communicator, but
    both threads wait on the one default stream, and a collective waits for what that stream
    holds when it is issued. Two ranks whose threads issued the lanes' all-to-alls in opposite
    orders wait for each other; in the same order they finish."""
    def a2a(peer, lane, k):  # an all-to-all between two ranks: one group, both directions
        return ("batch", [("send", peer, (lane, k), lane), ("recv", peer, (lane, k), lane)])

    lane0_first = [a2a(1, 0, 0), ("wait", (0, 0)), a2a(1, 1, 0), ("wait", (1, 0))]
    lane1_first = [a2a(0, 1, 0), ("wait", (1, 0)), a2a(0, 0, 0), ("wait", (0, 0))]
    assert check([lane0_first, lane1_first]).deadlock
    assert check([lane0_first, [a2a(0, 0, 0), ("wait", (0, 0)), a2a(0, 1, 0),
                                ("wait", (1, 0))]]).ok


def _config_stub(**fields):
    """The config fields the executor reads before it runs anything."""
    from types import SimpleNamespace

    return SimpleNamespace(hidden_size=4, pipeline_dtype=torch.float32, params_dtype=torch.float32,
                           **{"tensor_model_parallel_size": 1, **fields})


class _ChunkStub(torch.nn.Module):
    """A model chunk with `config` whose one parameter claims to live on `device`."""

    def __init__(self, config, device="cpu"):
        super().__init__()
        self.config, self.device = config, torch.device(device)

    def parameters(self, recurse=True):
        from types import SimpleNamespace

        yield SimpleNamespace(device=self.device)


def _start_threaded_pairs(monkeypatch, config, device="cpu"):
    """forward_backward_dualpipev with threaded F&B pairs, as rank 0 of a 2-rank pipeline."""
    from types import SimpleNamespace

    import megatron_dsv3.pipeline.executor as executor
    from megatron_dsv3.pipeline.overlap import threaded_forward_backward

    monkeypatch.setattr(executor.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(executor.dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(executor.dist, "get_process_group_ranks", lambda group: [0, 1])
    executor.forward_backward_dualpipev(
        forward_step_func=None, data_iterator=None,
        model=[_ChunkStub(config, device), _ChunkStub(config, device)], num_microbatches=4,
        seq_length=4, micro_batch_size=1, overlap=threaded_forward_backward,
        pg_collection=SimpleNamespace(pp=object()))


def test_threaded_pairs_are_refused_on_cuda(monkeypatch):
    with pytest.raises(ValueError, match="threaded_forward_backward is refused on CUDA"):
        _start_threaded_pairs(monkeypatch, _config_stub(), "cuda")
    # on CPU too with tensor parallelism: its all-reduces have no lanes
    with pytest.raises(ValueError, match="refused with tensor_model_parallel_size=2"):
        _start_threaded_pairs(monkeypatch, _config_stub(tensor_model_parallel_size=2))


def test_two_micro_batch_decoding_is_refused_on_cuda_with_expert_parallelism():
    from types import SimpleNamespace

    from megatron_dsv3.inference.engine import InferenceEngine

    class Model(torch.nn.Module):  # what the engine reads before it allocates anything
        def __init__(self, ep, device="cuda", tp=1):
            super().__init__()
            self.config = SimpleNamespace(max_position_embeddings=64,
                                          tensor_model_parallel_size=tp)
            weight = SimpleNamespace(device=torch.device(device))
            self.embedding = SimpleNamespace(word_embeddings=SimpleNamespace(weight=weight))
            self.moe = torch.nn.Module()
            self.moe.dispatcher = SimpleNamespace(ep_group=SimpleNamespace(size=lambda: ep))

    with pytest.raises(ValueError, match="micro_batches=2 is refused on CUDA with expert"):
        InferenceEngine(Model(2), micro_batches=2)
    # and anywhere with tensor parallelism (its all-reduces have no lanes)
    with pytest.raises(ValueError, match="refused with tensor_model_parallel_size=2"):
        InferenceEngine(Model(1, "cpu", tp=2), micro_batches=2)


def test_threaded_pairs_are_refused_where_a_recompute_reruns_random_draws(monkeypatch):
    """The backward thread's recompute sets and restores the process's random-number state while
    the forward thread draws dropout / jitter noise from it: threaded pairs then differed from
    sequential ones, and between runs (found by review)."""
    import megatron_dsv3.pipeline.executor as executor

    config = _config_stub
    noisy = config(hidden_dropout=0.1, recompute_granularity="selective",
                   recompute_modules=["layernorm", "shared_experts"])
    with pytest.raises(ValueError, match=r"recompute_modules \['shared_experts'\] and "
                                         r"hidden_dropout=0.1"):
        _start_threaded_pairs(monkeypatch, noisy)
    rerun = executor.recompute_reruns_random_draws
    assert rerun(config(hidden_dropout=0.1, recompute_granularity="selective",
                        recompute_modules=None)).startswith("recompute_modules ['core_attn']")
    assert rerun(config(moe_input_jitter_eps=0.01, recompute_granularity="full"))
    # recomputing norms / activations draws nothing; no noise, nothing to disturb
    assert rerun(config(hidden_dropout=0.1, recompute_granularity="selective",
                        recompute_modules=["layernorm", "moe_act", "mla_up_proj"])) == ""
    assert rerun(config(hidden_dropout=0.0, attention_dropout=0.0, recompute_granularity="full",
                        recompute_modules=None)) == ""
