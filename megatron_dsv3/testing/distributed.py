"""Run a function in N local processes joined by torch.distributed (gloo).

    results = run_distributed(fn, world_size=8, args=(...), env={"MEGATRON_DSV3_RANKS_PER_NODE": "2"})

`fn(rank, world_size, *args)` runs in every process after init_process_group; its return values
come back as a list indexed by rank. A failure on any rank raises here with that rank's traceback;
a rank that hangs is killed after `timeout` seconds (collectives and the rendezvous time out then
too), and once one rank has failed the others get FAILED_RANK_GRACE_S seconds, so a test never
deadlocks CI and a failure is reported in seconds, not minutes.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Modules the fork server imports once; every rank forked from it starts with them loaded instead
# of importing torch and megatron-core again (seconds of CPU per rank on a small machine).
_PRELOAD = ["torch", "torch.distributed", "megatron.core", "megatron.core.parallel_state",
            "megatron_dsv3", "megatron_dsv3.model", "megatron_dsv3.training.trainer"]
START_METHOD_ENV = "MEGATRON_DSV3_MP_START"  # "forkserver" (default) or "spawn"


def _context():
    method = os.environ.get(START_METHOD_ENV, "forkserver")
    if method not in ("forkserver", "spawn"):
        raise ValueError(f"{START_METHOD_ENV}={method!r}: allowed values are forkserver, spawn")
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _worker(rank, world_size, port, payload, environ, sys_path, out_dir, megatron_parallel,
            timeout):
    """Entry point of a rank: the caller's environment and import path (a forked rank starts
    with the fork server's, taken when it started), then the function and its arguments, which
    may live in modules only that path reaches."""
    import sys

    os.environ.clear()
    os.environ.update(environ)
    sys.path[:] = sys_path
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(world_size))
    import torch
    import torch.distributed as dist

    import megatron_dsv3  # noqa: F401

    torch.set_num_threads(1)
    result: Dict[str, Any]
    try:
        fn, args = pickle.loads(payload)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=timeout))
        if megatron_parallel is not None:
            from megatron.core import parallel_state

            parallel_state.initialize_model_parallel(
                **{"distributed_timeout_minutes": max(1, round(timeout / 60)), **megatron_parallel})
        result = {"ok": True, "value": fn(rank, world_size, *args)}
    except BaseException:  # report everything, including assertion failures
        result = {"ok": False, "error": traceback.format_exc()}
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass


FAILED_RANK_GRACE_S = 20.0  # after one rank failed, how long the others get to finish


def _failed(rank: int, proc, out_dir: str) -> bool:
    """Rank `rank` has ended without success (an exception or a crash)."""
    if proc.exitcode is None:
        return False
    path = os.path.join(out_dir, f"rank{rank}.pkl")
    if not os.path.exists(path):
        return True
    try:
        with open(path, "rb") as f:
            return not pickle.load(f)["ok"]
    except Exception:  # being written
        return False


def _wait(procs, out_dir: str, timeout: float) -> None:
    """Until every process ended, `timeout` passed, or FAILED_RANK_GRACE_S after a rank failed
    (its peers would otherwise wait in a collective or a rendezvous for minutes)."""
    deadline = time.monotonic() + timeout
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        if any(_failed(r, p, out_dir) for r, p in enumerate(procs)):
            deadline = min(deadline, time.monotonic() + FAILED_RANK_GRACE_S)
        time.sleep(0.1)


def run_distributed(fn: Callable, world_size: int, args: Sequence = (),
                    env: Optional[Dict[str, str]] = None, timeout: float = 300.0,
                    megatron_parallel: Optional[Dict[str, Any]] = None) -> List[Any]:
    """Run fn(rank, world_size, *args) on `world_size` gloo ranks; return the per-rank results.

    `megatron_parallel`, if given, is passed to parallel_state.initialize_model_parallel (e.g.
    {"pipeline_model_parallel_size": 2, "expert_model_parallel_size": 4}).

    Ranks are forked from a fork server that has torch, megatron-core and this package imported
    (MEGATRON_DSV3_MP_START=spawn starts each rank as a fresh interpreter instead); each rank
    gets this process's environment (plus `env`) and import path as they are at the call.
    """
    import sys

    ctx = _context()
    port = _free_port()
    environ = {**os.environ, **{k: str(v) for k, v in (env or {}).items()}}
    payload = pickle.dumps((fn, tuple(args)))
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, payload, environ,
                                                      list(sys.path), out_dir,
                                                      megatron_parallel, timeout))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        _wait(procs, out_dir, timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results, errors = [], []
        for r in range(world_size):
            path = os.path.join(out_dir, f"rank{r}.pkl")
            if not os.path.exists(path):
                errors.append(f"rank {r}: no result (exit code {procs[r].exitcode}"
                              f"{', killed after timeout' if r in hung else ''})")
                results.append(None)
                continue
            with open(path, "rb") as f:
                res = pickle.load(f)
            if not res["ok"]:
                errors.append(f"rank {r} failed:\n{res['error']}")
            results.append(res.get("value"))
        if errors:
            raise RuntimeError("distributed run failed:\n" + "\n".join(errors))
        return results
