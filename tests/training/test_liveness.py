"""A stalled rank never hangs the job: the progress watchdog (megatron_dsv3.liveness) names it and
ends the job within its timeout; collectives have finite timeouts in every process group."""

import io
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest

from megatron_dsv3.liveness import EXIT_CODE, Watchdog, ranks_text

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# -- the watchdog's logic, with a fake clock and a fake store -----------------------------------
class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class FakeStore:
    """The part of torch's Store the watchdog uses; `down` makes every call fail like a store
    whose host does not answer."""

    def __init__(self):
        self.data = {}
        self.down = False

    def _up(self):
        if self.down:
            raise TimeoutError("store not answering")

    def set(self, key, value):
        self._up()
        self.data[key] = value.encode() if isinstance(value, str) else value

    def get(self, key):
        self._up()
        return self.data[key]

    def check(self, keys):
        self._up()
        return all(k in self.data for k in keys)

    def multi_get(self, keys):
        self._up()
        return [self.data[k] for k in keys]


class World:
    """`n` watchdogs (one per rank) on one fake store and clock, ticked by hand."""

    def __init__(self, n, timeout=10.0, slow_timeout=30.0, **kw):
        self.clock, self.store, self.exits = FakeClock(), FakeStore(), {}
        self.out = {r: io.StringIO() for r in range(n)}
        self.dogs = [Watchdog(timeout, slow_timeout, rank=r, world_size=n, clock=self.clock,
                              store_factory=lambda: self.store, output=self.out[r],
                              exit=lambda code, r=r: self.exits.setdefault(r, code),
                              thread=False, kill_stopped=False, interval=1.0, **kw)
                     for r in range(n)]
        for d in self.dogs:
            d.start(0)

    def at(self, t, ticking, progress=(), step=None):
        """Advance the clock to t; ranks in `progress` report `step`; ranks in `ticking` run
        their watchdog round (a frozen rank does neither). Returns {rank: verdict}."""
        self.clock.t = t
        for r in progress:
            self.dogs[r].progress(step)
        return {r: v for r in ticking if (v := self.dogs[r].tick()) is not None}

    def message(self, r):
        return self.out[r].getvalue()


def test_ranks_text():
    assert ranks_text([3]) == "rank 3"
    assert ranks_text([5, 0, 1, 2, 7, 8]) == "ranks 0-2, 5, 7-8"


def test_frozen_rank_is_named_with_its_last_step():
    w = World(2)
    for t in (1, 2, 3):
        assert w.at(t, [1, 0], progress=[0, 1], step=t) == {}
    for t in range(4, 14):  # rank 1 frozen after step 3; rank 0 waits (its beat goes on)
        assert w.at(t, [0]) == {}, w.message(0)  # 13 - 3 = 10 s: not more than the timeout
    verdict = w.at(14, [0])[0]
    assert verdict.kind == "frozen" and verdict.ranks == [1]
    msg = w.message(0)
    assert msg.startswith("[watchdog] rank 1 made no progress for 11 s (last seen at step 3, "
                          "phase train; its heartbeat stopped too"), msg
    assert "rank 0 is waiting at step 3, phase train. Ending the job" in msg
    assert msg.count("\n") == 1 and w.exits == {0: EXIT_CODE}
    assert w.at(15, [0]) == {} and w.exits == {0: EXIT_CODE}  # once
    # the frozen rank, should it resume, follows the abort with a short line
    w.at(16, [1])
    assert w.exits[1] == EXIT_CODE and "watchdog of rank 0 ended the job" in w.message(1)


def test_alive_but_stuck_names_the_ranks_furthest_behind():
    w = World(3, watchers=[0])  # rank 0 ticks last: it sees every rank's latest beat
    for t in (1, 2):
        w.at(t, [2, 1, 0], progress=[2, 1, 0], step=t)
    w.at(3, [2, 1, 0], progress=[2, 0], step=3)  # rank 1 never finishes step 3
    for t in range(4, 13):  # every beat goes on, nobody progresses
        assert w.at(t, [2, 1, 0]) == {}
    verdicts = w.at(13, [2, 1, 0])  # rank 1's progress is 11 s old
    assert verdicts[0].kind == "stuck" and verdicts[0].ranks == [1]
    msg = w.message(0)
    assert ("[watchdog] rank 1 made no progress for 11 s (last seen at step 2, phase train); "
            "ranks 0, 2 are waiting at step 3, phase train. Ending the job") in msg
    assert "heartbeat" not in msg


def test_all_ranks_stuck_at_the_same_point():
    w = World(3, watchers=[0])
    w.at(1, [2, 1, 0], progress=[2, 1, 0], step=1)
    for t in range(2, 12):
        assert w.at(t, [2, 1, 0]) == {}
    assert w.at(12, [2, 1, 0])[0].ranks == [0, 1, 2]
    assert ("ranks 0-2 made no progress for 11 s (last seen at step 1, phase train); no rank is "
            "ahead of the others") in w.message(0)


def test_no_alarm_during_a_save_until_the_save_allowance():
    w = World(2, timeout=10.0, slow_timeout=30.0)
    w.at(1, [1, 0], progress=[0, 1], step=1)
    saves = [d.phase("save") for d in w.dogs]
    for s in saves:
        s.__enter__()  # both ranks save at t=1; rank 1 then freezes inside its save
    w.at(2, [1, 0])
    for t in range(3, 33):  # far beyond the 10 s timeout: still no alarm
        assert w.at(t, [0]) == {}, w.message(0)
    verdict = w.at(33, [0])[0]
    assert verdict.kind == "frozen" and verdict.ranks == [1]
    assert "last seen at step 1, phase save" in w.message(0)
    saves[0].__exit__(None, None, None)


def test_first_step_has_the_startup_allowance_and_unseen_ranks_are_named():
    w = World(2, timeout=10.0, slow_timeout=30.0)
    for t in range(1, 31):  # rank 1 never publishes anything: "startup" allowance
        assert w.at(t, [0]) == {}
    assert w.at(31, [0])[0].ranks == [1]
    assert "rank 1 made no progress for 31 s (never seen since the watchdog started 31 s ago)" \
        in w.message(0)


def test_a_silent_store_means_its_host_rank_is_stalled():
    w = World(2, store_host_rank=0, store_address="10.0.0.1:29500")
    for t in (1, 2, 3):
        w.at(t, [0, 1], progress=[0, 1], step=t)
    w.store.down = True  # rank 0 (and the store server thread it runs) stopped
    for t in range(4, 14):
        assert w.at(t, [1]) == {}
    assert w.at(15, [1])[1].kind == "store"
    msg = w.message(1)
    assert msg.startswith("[watchdog] rank 0 (host of the rendezvous store 10.0.0.1:29500) made "
                          "no progress for at least 11 s: the store has not answered rank 1 for "
                          "11 s (last seen at step 3, phase train); rank 1 is waiting at step 3"), msg
    assert w.exits == {1: EXIT_CODE}
    w2 = World(2, store_host_rank=0)  # a store that comes back in time raises nothing
    w2.at(1, [0, 1], progress=[0, 1], step=1)
    w2.store.down = True
    w2.at(5, [0, 1])
    w2.store.down = False
    for t in range(6, 14):
        assert w2.at(t, [0, 1], progress=[0, 1], step=t) == {}


class _UnreadPipe(io.TextIOBase):
    """An output whose writes block until released: a pipe nobody reads (a stalled `| tee`)."""

    def __init__(self):
        import threading

        self.release = threading.Event()

    def write(self, text):
        self.release.wait()
        return len(text)

    def flush(self):
        self.release.wait()


@pytest.mark.timeout(60)
def test_an_output_nobody_reads_does_not_hold_the_end_of_the_job():
    """The ranks' log pipe is full: the watchdog's own message would block like every other
    write, and the job it decided to end went on running (os._exit came after the print)."""
    w = World(2)
    blocked = w.dogs[0]._output = _UnreadPipe()
    try:
        for t in (1, 2, 3):
            w.at(t, [1, 0], progress=[0, 1], step=t)
        start = time.monotonic()
        for t in range(4, 15):
            w.at(t, [0])
        assert w.exits == {0: EXIT_CODE}  # ended although its message is not written yet
        assert time.monotonic() - start < 5.0
        assert w.dogs[0].ended.startswith("[watchdog] rank 1 made no progress for 11 s")
    finally:
        blocked.release.set()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGSTOP and /proc")
def test_a_stopped_store_host_on_this_host_is_sent_sigkill():
    """Without torchrun rank 0 hosts the rendezvous store; stopped, its watcher's verdict is
    "store", and like a frozen rank it reacts to the launcher's SIGTERM only once resumed: it
    must be killed too (it was left stopped, and a launcher waiting for every task waited)."""
    import socket

    from megatron_dsv3.liveness import Beat, _proc_identity

    host_process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        w = World(2, store_host_rank=0)
        w.dogs[1]._kill_stopped = True
        for t in (1, 2, 3):
            w.at(t, [0, 1], progress=[0, 1], step=t)
        # rank 0 is that process (its beat names its pid and identity), and it stops
        os.kill(host_process.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while _proc_identity(host_process.pid)[0] != "T":  # (the stop lands asynchronously)
            assert time.monotonic() < deadline, "the process did not stop"
            time.sleep(0.01)
        w.dogs[1]._monitor.seen[0] = Beat(3, 4, 3, "train", socket.gethostname(), host_process.pid,
                                          _proc_identity(host_process.pid)[1])
        w.store.down = True
        for t in range(4, 16):
            w.at(t, [1])
        assert w.exits == {1: EXIT_CODE}
        assert f"SIGKILL sent to the stopped rank 0 on this host (pid {host_process.pid})" \
            in w.message(1)
        assert host_process.wait(timeout=10) == -signal.SIGKILL
    finally:
        host_process.kill()
        host_process.wait()


def test_ranks_that_do_not_watch_end_the_job_when_every_watcher_is_stalled():
    w = World(3, watchers=[0])
    w.at(1, [2, 1, 0], progress=[0, 1, 2], step=1)
    for t in range(2, 22):  # the only watcher, rank 0, is frozen
        assert w.at(t, [1, 2]) == {}
    assert w.at(22, [1, 2])[1].kind == "unwatched"
    assert ("[watchdog] rank 1 made no progress for 21 s (at step 1, phase train) and the "
            "watching rank 0 reported nothing. Ending the job") in w.message(1)


def test_finished_ranks_are_ignored_and_disabled_watchdogs_do_nothing():
    w = World(2)
    w.at(1, [0, 1], progress=[0, 1], step=1)
    w.dogs[1].close()  # rank 1 done; rank 0 goes on alone
    for t in range(2, 40):
        assert w.at(t, [0], progress=[0], step=t) == {}
    for dog in (Watchdog(10.0, world_size=1), Watchdog(0.0, world_size=4)):
        assert not dog.enabled
        dog.start(0)
        dog.progress(1)
        with dog.phase("save"):
            pass
        dog.close()
        assert dog.tick() is None and not dog.started
    with pytest.raises(ValueError, match="allowed"):
        Watchdog(-1.0)


@pytest.mark.parametrize("flag", ["watchdog_timeout", "watchdog_save_timeout",
                                  "collective_timeout_minutes"])
def test_flags_are_validated(flag):
    from megatron_dsv3.training.trainer import TrainArgs
    from megatron_dsv3.training.validation import validate_train_args

    validate_train_args(TrainArgs(**{flag: 0.0}))  # 0 = off / default
    with pytest.raises(ValueError, match="--" + flag.replace("_", "-") + " -1.0 is invalid: "
                                         "allowed values are numbers >= 0"):
        validate_train_args(TrainArgs(**{flag: -1.0}))


# -- finite collective timeouts in every process group ------------------------------------------
def test_every_process_group_gets_the_collective_timeout():
    """new_group does not inherit the default group's timeout (torch's default, 30 min for gloo,
    would apply): our init passes it to Megatron's groups and our dispatch groups."""
    code = """
import megatron_dsv3, datetime
from megatron.core import parallel_state as ps
from megatron_dsv3.world import init_single_process
from megatron_dsv3.liveness import group_timeout
from megatron_dsv3.dispatch import initialize_dispatch_groups
from megatron_dsv3.dispatch import topology
init_single_process(timeout_minutes=7)
initialize_dispatch_groups()
groups = [None] + [g for g in ps._global_process_group_list if g is not None]
for rails, nodes, lanes in topology._COLLECTIVE_GROUPS.values():
    groups += [g for lg in rails + nodes for g in lg.groups] + lanes
print(len(groups), sorted({str(group_timeout(g)) for g in groups}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    count, timeouts = out.stdout.split(" ", 1)
    assert int(count) > 10 and timeouts.strip() == "['0:07:00']", out.stdout


# -- the real thing: torchrun, two expert-parallel ranks, one SIGSTOPped -------------------------
def _tagged_pids(tag):
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if tag in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


@pytest.mark.timeout(300)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGSTOP and /proc")
@pytest.mark.parametrize("when", ["2", "start"], ids=["after-step-2", "in-start-up"])
def test_stopped_rank_ends_the_job_within_the_watchdog_timeout(tmp_path, when):
    """A rank stopped after a step (allowance: the timeout) or in start-up, where the others
    wait in a barrier (allowance: 3 x the timeout; before, nothing watched start-up and they
    waited for the collective timeout, 20 minutes by default)."""
    tag = f"MEGATRON_DSV3_LIVENESS_TEST={uuid.uuid4().hex}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(29300 + os.getpid() % 300),
           os.path.join(ROOT, "examples", "pretrain_tiny.py"), "--steps", "6", "--ep", "2",
           "--micro-batch-size", "2", "--seq-length", "16", "--corpus-bytes", str(1 << 19),
           "--cache-dir", str(tmp_path / "cache"), "--save-dir", str(tmp_path / "run"),
           "--log-interval", "1", "--warmup-steps", "1", "--watchdog-timeout", "8"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MEGATRON_DSV3_STOP_RANK_AT=f"1:{when}",
               **dict([tag.split("=")]))
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=150)  # torch's default would be 30 min
        seconds = time.time() - start
        assert proc.returncode != 0, out[-3000:]
        assert f"rank 1 stops (SIGSTOP) after step {when}" in out, out[-3000:]
        report = [line for line in out.splitlines() if line.startswith("[watchdog] rank 1 made")]
        seen = "step 2, phase train" if when == "2" else "step 0, phase startup"
        assert report and f"last seen at {seen}; its heartbeat stopped too" in report[0], \
            out[-3000:]
        assert "Ending the job (watchdog of rank 0, timeout 8 s)" in report[0]
        assert f"exitcode  : {EXIT_CODE}" in out  # torchrun's report: rank 0's watchdog
        time.sleep(0.5)
        assert _tagged_pids(tag.encode()) == [], "a process of the job was left behind"
        print(f"SIGSTOPped rank: job ended after {seconds:.1f} s: {report[0]}")
    finally:
        for pid in [proc.pid] + _tagged_pids(tag.encode()):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        proc.wait()


def test_a_collective_timeout_within_the_save_allowance_is_refused():
    """Ranks that finished a save wait for the slowest writer in a collective: a collective
    timeout at or below the watchdog's save allowance would end a slow but healthy save with a
    timeout naming no rank. The defaults are consistent."""
    from megatron_dsv3.training.trainer import TrainArgs
    from megatron_dsv3.training.validation import validate_train_args

    validate_train_args(TrainArgs())
    with pytest.raises(ValueError, match="--collective-timeout-minutes 15.0 is invalid.*900 s"):
        validate_train_args(TrainArgs(collective_timeout_minutes=15.0))
    validate_train_args(TrainArgs(collective_timeout_minutes=15.0, watchdog_save_timeout=600.0))


def _build_trainer(rank, world, tmp, watchdog_timeout):
    from megatron_dsv3.training.trainer import TrainArgs, Trainer

    try:
        Trainer(TrainArgs(steps=1, micro_batch_size=2, seq_length=16, save_dir=None,
                          cache_dir=str(tmp / "cache"), corpus_bytes=1 << 18,
                          watchdog_timeout=watchdog_timeout))
        return "built"
    except ValueError as error:
        return str(error)


def test_a_process_group_made_before_the_trainer_is_checked_against_the_save_allowance(
        tmp_path):
    """The flag's check cannot see a group that existed before the trainer (a framework's, a
    test launcher's): its own timeout is read. Here 120 s, against the default allowance of
    900 s (refused) and of 3 x 30 s (accepted)."""
    from megatron_dsv3.testing.distributed import run_distributed

    refused = run_distributed(_build_trainer, 2, args=(tmp_path, 300.0), timeout=120)
    assert all("the default process group has a collective timeout of 120 s" in r
               and "allows 900 s" in r for r in refused), refused
    assert run_distributed(_build_trainer, 2, args=(tmp_path, 30.0), timeout=120) == \
        ["built", "built"]
    # Megatron's parallel_state made before the trainer with its own 6 s (the default group's
    # 300 s passed the check; a healthy 15 s first step then died as an anonymous gloo timeout)
    refused = run_distributed(_build_trainer, 2, args=(tmp_path, 30.0), timeout=300,
                              megatron_parallel={"distributed_timeout_minutes": 0.1})
    assert all(re.search(r"a process group of Megatron's parallel_state \(ranks \[0, 1\]\) "
                         r"has a collective timeout of 6 s.*allows 90 s", r)
               for r in refused), refused
