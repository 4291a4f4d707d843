"""One commit protocol for every directory we write: nothing is published before it is complete.

Two shapes of destination share it:

- `atomic_directory(path)` - a directory named by the user (an HF or distributed checkpoint
  written by the converter or `save_hf`). Files go into a hidden sibling `.NAME.incomplete-TAG`,
  are fsynced, a manifest is added, and the sibling is published in ONE atomic step: a plain
  rename when `path` does not exist, else an atomic exchange of the two directories
  (`renameat2(RENAME_EXCHANGE)`), after which the old content sits under the hidden name and is
  deleted. At every instant `path` is the old complete directory or the new complete one.
  Filesystems without the exchange fall back to rename-aside + rename, and the next write to (or
  `recover_directory` of) that path puts a renamed-aside directory back if it was left alone.

- `CheckpointStore(root)` - a series of checkpoints (the trainer's). Each save goes into
  `root/.partial-step_NNNNNN-TAG`, is fsynced with its manifest, renamed to a fresh
  `root/step_NNNNNN` and published by atomically replacing the tracker file `root/latest.json`
  (written to a temporary file, fsynced, renamed: Megatron's latest_checkpointed_iteration.txt
  idea). The tracker names the latest checkpoint and the last `keep` ones; only then are older
  ones deleted (renamed to `.deleting-*` first, so a half-deleted directory is never mistaken for
  a checkpoint). `recover()` at start removes partial saves, half-deleted directories and
  step directories the tracker does not name - never the published ones, never the one a run
  resumes from, and without a tracker never a complete (manifested) one.

Every published directory carries `checkpoint_manifest.json`: each file's size and CRC-32.
`verify_manifest` names the missing, truncated or corrupted file.

Fault injection (tests): every file operation of the protocol passes `fault_point(label)`.
MEGATRON_DSV3_FAULT_AT=N sends SIGKILL to this process at the N-th point (1-based);
MEGATRON_DSV3_FAULT_LOG=FILE appends each point's label to FILE, so a test can list the points
first and then kill at each in turn.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import signal
import tempfile
import uuid
import zlib
from typing import Callable, Dict, Iterable, Iterator, List, Optional

from megatron_dsv3.checkpoint.errors import CheckpointFileError, writing

MANIFEST_FILE = "checkpoint_manifest.json"
TRACKER_FILE = "latest.json"
STEP_DIR = re.compile(r"^step_(\d{6,})(?:\.r\d+)?$")  # (the store writes step_{step:06d})
_CHUNK = 8 << 20

# -- fault points ---------------------------------------------------------------------------------
_points = 0


def fault_point(label: str) -> None:
    """A point between two file operations of the protocol (see the module docstring)."""
    global _points
    _points += 1
    log = os.environ.get("MEGATRON_DSV3_FAULT_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{_points}\t{label}\n")
    if os.environ.get("MEGATRON_DSV3_FAULT_AT") == str(_points):
        os.kill(os.getpid(), signal.SIGKILL)


# -- durable file operations ----------------------------------------------------------------------
def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ChecksumFile:
    """A binary file opened for writing that keeps the CRC-32 and size of what went through it
    (torch.save and our writers write through it; the manifest needs no second read)."""

    def __init__(self, path: str, fault_label: Optional[str] = None):
        self.path = path
        self._f = open(path, "wb")
        self.crc = 0
        self.size = 0
        self._fault_label = fault_label

    def write(self, data) -> int:
        n = self._f.write(data)
        if self._fault_label:  # one fault point after the first bytes: a half-written file
            label, self._fault_label = self._fault_label, None
            self._f.flush()
            fault_point(label)
        self.crc = zlib.crc32(memoryview(data).cast("B")[:n], self.crc)
        self.size += n
        return n

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        """Flush, fsync and close."""
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()

    def entry(self) -> Dict:
        return {"size": self.size, "crc32": self.crc}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            self._f.close()


def write_file_atomic(path: str, data: bytes, label: str = "file") -> None:
    """Replace `path` by `data` in one rename (temp file in the same directory, fsynced)."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    fault_point(f"{label}: write {os.path.basename(tmp)}")
    try:
        with writing(tmp):
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fault_point(f"{label}: rename over {os.path.basename(path)}")
    os.replace(tmp, path)
    fault_point(f"{label}: fsync {directory}")
    fsync_dir(directory)


def crc32_of(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                return crc
            crc = zlib.crc32(block, crc)


# -- manifests ------------------------------------------------------------------------------------
def _files_under(directory: str) -> List[str]:
    out = []
    for base, _, files in os.walk(directory):
        for name in files:
            rel = os.path.relpath(os.path.join(base, name), directory)
            if rel != MANIFEST_FILE:
                out.append(rel)
    return sorted(out)


def write_manifest(directory: str, known: Optional[Dict[str, Dict]] = None,
                   covers: Optional[Callable[[str], bool]] = None, **meta) -> Dict:
    """Write `directory`/checkpoint_manifest.json: size and CRC-32 of every file (those for which
    `covers(relative name)` holds, when given; `known` entries, e.g. from ChecksumFile, are taken
    as they are; every other file is read once), fsync every file and the directory."""
    known = dict(known or {})
    files = {}
    for rel in _files_under(directory):
        path = os.path.join(directory, rel)
        if covers is not None and not covers(rel):
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            continue
        files[rel] = known.pop(rel, None) or {"size": os.path.getsize(path),
                                             "crc32": crc32_of(path)}
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    if known:
        raise CheckpointFileError(os.path.join(directory, sorted(known)[0]),
                                  "is missing although it was written (lost before the commit)")
    manifest = {"format": 1, "files": files, **meta}
    fault_point(f"manifest: write {directory}")
    path = os.path.join(directory, MANIFEST_FILE)
    with writing(path):
        with open(path, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    for base, _, _ in os.walk(directory):
        fsync_dir(base)
    return manifest


def read_manifest(directory: str) -> Optional[Dict]:
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"].items()
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as error:
        raise CheckpointFileError(path, f"is not a readable manifest ({error})") from None
    for rel, entry in files:
        for field in ("size", "crc32"):
            value = entry.get(field) if isinstance(entry, dict) else None
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CheckpointFileError(path, f"entry {rel!r}: field {field!r} is {value!r}; "
                                                "allowed values are integers >= 0")
    return manifest


_CHANGED_ON_PURPOSE = f"; if it was changed on purpose, delete {MANIFEST_FILE}"


def verify_manifest(directory: str, checksum: Optional[List[str]] = None,
                    required: bool = True) -> Optional[Dict]:
    """Check every file the manifest lists exists with its size, and the CRC-32 of the files in
    `checksum` (relative names; None = all). Raises CheckpointFileError naming the bad file.
    Without a manifest: an error when `required`, else None."""
    manifest = read_manifest(directory)
    if manifest is None:
        if required:
            raise CheckpointFileError(os.path.join(directory, MANIFEST_FILE),
                                      "is missing: the directory is not a published checkpoint")
        return None
    for rel, entry in manifest["files"].items():
        path = os.path.join(directory, rel)
        if not os.path.isfile(path):
            raise CheckpointFileError(path, "is missing (listed in the checkpoint's manifest)")
        size = os.path.getsize(path)
        if size != entry["size"]:
            raise CheckpointFileError(path, f"has {size} bytes; the manifest says {entry['size']} "
                                            f"(truncated or replaced after the checkpoint was "
                                            f"written{_CHANGED_ON_PURPOSE})")
        if (checksum is None or rel in checksum) and crc32_of(path) != entry["crc32"]:
            raise CheckpointFileError(path, "does not match the checksum in the manifest (the file "
                                            f"is corrupted{_CHANGED_ON_PURPOSE})")
    return manifest


# -- guarding inputs ------------------------------------------------------------------------------
def check_output_outside_input(input_path: str, output_path: str, flag: str = "--output") -> None:
    """ValueError unless `output_path` is neither `input_path`, nor inside it, nor a parent of it
    (writing there, --overwrite above all, would destroy the source); `flag` names the output."""
    src = os.path.realpath(input_path)
    out = os.path.realpath(output_path)
    if out == src:
        raise ValueError(f"the output {output_path} is the input itself: choose another {flag}")
    if out.startswith(src + os.sep):
        raise ValueError(f"the output {output_path} lies inside the input {input_path}: choose a "
                         f"{flag} outside it")
    if src.startswith(out + os.sep):
        raise ValueError(f"the output {output_path} contains the input {input_path} (replacing it "
                         f"would delete the source): choose another {flag}")


def check_output_writable(output_path: str, flag: str = "--output") -> None:
    """ValueError naming `flag` unless a directory can be created beside `output_path` (where
    atomic_directory writes before publishing): tried for real in the nearest existing parent,
    as permissions alone do not tell (root, read-only or virtual file systems)."""
    parent = os.path.dirname(os.path.abspath(output_path))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        what = "a dangling symbolic link" if os.path.islink(parent) else "a file"
        raise ValueError(f"{flag} {output_path}: {parent} is {what}, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=parent))
    except OSError as error:
        raise ValueError(f"{flag} {output_path}: cannot write in {parent} "
                         f"({error.strerror or error})") from error


# -- one user-named directory ---------------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange_directories(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE). False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, f"exchanging {a} and {b}: {os.strerror(err)}")


def _siblings(path: str, kind: str) -> List[str]:
    parent, name = os.path.split(path)
    prefix = f".{name}.{kind}-"
    try:
        return [os.path.join(parent, n) for n in os.listdir(parent) if n.startswith(prefix)]
    except (FileNotFoundError, NotADirectoryError):  # (no such parent: nothing was set aside)
        return []


def _remove_tree(path: str, label: str) -> None:
    """Delete a directory so that no instant shows it half-deleted under a checkpoint's name."""
    parent, name = os.path.split(path)
    doomed = os.path.join(parent, f".deleting-{name.lstrip('.')}-{uuid.uuid4().hex[:6]}")
    fault_point(f"{label}: rename {name} aside for deletion")
    os.rename(path, doomed)
    fault_point(f"{label}: delete {name}")
    shutil.rmtree(doomed, ignore_errors=True)


def _mtime_or_zero(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:  # moved by another reader meanwhile
        return 0.0


def recover_directory(path: str, clean: bool = True) -> None:
    """Undo an interrupted `atomic_directory` commit of `path`: a directory the fallback renamed
    aside goes back when `path` is missing (readers call this with clean=False); with clean=True
    (writers, before writing) partial writes and half-deleted directories are removed too."""
    path = os.path.abspath(path)
    aside = sorted(_siblings(path, "replaced"), key=_mtime_or_zero)
    if aside and not os.path.exists(path):
        try:
            os.rename(aside.pop(), path)
        except OSError:
            if not os.path.exists(path):  # else another reader (rank) put it back first
                raise
    if not clean:
        return
    for leftover in aside + _siblings(path, "incomplete"):
        shutil.rmtree(leftover, ignore_errors=True)
    parent = os.path.dirname(path)
    if os.path.isdir(parent):
        for n in os.listdir(parent):
            if n.startswith(".deleting-"):
                shutil.rmtree(os.path.join(parent, n), ignore_errors=True)


def check_replaceable(path: str) -> None:
    """ValueError unless an existing `path` is something --overwrite may replace: an empty
    directory or one we wrote (it holds our MANIFEST_FILE). A file, or a directory of anything
    else (a typo in --output naming a source tree or a home directory), is never deleted."""
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path) or os.path.islink(path):
        raise ValueError(f"the output {path} exists and is not a directory: --overwrite replaces "
                         "checkpoint directories only (allowed: a new path, or a directory "
                         "written by megatron-dsv3)")
    if os.listdir(path) and not os.path.isfile(os.path.join(path, MANIFEST_FILE)):
        raise ValueError(f"the output {path} holds files but no {MANIFEST_FILE}: it was not "
                         "written by megatron-dsv3, and --overwrite replaces only such "
                         "directories (allowed: a new path, an empty directory, or one of ours); "
                         "remove it yourself if it should go")
    parent, name = os.path.split(os.path.abspath(path))
    store = CheckpointStore(parent)
    state = None
    with contextlib.suppress(ValueError):  # (an unreadable tracker names nothing)
        state = store.read_tracker()
    if state is not None and name in [state["latest"], *state["kept"]]:
        raise ValueError(f"the output {path} is a published checkpoint of a training run (named "
                         f"by {store.tracker}): replacing it would take the run's resume point "
                         "away; write to another path")


@contextlib.contextmanager
def atomic_directory(path: str, overwrite: bool = True,
                     covers: Optional[Callable[[str], bool]] = None,
                     **manifest_meta) -> Iterator[str]:
    """Yield a hidden temporary sibling of `path` to write into; on success it becomes `path`.

    On an exception the temporary directory is removed and `path` is untouched. An existing
    `path` is replaced in one atomic exchange once the new one is complete; with overwrite=False
    an existing `path` is an error before anything is written. The manifest lists the files
    `covers` accepts (all by default).
    """
    path = os.path.abspath(path)
    recover_directory(path)
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    check_replaceable(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = os.path.join(parent, f".{name}.incomplete-{tag}")
    fault_point(f"{name}: create {os.path.basename(tmp)}")
    os.makedirs(tmp)
    try:
        yield tmp
        write_manifest(tmp, covers=covers, **manifest_meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        fault_point(f"{name}: publish")
        fresh = not os.path.exists(path)
        if fresh:
            os.rename(tmp, path)
    except BaseException:  # (e.g. the rename failed: nothing published, nothing left behind)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if fresh:
        fault_point(f"{name}: fsync parent")
        fsync_dir(parent)
        return
    if exchange_directories(tmp, path):  # tmp now holds the old content
        fault_point(f"{name}: fsync parent after the exchange")
        fsync_dir(parent)
        _remove_tree(tmp, name)
        return
    old = os.path.join(parent, f".{name}.replaced-{tag}")  # no exchange: two renames
    os.rename(path, old)
    fault_point(f"{name}: rename the new directory into place (fallback)")
    os.rename(tmp, path)
    fsync_dir(parent)
    _remove_tree(old, name)


# -- a series of checkpoints ----------------------------------------------------------------------
class CheckpointStore:
    """Checkpoints of one run under `root`: step directories, the tracker, the last `keep`."""

    def __init__(self, root: str, keep: int = 2):
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep={keep!r} is invalid (--keep-checkpoints): allowed values are "
                             "integers >= 1")
        self.root = os.path.abspath(root)
        self.keep = keep

    # -- reading --------------------------------------------------------------------------------
    @property
    def tracker(self) -> str:
        return os.path.join(self.root, TRACKER_FILE)

    def read_tracker(self) -> Optional[Dict]:
        if not os.path.isfile(self.tracker):
            return None
        try:
            with open(self.tracker) as f:
                state = json.load(f)
            if not isinstance(state.get("latest"), str) or not isinstance(state.get("kept"), list):
                raise ValueError("expected 'latest' and 'kept'")
        except (OSError, ValueError, AttributeError) as error:
            raise CheckpointFileError(self.tracker, f"is not a readable tracker ({error})") from None
        # the names decide what recovery deletes: a name that is no step directory's (an edit
        # gone wrong, e.g. "step_2" for step_000002) is refused before anything is touched
        if not isinstance(state.get("step", 0), int):
            raise CheckpointFileError(self.tracker, f"field 'step' is {state['step']!r}: allowed "
                                                    "values are integers")
        for field, names in (("latest", [state["latest"]]), ("kept", state["kept"])):
            bad = [n for n in names if not (isinstance(n, str) and STEP_DIR.match(n))]
            if bad:
                raise CheckpointFileError(
                    self.tracker, f"field {field!r} holds {bad[0]!r}: allowed values are step "
                                  "directory names (step_NNNNNN, e.g. step_000002)")
        return state

    def latest(self) -> Optional[str]:
        """The last published checkpoint directory, or None."""
        state = self.read_tracker()
        return None if state is None else self._published(state)

    def _published(self, state: Dict) -> str:
        """The directory the tracker `state` names as latest; CheckpointFileError when it is
        missing (the protocol publishes a checkpoint only after its directory is in place: the
        tracker was edited or its checkpoint deleted by hand)."""
        path = os.path.join(self.root, state["latest"])
        if not os.path.isdir(path):
            raise CheckpointFileError(
                self.tracker, f"names latest={state['latest']!r}, which is missing; nothing was "
                              "removed. Point 'latest' at an existing step directory, or remove "
                              f"{TRACKER_FILE} to resume from the newest complete one")
        return path

    def latest_step(self) -> Optional[int]:
        state = self.read_tracker()
        return None if state is None else state.get("step")

    def untracked_complete(self) -> List[str]:
        """Step directories holding a manifest (complete checkpoints) when there is no tracker
        (a kill between the first save's rename and its tracker, or a copied-in checkpoint),
        oldest first; [] when a tracker exists."""
        if not os.path.isdir(self.root) or self.read_tracker() is not None:
            return []
        names = [n for n in os.listdir(self.root) if STEP_DIR.match(n)
                 and os.path.isfile(os.path.join(self.root, n, MANIFEST_FILE))]

        def order(name: str):
            step, _, again = name[len("step_"):].partition(".r")
            return int(step), int(again or 0)

        return sorted(names, key=order)

    # -- recovery -------------------------------------------------------------------------------
    def recover(self, protect: Iterable[str] = ()) -> List[str]:
        """Remove what interrupted saves left (partial directories, temporary trackers,
        half-deleted directories, and step directories a tracker exists but does not name: a
        save renamed into place whose publication did not happen). Never touches a published
        checkpoint, a directory in `protect` (e.g. the one a run resumes from), or, when there is
        no tracker at all, a step directory holding a manifest (a complete checkpoint whose
        tracker is gone: nothing says it is stale). Returns the names removed."""
        if not os.path.isdir(self.root):
            return []
        state = self.read_tracker()
        kept = set(state["kept"]) if state else set()
        if state:
            kept.add(state["latest"])
            self._published(state)  # (else what it does not name may be all the run has left)
        protected = {os.path.realpath(p) for p in protect}
        removed = []
        for name in sorted(os.listdir(self.root)):
            path = os.path.join(self.root, name)
            if os.path.realpath(path) in protected:
                continue
            unpublished = STEP_DIR.match(name) and name not in kept and (
                state is not None or not os.path.isfile(os.path.join(path, MANIFEST_FILE)))
            junk = (name.startswith((".partial-", ".deleting-"))
                    or name.startswith(f".{TRACKER_FILE}.tmp-") or unpublished)
            if junk:
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.remove(path)
                removed.append(name)
        return removed

    # -- writing --------------------------------------------------------------------------------
    def begin(self, step: int) -> str:
        """A fresh partial directory for the checkpoint of `step` (the caller writes into it)."""
        os.makedirs(self.root, exist_ok=True)
        tmp = os.path.join(self.root, f".partial-step_{step:06d}-{uuid.uuid4().hex[:8]}")
        fault_point(f"store: create {os.path.basename(tmp)}")
        os.makedirs(tmp)
        return tmp

    def _free_name(self, step: int) -> str:
        name, i = f"step_{step:06d}", 0
        while os.path.exists(os.path.join(self.root, name)):
            i += 1
            name = f"step_{step:06d}.r{i}"
        return name

    def publish(self, partial: str, step: int, known: Optional[Dict[str, Dict]] = None,
                reset: bool = False, **meta) -> str:
        """Manifest, rename into place, atomically point the tracker at it, prune old ones.
        reset=True forgets the previously kept checkpoints (a run started with --overwrite)."""
        write_manifest(partial, known, step=step, **meta)
        name = self._free_name(step)
        final = os.path.join(self.root, name)
        fault_point(f"store: rename {os.path.basename(partial)} to {name}")
        os.rename(partial, final)
        fault_point("store: fsync root")
        fsync_dir(self.root)
        state = self.read_tracker()
        if reset:
            previous = []
        elif state is None:  # the complete checkpoints a missing tracker left (e.g. resumed from)
            previous = [n for n in self.untracked_complete() if n != name]
        else:
            previous = [n for n in state["kept"] if n != name]
        kept = (previous + [name])[-self.keep:]
        write_file_atomic(self.tracker, json.dumps(
            {"latest": name, "step": step, "kept": kept}, indent=1).encode(), "tracker")
        for old in (state["kept"] if state else previous):
            if old not in kept and os.path.isdir(os.path.join(self.root, old)):
                _remove_tree(os.path.join(self.root, old), "prune")
        return final


def open_published(path: str) -> str:
    """What every reader of a directory we publish does first: put back a directory an
    interrupted fallback commit left renamed aside, then check every file the manifest lists is
    there with its size (checksums are the trainer's job: an HF checkpoint can be terabytes)."""
    recover_directory(path, clean=False)
    if os.path.isdir(path):
        verify_manifest(path, checksum=[], required=False)
    return path


def resolve_checkpoint(path: str, marker: str = "rank0.pt") -> str:
    """The checkpoint directory meant by `path`: a step directory itself (holds `marker`), a
    store root (latest.json), or a run directory holding `checkpoints/` (or the older
    `checkpoint/`). ValueError naming what was looked for."""
    if os.path.isfile(os.path.join(path, marker)):
        return path
    for root in (path, os.path.join(path, "checkpoints")):
        latest = CheckpointStore(root).latest()  # (refused when it names a missing directory)
        if latest is not None:
            return latest
    legacy = os.path.join(path, "checkpoint")
    if os.path.isfile(os.path.join(legacy, marker)):
        return legacy
    raise ValueError(f"{path} holds no checkpoint: expected a checkpoint directory with {marker}, "
                     f"a checkpoint root with {TRACKER_FILE}, or a run directory with "
                     f"checkpoints/{TRACKER_FILE}")
