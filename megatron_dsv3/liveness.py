"""A stalled rank must never hang the job: finite collective timeouts and a progress watchdog.

Two layers, both needed:

1. **Finite collective timeouts.** A collective that waits on a stalled peer raises after the
   process group's timeout (gloo honours it per collective; NCCL through its watchdog). torch's
   default is 30 minutes for gloo, 10 for NCCL, and `dist.new_group` does **not** inherit the
   default group's timeout: a group made without `timeout=` gets torch's default
   (`distributed_c10d._new_group_with_tag`: ``if timeout is None: timeout =
   _get_default_timeout(backend)``). So the trainer passes one timeout to `init_process_group`, to
   Megatron's `parallel_state.initialize_model_parallel(distributed_timeout_minutes=...)` (then
   `align_group_timeouts` for the one group megatron-core 0.16.1 makes without it) and, via
   `group_timeout()`, to our dispatch groups (`dispatch.topology`). Trainer flag:
   `--collective-timeout-minutes` (default 20).

2. **A progress watchdog** (`Watchdog`), which names the culprit within minutes and never waits on
   the collective that hangs. Each rank runs a daemon thread; the training loop reports
   `progress(step)` once per step and brackets slow phases (`with watchdog.phase("save"):`). Every
   `interval` seconds (timeout / 10, at most 5 s) the thread publishes this rank's heartbeat (beat
   counter, progress counter, step, phase, host, pid) in the rendezvous store, and the *watching*
   ranks (all ranks up to 8, else ranks 0, W/2 and W-1) read every rank's heartbeat with one
   `multi_get`. Ages are measured on the watcher's own monotonic clock from when it saw a value
   change, so clock skew between nodes does not matter. A watcher ends the job when

   - a rank's heartbeat has not changed for its allowance: the process is stopped or frozen
     (SIGSTOP, a dead node, a hung kernel: its thread no longer runs), or
   - the ranks furthest behind (fewest progress reports) have all made no progress for their
     allowance (a rank alive but stuck; or every rank stuck at the same point).

   It prints one message to stderr, e.g.::

       [watchdog] rank 1 made no progress for 11 s (last seen at step 2, phase train; its
       heartbeat stopped too: the process is stopped or frozen); rank 0 is waiting at step 2,
       phase train. Ending the job (watchdog of rank 0, timeout 10 s).

   writes it under the key ``abort`` (every other rank's watchdog then ends its process too:
   multi-node launchers need not wait for the collective timeout), and ends its process with
   `os._exit(75)`, so torchrun tears the job down. A stopped process reacts to SIGTERM only once
   resumed (torchrun waits 30 s before SIGKILL): a frozen rank on the watcher's own host that is
   in the stopped state ('T') is sent SIGKILL, identified by pid, boot id and start time.

   The allowance is `timeout` in ordinary phases and `slow_timeout` (default 3 x timeout) in the
   phases of `SLOW_PHASES`: "startup" (from `start()` to the first `progress()`: the first step
   builds lazy state) and "save"/"load" (checkpoints; a 2048-GPU job sets it above its slowest
   save, and no false alarm can come from a long save). Outside the watched loop (before
   `start()`, after `close()`) nothing is watched: a closed rank publishes "done" and is ignored.

   The store: a separate client of the rendezvous TCPStore (torchrun's, or rank 0's with env:// or
   tcp:// initialisation), found under the default store's prefixes. A TCPStore client waits for a
   reply without a timeout, and a SIGSTOPped store host (rank 0 without torchrun: its server thread
   stops with it) answers nothing, so every store call runs on a helper thread that the watchdog
   waits for at most one interval; a store that has not answered for `timeout` is reported as its
   host being stalled ("rank 0 (host of the rendezvous store ...) made no progress ..."): the
   store's server thread answers whatever its host's main thread does, saves included. Ranks that
   do not watch end the job themselves if their own progress stops for twice the allowance and no
   watcher has spoken (all watchers stalled).

Timeouts to choose: watchdog timeout > the slowest ordinary step (plus the data-loader stalls you
accept), and below the collective timeout, so the watchdog's message comes first; slow_timeout
above the slowest checkpoint save (and the collective timeout above the longest time a rank may
wait in a save's barrier for the slowest writer). Defaults in the trainer: `--watchdog-timeout 300`,
`--watchdog-save-timeout 0` (= 3 x 300 s), `--collective-timeout-minutes 20` (the trainer refuses
one at or below the save allowance).

**Megatron-LM's own loop** (`python -m megatron_dsv3.pretrain_gpt ...`) is not watched by this
watchdog. It gets finite collective timeouts from Megatron's flag ``--distributed-timeout-minutes
N`` (default 10 in Megatron-LM core_v0.16.1), which Megatron passes to `init_process_group` and to
the groups of `initialize_model_parallel`; our dispatch groups take the same value through
`group_timeout()`. One group of megatron-core 0.16.1 is made without it (the gloo
EXPERT_DATA_PARALLEL_GROUP_GLOO: torch's 30 min); ``--distributed-timeout-seconds-after-init S``
sets every group of parallel_state to S seconds after start-up (`update_pg_timeout`), that one
included. With NCCL, keep ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` on (the default) so a timed-out
collective ends the process instead of leaving it hung.

Standard library and torch.distributed only: no model imports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import itertools
import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

SLOW_PHASES = ("startup", "save", "load")
EXIT_CODE = 75  # EX_TEMPFAIL: a stall, worth a restart from the last checkpoint
PREFIX = "megatron_dsv3/watchdog"
_INSTANCES = itertools.count()
_ACTIVE: Optional["Watchdog"] = None  # the started, not yet closed watchdog of this process


def flush_active(wait: float = 5.0) -> bool:
    """Publish the running watchdog's state now (fault injection: make "stopped after step N"
    visible to the others before stopping); False when there is none or it did not get through."""
    return _ACTIVE.flush(wait) if _ACTIVE is not None else False


# -- collective timeouts ------------------------------------------------------------------------
TORCH_DEFAULT_TIMEOUT_MINUTES = {"gloo": 30.0, "nccl": 10.0}
"""torch's process-group timeout when none is given (a timeout of 0 here), by backend."""


def collective_timeout(minutes: float) -> Optional[datetime.timedelta]:
    """`minutes` as a timedelta for init_process_group/new_group; None (torch's default) for 0."""
    if minutes < 0:
        raise ValueError(f"collective timeout {minutes} min is invalid: allowed values are "
                         "numbers >= 0 (0 = torch's default)")
    return datetime.timedelta(minutes=minutes) if minutes else None


def group_timeout(group=None) -> Optional[datetime.timedelta]:
    """The timeout of `group` (the default process group if None), to give groups made with
    `dist.new_group` the same one (they do not inherit it); None when it cannot be read."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    try:
        pg = group or dist.distributed_c10d._get_default_group()
        for device in ("cuda", "cpu"):
            try:
                backend = pg._get_backend(torch.device(device))
            except Exception:
                continue
            timeout = getattr(getattr(backend, "options", None), "_timeout", None)
            if isinstance(timeout, datetime.timedelta):
                return timeout
    except Exception:
        return None
    return None


def align_group_timeouts(groups: Iterable, timeout: Optional[datetime.timedelta] = None) -> List:
    """Give each of `groups` (None entries and groups this rank is not in are skipped) `timeout`,
    by default the default group's, where its own differs; returns the groups changed.

    Limit (torch 2.13, gloo): this reaches the group's collectives, not its point-to-point
    send/recv, which keep the timeout the group was created with. The one group aligned today
    (megatron-core 0.16.1's gloo EXPERT_DATA_PARALLEL_GROUP_GLOO) carries collectives only; a
    group that needs finite send/recv waits must be created with the timeout (`group_timeout()`)."""
    import torch.distributed as dist

    timeout = timeout or group_timeout()
    setter = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    changed = []
    if timeout is None or setter is None:
        return changed
    for g in groups:
        if g is None or g == dist.GroupMember.NON_GROUP_MEMBER:
            continue
        current = group_timeout(g)
        if current is not None and current != timeout:
            try:
                setter(timeout, g)
                changed.append(g)
            except (ValueError, RuntimeError):
                pass
    return changed


# -- heartbeats ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Beat:
    """What a rank publishes each interval."""

    beat: int  # increases every interval while the process runs
    progress: int  # number of progress reports (steps and phase changes)
    step: int
    phase: str
    host: str = ""
    pid: int = 0
    ident: str = ""  # boot id and process start time: the pid's identity on its host
    done: bool = False

    def dumps(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def loads(cls, data) -> "Beat":
        if isinstance(data, bytes):
            data = data.decode()
        return cls(**json.loads(data))


def ranks_text(ranks: Sequence[int]) -> str:
    """'rank 3' / 'ranks 0, 2-5' (consecutive ranks as ranges)."""
    ranks = sorted(ranks)
    parts, i = [], 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        parts.append(str(ranks[i]) if i == j else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(parts)


@dataclasses.dataclass
class Verdict:
    kind: str  # "frozen", "stuck", "store", "unwatched"
    ranks: List[int]
    message: str


class Monitor:
    """A watcher's view of every rank: when it last saw each rank's beat and progress change (its
    own clock), and whether someone is stalled. Pure logic: tested with a fake clock."""

    def __init__(self, world_size: int, allowance: Callable[[str], float], now: float):
        self.world_size = world_size
        self.allowance = allowance
        self.started = now
        self.seen: Dict[int, Beat] = {}
        self.beat_at = {r: now for r in range(world_size)}
        self.progress_at = {r: now for r in range(world_size)}

    def observe(self, now: float, beats: Dict[int, Optional[Beat]]) -> None:
        for r, b in beats.items():
            if b is None:
                continue
            old = self.seen.get(r)
            if old is None or b.beat != old.beat or b.ident != old.ident:
                self.beat_at[r] = now
            if old is None or b.progress != old.progress or b.ident != old.ident:
                self.progress_at[r] = now
            self.seen[r] = b

    def _allow(self, r: int) -> float:
        return self.allowance(self.seen[r].phase if r in self.seen else "startup")

    def live(self) -> List[int]:
        return [r for r in range(self.world_size) if not (r in self.seen and self.seen[r].done)]

    def verdict(self, now: float) -> Optional[Verdict]:
        live = self.live()
        if not live:
            return None
        frozen = [r for r in live if now - self.beat_at[r] > self._allow(r)]
        if frozen:
            return Verdict("frozen", frozen, self.describe(now, frozen, frozen=True))
        count = {r: self.seen[r].progress if r in self.seen else -1 for r in live}
        low = min(count.values())
        behind = [r for r in live if count[r] == low]
        if all(now - self.progress_at[r] > self._allow(r) for r in behind):
            # Behind together (e.g. all in start-up's barrier): a rank whose heartbeat stopped
            # while the others' go on is the one that holds them (frozen before its allowance
            # for a silent heartbeat ran out, as its last beat came after its last progress).
            newest = max(self.beat_at[r] for r in live)
            silent = [r for r in behind if newest - self.beat_at[r] > self.allowance("train")]
            if silent and len(silent) < len(live):
                return Verdict("frozen", silent, self.describe(now, silent, frozen=True))
            return Verdict("stuck", behind, self.describe(now, behind))
        return None

    def where(self, r: int) -> str:
        b = self.seen.get(r)
        return f"step {b.step}, phase {b.phase}" if b else "never seen"

    def describe(self, now: float, stalled: Sequence[int], frozen: bool = False) -> str:
        """The one message: who made no progress for how long and where it was last seen, then
        where the others wait."""
        live = self.live()
        groups: Dict[Tuple, List[int]] = {}
        for r in stalled:
            b = self.seen.get(r)
            groups.setdefault((b.step, b.phase) if b else None, []).append(r)
        clauses = []
        for key, ranks in groups.items():
            age = min(now - self.progress_at[r] for r in ranks)
            if key is None:
                seen = f"never seen since the watchdog started {now - self.started:.0f} s ago"
            else:
                seen = f"last seen at step {key[0]}, phase {key[1]}"
            if frozen and key is not None:
                seen += "; its heartbeat stopped too: the process is stopped or frozen" \
                    if len(ranks) == 1 else "; their heartbeats stopped too: stopped or frozen"
            clauses.append(f"{ranks_text(ranks)} made no progress for {age:.0f} s ({seen})")
        others: Dict[Tuple, List[int]] = {}
        for r in live:
            if r not in stalled and r in self.seen:
                others.setdefault((self.seen[r].step, self.seen[r].phase), []).append(r)
        waiting = [f"{ranks_text(rs)} {'is' if len(rs) == 1 else 'are'} waiting at step {s}, "
                   f"phase {p}" for (s, p), rs in sorted(others.items())]
        if len(stalled) == len(live) and len(live) > 1 and len(groups) == 1:
            waiting = ["no rank is ahead of the others"]
        done = [r for r in range(self.world_size) if r not in live]
        if done:
            waiting.append(f"{ranks_text(done)} finished")
        return f"[watchdog] {'; '.join(clauses + waiting)}."


# -- store access that can be abandoned ---------------------------------------------------------
class _Call:
    """fn() on a daemon thread: a hung store call blocks only that thread."""

    def __init__(self, fn: Callable, inline: bool = False):
        self.done = threading.Event()
        self.beat = -1
        self.result = None
        self.error: Optional[BaseException] = None
        if inline:
            self._run(fn)
        else:
            threading.Thread(target=self._run, args=(fn,), daemon=True,
                             name="watchdog-store-call").start()

    def _run(self, fn):
        try:
            self.result = fn()
        except BaseException as e:  # noqa: B902 - reported to the watchdog thread
            self.error = e
        finally:
            self.done.set()


def _underlying_tcp_store(store):
    seen = 0
    while store is not None and seen < 16:
        if type(store).__name__ == "TCPStore":
            return store
        store = getattr(store, "underlying_store", None)
        seen += 1
    return None


def rendezvous_store_address() -> Tuple[Optional[str], Optional[int], Optional[int]]:
    """(host, port, hosting rank) of the default group's TCPStore; rank None when torchrun's agent
    hosts it (TORCHELASTIC_USE_AGENT_STORE), 0 otherwise (env:// and tcp:// initialisation)."""
    import torch.distributed as dist

    host_rank = None if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else 0
    try:
        tcp = _underlying_tcp_store(dist.distributed_c10d._get_default_store())
    except Exception:
        tcp = None
    if tcp is not None:
        return tcp.host, tcp.port, host_rank
    if os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), host_rank
    return None, None, host_rank


def _store_factory(prefix: str, op_timeout: float) -> Callable:
    """A function making this watchdog's own client of the rendezvous store (keys under
    `prefix`); the default store itself when it is not a TCPStore (FileStore, HashStore)."""
    import torch.distributed as dist

    host, port, _ = rendezvous_store_address()

    def make():
        if host is not None:
            client = dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=op_timeout))
        else:
            client = dist.distributed_c10d._get_default_store()
        return dist.PrefixStore(prefix, client)

    return make


def _proc_identity(pid: int) -> Tuple[str, str]:
    """(state letter, boot id:start time) of a local process; ('', '') when unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return fields[0], f"{boot}:{fields[19]}"
    except (OSError, IndexError):
        return "", ""


# -- the watchdog -------------------------------------------------------------------------------
def slow_allowance(timeout: float, slow_timeout: float = 0.0) -> float:
    """Seconds without progress the watchdog allows in a slow phase (a checkpoint save, the first
    step): `slow_timeout`, 0 = 3 x `timeout`, never below `timeout`."""
    return max(float(timeout), float(slow_timeout) or 3 * float(timeout))


class Watchdog:
    """See the module docstring. `progress`, `phase`, `start` and `close` are called by the
    training loop; `tick` is one round of the thread (tests call it with a fake clock/store)."""

    def __init__(self, timeout: float, slow_timeout: float = 0.0, *, rank: int = 0,
                 world_size: int = 1, store_factory: Optional[Callable] = None,
                 store_host_rank: Optional[int] = 0, store_address: str = "",
                 clock: Callable[[], float] = time.monotonic,
                 exit: Callable[[int], None] = os._exit, output=None,
                 interval: Optional[float] = None, watchers: Optional[Iterable[int]] = None,
                 thread: bool = True, kill_stopped: bool = True):
        if timeout < 0 or slow_timeout < 0:
            raise ValueError(f"watchdog timeouts ({timeout}, {slow_timeout}) are invalid: allowed "
                             "values are seconds >= 0 (0 = off)")
        self.timeout = float(timeout)
        self.slow_timeout = slow_allowance(self.timeout, slow_timeout)
        self.rank, self.world_size = rank, world_size
        self.enabled = self.timeout > 0 and world_size > 1
        self.interval = interval or min(5.0, max(0.05, self.timeout / 10))
        if watchers is None:
            watchers = range(world_size) if world_size <= 8 else \
                {0, world_size // 2, world_size - 1}
        self.watchers = sorted(set(watchers))
        self.watching = rank in self.watchers
        self._factory = store_factory
        self._store = None
        self.store_host_rank, self.store_address = store_host_rank, store_address
        self._clock, self._exit = clock, exit
        self._output = output
        self._threaded = thread
        self._kill_stopped = kill_stopped
        host = socket.gethostname()
        _, ident = _proc_identity(os.getpid())
        self._me = Beat(0, 0, 0, "startup", host, os.getpid(), ident)
        self._progress_at = clock()
        self._lock = threading.Lock()
        self._monitor: Optional[Monitor] = None
        self._pending: Optional[_Call] = None
        self._pending_since: Optional[float] = None
        self._failing_since: Optional[float] = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._cv = threading.Condition()
        self._published_beat = -1
        self._thread: Optional[threading.Thread] = None
        self.started = False
        self.ended: Optional[str] = None  # the message this watchdog ended the job with

    # -- called by the training loop ---------------------------------------------------------
    def allowance(self, phase: str) -> float:
        return self.slow_timeout if phase in SLOW_PHASES else self.timeout

    def start(self, step: int = 0) -> "Watchdog":
        """Begin watching, in phase "startup" (slow allowance) until the first progress()."""
        if not self.enabled or self.started:
            return self
        self.started = True
        self._set(step, "startup")
        self._monitor = Monitor(self.world_size, self.allowance, self._clock())
        if self._threaded:
            self._thread = threading.Thread(target=self._loop, daemon=True,
                                            name=f"watchdog-rank{self.rank}")
            self._thread.start()
        global _ACTIVE
        _ACTIVE = self
        return self

    def progress(self, step: int, phase: str = "train") -> None:
        """This rank has reached `step` and is now in `phase`. Cheap: no I/O on this thread."""
        if self.enabled:
            self._set(step, phase)

    @contextlib.contextmanager
    def phase(self, name: str):
        """A phase with its own allowance (e.g. "save"); the previous phase resumes after it."""
        if not self.enabled:
            yield
            return
        before = self._me.phase
        self._set(self._me.step, name)
        try:
            yield
        finally:
            self._set(self._me.step, before)

    def close(self) -> None:
        """Stop watching; publish "done" so that watchers ignore this rank from now on."""
        with self._lock:
            if not self.started or self._stop.is_set():
                return
            self._stop.set()  # no new exchange starts after this
            self._wake.set()
            self._me = dataclasses.replace(self._me, done=True, beat=self._me.beat + 1)
            me, pending = self._me, self._pending
        if pending is not None:  # let a beat in flight land first: "done" must be the last word
            pending.done.wait(self.interval)
        if pending is None or pending.done.is_set():
            call = _Call(lambda: self._client().set(f"beat/{self.rank}", me.dumps()),
                         inline=not self._threaded)
            call.done.wait(self.interval)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.interval + 1)
        global _ACTIVE
        if _ACTIVE is self:
            _ACTIVE = None

    # -- the thread --------------------------------------------------------------------------
    def _set(self, step: int, phase: str) -> None:
        with self._lock:
            self._me = dataclasses.replace(self._me, step=step, phase=phase,
                                           progress=self._me.progress + 1)
            self._progress_at = self._clock()

    def _loop(self) -> None:
        while not self._stop.is_set():  # a first beat at once, then one per interval
            try:
                self.tick()
            except Exception as e:  # the watchdog must never take a healthy job down
                print(f"[watchdog] rank {self.rank}: internal error {e!r}; watching goes on",
                      file=sys.stderr, flush=True)
            self._wake.wait(self.interval)
            self._wake.clear()

    def flush(self, wait: float = 5.0) -> bool:
        """Publish this rank's state now (not at the next interval) and wait up to `wait` seconds
        for it to reach the store; False if it did not. For fault injection and shutdown paths."""
        if not self.started or self._thread is None or self._stop.is_set():
            return False
        with self._cv:
            goal = self._me.beat + 1  # the next exchange carries the state as of now
            self._wake.set()
            return self._cv.wait_for(lambda: self._published_beat >= goal, timeout=wait)

    def _client(self):
        if self._store is None:
            self._store = self._factory()
        return self._store

    def _exchange(self, me: Beat):
        """On the helper thread: publish my beat, read the abort key and (watchers) all beats."""
        store = self._client()
        store.set(f"beat/{self.rank}", me.dumps())
        abort = store.get("abort") if store.check(["abort"]) else None
        beats = None
        if self.watching:
            keys = [f"beat/{r}" for r in range(self.world_size)]
            if store.check(keys):
                beats = dict(enumerate(store.multi_get(keys)))
            else:  # before every rank has published once
                beats = {r: store.get(k) for r, k in enumerate(keys) if store.check([k])}
            beats = {r: Beat.loads(v) for r, v in beats.items()}
        return abort, beats

    def tick(self) -> Optional[Verdict]:
        """One round: exchange with the store (never waiting more than an interval), then judge.
        Returns the verdict it ended the job with, if any."""
        now = self._clock()
        with self._lock:
            if not self.started or self._stop.is_set():
                return None
            if self._pending is None:
                self._me = dataclasses.replace(self._me, beat=self._me.beat + 1)
                me = self._me
                self._pending_since = now
                self._pending = _Call(lambda: self._exchange(me), inline=not self._threaded)
                self._pending.beat = me.beat
            call = self._pending
        call.done.wait(self.interval)
        if call.done.is_set():
            self._pending = None
            if call.error is not None:
                self._store = None  # reconnect next round
                if self._failing_since is None:
                    self._failing_since = self._pending_since
            else:
                self._failing_since = None
                with self._cv:
                    self._published_beat = max(self._published_beat, call.beat)
                    self._cv.notify_all()
                abort, beats = call.result
                if abort is not None:
                    return self._follow(abort)
                if beats is not None:
                    self._monitor.observe(self._clock(), beats)
        elif self._failing_since is None:
            self._failing_since = self._pending_since
        now = self._clock()
        verdict = self._judge(now)
        if verdict is not None:
            self._end(verdict)
        return verdict

    def _judge(self, now: float) -> Optional[Verdict]:
        m = self._monitor
        if self._failing_since is not None:
            # the store's server thread answers whatever its host's main thread is doing (a
            # save, the first step): silence for the plain timeout means a frozen host
            host = self.store_host_rank
            silent = now - self._failing_since
            if silent <= self.timeout:
                return None
            where = self.store_address or "the rendezvous store"
            mine = f"step {self._me.step}, phase {self._me.phase}"
            if host is not None and host != self.rank:
                return Verdict("store", [host], (
                    f"[watchdog] rank {host} (host of the rendezvous store {where}) made no "
                    f"progress for at least {silent:.0f} s: the store has not answered rank "
                    f"{self.rank} for {silent:.0f} s" + (f" (last seen at {m.where(host)})"
                                                         if host in m.seen else "")
                    + f"; rank {self.rank} is waiting at {mine}."))
            return Verdict("store", [], (
                f"[watchdog] the rendezvous store {where} has not answered rank {self.rank} for "
                f"{silent:.0f} s (rank {self.rank} is at {mine})."))
        if self.watching:
            return m.verdict(now)
        # not a watcher: only a backstop in case every watcher is stalled
        own = now - self._progress_at
        if own > 2 * self.allowance(self._me.phase):
            text = (f"[watchdog] rank {self.rank} made no progress for {own:.0f} s (at step "
                    f"{self._me.step}, phase {self._me.phase}) and the watching "
                    f"{ranks_text(self.watchers)} reported nothing.")
            return Verdict("unwatched", [self.rank], text)
        return None

    def _print(self, text: str) -> None:
        """Print `text` without ever being held by the output: a pipe nobody reads (a stalled
        `| tee`, a log shipper pushing back) would block the print, and with it the exit of a
        job the watchdog is ending. The print runs on a daemon thread, waited for one interval
        at most (os._exit then ends the process, that thread included)."""
        out = self._output or sys.stderr
        _Call(lambda: print(text, file=out, flush=True)).done.wait(max(self.interval, 1.0))

    def _end(self, verdict: Verdict) -> None:
        # stopped processes react to the launcher's SIGTERM only once resumed: a frozen rank,
        # or the stopped host of the rendezvous store, is sent SIGKILL where it is on this host
        stopped = verdict.kind == "frozen" or (verdict.kind == "store" and verdict.ranks)
        killed = self._kill_local_stopped(verdict) if stopped else []
        text = (f"{verdict.message} Ending the job (watchdog of rank {self.rank}, timeout "
                f"{self.timeout:g} s).")
        if killed:  # a stopped process reacts to the launcher's SIGTERM only once resumed
            text += (f" SIGKILL sent to the stopped {ranks_text([r for r, _ in killed])} on this "
                     f"host (pid {', '.join(str(pid) for _, pid in killed)}).")
        self.ended = text
        if verdict.kind != "store":  # tell the other ranks (best effort, one interval at most)
            payload = json.dumps({"by": self.rank, "message": text})
            call = _Call(lambda: self._client().set("abort", payload), inline=not self._threaded)
            call.done.wait(self.interval)
        self._print(text)
        self._stop.set()
        # the training's own buffered output, bounded as the print (os._exit flushes nothing)
        _Call(sys.stdout.flush).done.wait(max(self.interval, 1.0))
        self._exit(EXIT_CODE)

    def _follow(self, abort) -> Verdict:
        """Another rank's watchdog ended the job: end this process too, with a short line."""
        try:
            by = json.loads(abort.decode() if isinstance(abort, bytes) else abort)["by"]
        except (ValueError, KeyError, TypeError):
            by = "?"
        text = (f"[watchdog] rank {self.rank} ends: the watchdog of rank {by} ended the job "
                "(see its message)")
        self.ended = text
        self._print(text)
        self._stop.set()
        self._exit(EXIT_CODE)
        return Verdict("abort", [], text)

    def _kill_local_stopped(self, verdict: Verdict) -> List[Tuple[int, int]]:
        """SIGKILL the frozen ranks on this host that are in the stopped state: they would react
        to the launcher's SIGTERM only when resumed (torchrun waits 30 s, then SIGKILLs)."""
        if not self._kill_stopped:
            return []
        killed = []
        for r in verdict.ranks:
            b = self._monitor.seen.get(r)
            if not b or b.host != self._me.host or not b.ident or b.pid == os.getpid():
                continue
            state, ident = _proc_identity(b.pid)
            if state == "T" and ident == b.ident:
                try:
                    os.kill(b.pid, signal.SIGKILL)
                    killed.append((r, b.pid))
                except OSError:
                    pass
        return killed


def make_watchdog(timeout: float, slow_timeout: float = 0.0, **kw) -> Watchdog:
    """This rank's watchdog over the default process group and the rendezvous store (disabled,
    i.e. all calls no-ops, for one rank or timeout 0). Not started: call `start()`."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if timeout <= 0 or world == 1:
        return Watchdog(0.0 if world == 1 else timeout, slow_timeout, rank=rank, world_size=1)
    interval = kw.pop("interval", None) or min(5.0, max(0.05, timeout / 10))
    host, port, host_rank = rendezvous_store_address()
    run = "{}/{}".format(os.environ.get("TORCHELASTIC_RUN_ID", "run"),
                         os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    prefix = f"{PREFIX}/{run}/{next(_INSTANCES)}/"
    address = f"{host}:{port}" + (" (torchrun agent)" if host_rank is None else "") \
        if host else ""
    return Watchdog(timeout, slow_timeout, rank=rank, world_size=world, interval=interval,
                    store_factory=_store_factory(prefix, max(1.0, interval)),
                    store_host_rank=host_rank if host else None, store_address=address, **kw)
