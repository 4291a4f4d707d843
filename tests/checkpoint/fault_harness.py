"""Kill a process (SIGKILL) at each file operation of the commit protocol in turn, then run the
next job, and report what it found. Run as a script by tests/checkpoint/test_commit_faults.py:

    python fault_harness.py trainer WORKDIR     # the trainer's checkpoints: kill, resume, losses
    python fault_harness.py convert WORKDIR     # the converter's --overwrite output

It imports torch and megatron_dsv3 once and forks a child per job (no torch op runs in this process
before a fork, so no thread pool is copied half-alive). Every file operation of the protocol
passes `commit.fault_point`; a first, uninterrupted child lists them (MEGATRON_DSV3_FAULT_LOG),
then one child per point is killed there (MEGATRON_DSV3_FAULT_AT=N) and the next job runs. One
JSON object per point goes to stdout.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import megatron_dsv3  # noqa: E402,F401


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(job, env, result_file):
    os.environ.update(env)
    torch.set_num_threads(1)
    try:
        value = job()
        out = {"ok": True, "value": value}
    except BaseException as error:  # reported to the parent, which decides
        out = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    with open(result_file, "w") as f:
        json.dump(out, f)
    os._exit(0)


def run_child(job, work, env=None, timeout=300):
    """Run job() in a forked child; (exit code, its result dict or None)."""
    result_file = os.path.join(work, f"result-{os.getpid()}-{_free_port()}.json")
    child_env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
                 "WORLD_SIZE": "1", "LOCAL_RANK": "0", **(env or {})}
    for key in ("MEGATRON_DSV3_FAULT_AT", "MEGATRON_DSV3_FAULT_LOG"):
        child_env.setdefault(key, "")
    proc = multiprocessing.get_context("fork").Process(target=_child,
                                                       args=(job, child_env, result_file))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return "timeout", None
    if not os.path.exists(result_file):
        return proc.exitcode, None
    with open(result_file) as f:
        result = json.load(f)
    os.remove(result_file)
    return proc.exitcode, result


def fault_points(job, work):
    """Labels of the fault points an uninterrupted job(…) passes, in order."""
    log = os.path.join(work, "points.log")
    if os.path.exists(log):
        os.remove(log)
    code, result = run_child(job, work, {"MEGATRON_DSV3_FAULT_LOG": log})
    assert code == 0 and result["ok"], result
    with open(log) as f:
        return [line.rstrip("\n").split("\t", 1)[1] for line in f], result["value"]


# -- the trainer ------------------------------------------------------------------------------------
def trainer_jobs(work):
    from megatron_dsv3.training.trainer import TrainArgs, Trainer

    def args(save_dir, **kw):
        base = dict(steps=4, save_interval=2, keep_checkpoints=1, micro_batch_size=2,
                    seq_length=16, log_interval=100, warmup_steps=1, corpus_bytes=1 << 18,
                    cache_dir=os.path.join(work, "cache"), save_dir=save_dir)
        base.update(kw)
        return TrainArgs(**base)

    def train(save_dir, **kw):
        def job():
            history = Trainer(args(save_dir, **kw), log=lambda *_: None).train()
            return {r["step"]: r["lm_loss"] for r in history}
        return job

    return train


def published_step(save_dir):
    from megatron_dsv3.checkpoint.commit import CheckpointStore, verify_manifest

    store = CheckpointStore(os.path.join(save_dir, "checkpoints"))
    latest = store.latest()
    if latest is None:
        return None
    verify_manifest(latest)  # every file present with its size and checksum
    return torch.load(os.path.join(latest, "rank0.pt"), weights_only=False)["step"]


def main_trainer(work):
    train = trainer_jobs(work)
    reference_dir = os.path.join(work, "reference")
    labels, reference = fault_points(train(reference_dir), work)
    reference = {int(k): v for k, v in reference.items()}
    for n, label in enumerate(labels, 1):
        save_dir = os.path.join(work, f"killed-{n}")
        code, _ = run_child(train(save_dir), work, {"MEGATRON_DSV3_FAULT_AT": str(n)})
        record = {"point": n, "label": label, "exit": code}
        try:
            record["published"] = published_step(save_dir)
        except Exception as error:  # a published checkpoint that does not verify: reported
            record["published_error"] = f"{type(error).__name__}: {error}"
            print(json.dumps(record), flush=True)
            continue
        # the next run: resume from the last published checkpoint, or start over if none
        resume = {"resume": "auto"} if record["published"] is not None else {"overwrite": True}
        code, result = run_child(train(save_dir, **resume), work)
        record["next_exit"] = code
        record["next"] = result
        if result and result["ok"]:
            losses = {int(k): v for k, v in result["value"].items()}
            record["resumed_at"] = min(losses) - 1 if losses else 4
            record["identical"] = all(losses[s] == reference[s] for s in losses)
            record["leftovers"] = sorted(n for n in os.listdir(os.path.join(save_dir, "checkpoints"))
                                         if n.startswith("."))
        print(json.dumps(record), flush=True)
    print(json.dumps({"reference": reference, "points": len(labels)}), flush=True)


# -- the converter ----------------------------------------------------------------------------------
def tree(path):
    """{relative file: bytes} of a directory."""
    out = {}
    for base, _, files in os.walk(path):
        for name in files:
            full = os.path.join(base, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = f.read()
    return out


def _tree_without_manifest(path):
    """The directory's files but the manifest and torch.distributed.checkpoint's `.metadata`
    (both hold a fresh id per write; the manifest check covers them)."""
    from megatron_dsv3.checkpoint.commit import MANIFEST_FILE

    return {k: v for k, v in tree(path).items() if k not in (MANIFEST_FILE, ".metadata")}


def convert_sweep(work, kind, job, old_args, new_args, existing):
    """Kill job(out, *new_args) at each fault point, with an existing output written by
    job(out, *old_args) (existing=True, i.e. --overwrite) or none; then run it again."""
    from megatron_dsv3.checkpoint.commit import recover_directory, verify_manifest

    tag = f"{kind}-{'overwrite' if existing else 'fresh'}"
    ref_old, ref_new = os.path.join(work, f"{tag}-old"), os.path.join(work, f"{tag}-new")
    assert run_child(job(ref_old, *old_args), work)[1]["ok"]
    if existing:
        assert run_child(job(ref_new, *old_args), work)[1]["ok"]
    labels, _ = fault_points(job(ref_new, *new_args), work)
    old, new = _tree_without_manifest(ref_old), _tree_without_manifest(ref_new)
    for n, label in enumerate(labels, 1):
        name = f"{tag}-{n}"
        out = os.path.join(work, name)
        if existing:
            assert run_child(job(out, *old_args), work)[1]["ok"]
        code, _ = run_child(job(out, *new_args), work, {"MEGATRON_DSV3_FAULT_AT": str(n)})
        record = {"kind": tag, "point": n, "label": label, "exit": code}
        recover_directory(out)  # what every reader does first (a no-op after an exchange)
        if not os.path.exists(out):
            record["state"] = "absent"
        else:
            try:
                verify_manifest(out)
                now = _tree_without_manifest(out)
                record["state"] = "old" if now == old else "new" if now == new else "other"
            except Exception as error:
                record["state"] = f"unusable: {error}"
        code, result = run_child(job(out, *new_args), work)  # the same command again
        record["rerun"] = ("new" if result and result["ok"] and _tree_without_manifest(out) == new
                           else f"{code} {result}")
        record["leftovers"] = sorted(x for x in os.listdir(work)
                                     if x.startswith((f".{name}.", ".deleting-")))
        print(json.dumps(record), flush=True)


def main_convert(work):
    from hf_checkpoints import make_hf_checkpoint

    from megatron_dsv3.checkpoint.convert import dist_to_hf, hf_to_dist

    src = os.path.join(work, "hf")
    make_hf_checkpoint(src, rope_interleave=False)
    source = tree(src)

    def to_dist(out, dtype):
        return lambda: hf_to_dist(src, out, dtype=dtype, overwrite=True, progress=False)

    dist_src = os.path.join(work, "dist")
    assert run_child(to_dist(dist_src, torch.float32), work)[1]["ok"]

    def to_hf(out, fp8):
        return lambda: dist_to_hf(dist_src, out, fp8=fp8, overwrite=True, progress=False)

    def to_dist_without_exchange(out, dtype):
        def job():  # a filesystem without renameat2(RENAME_EXCHANGE): the fallback's two renames
            from megatron_dsv3.checkpoint import commit

            commit.exchange_directories = lambda a, b: False
            return to_dist(out, dtype)()
        return job

    for existing in (True, False):
        convert_sweep(work, "hf2dist", to_dist, (torch.float32,), (torch.bfloat16,), existing)
    convert_sweep(work, "hf2dist-noexchange", to_dist_without_exchange, (torch.float32,),
                  (torch.bfloat16,), True)
    convert_sweep(work, "dist2hf", to_hf, (False,), (True,), True)
    print(json.dumps({"source_intact": tree(src) == source}), flush=True)


if __name__ == "__main__":
    kind, work = sys.argv[1], sys.argv[2]
    os.makedirs(work, exist_ok=True)
    {"trainer": main_trainer, "convert": main_convert}[kind](work)
