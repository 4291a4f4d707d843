"""Errors of checkpoint files that say which file (and tensor) is wrong, and what is wrong with it.

    with reading(shard, "safetensors shard"):  # json/struct/EOF/OS/safetensors/torch.load errors
        header = parse(shard)                   #   -> CheckpointFileError naming `shard`
    with writing(path):                         # a full disk -> OSError(ENOSPC, "no space left on
        torch.save(state, path)                 #   device while writing <path>"); no partial file

Libraries report a bad file without its name (`struct.error: unpack requires a buffer of 8 bytes`,
`JSONDecodeError: Expecting value`, `SafetensorError: MetadataIncompleteBuffer`, torch.save's
`enforce fail at inline_container.cc` on a full disk); these wrappers add the name. Only the
standard library is imported here, so every layer (trainer, converter, generation) can use them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import stat
import struct
import traceback
from typing import Iterator, Optional

__all__ = ["CheckpointFileError", "reading", "writing", "no_space_error", "describe",
           "rank0_failure"]


class CheckpointFileError(ValueError):
    """A checkpoint file (shard, index, config, trainer checkpoint) that cannot be used.

    `file`: its path; `tensor`: the tensor concerned, if any; `problem`: what is wrong, as a
    predicate ("is truncated: ...", "has shape [1, 1]; ..."). The message is "tensor T in FILE
    PROBLEM" or "FILE PROBLEM".
    """

    def __init__(self, file: str, problem: str, tensor: Optional[str] = None):
        self.file, self.problem, self.tensor = str(file), problem, tensor
        where = f"tensor {tensor} in {self.file}" if tensor else self.file
        super().__init__(f"{where} {problem}")

    def __reduce__(self):  # (picklable across processes with its three fields)
        return type(self), (self.file, self.problem, self.tensor)


def _is_safetensors_error(error: BaseException) -> bool:
    return type(error).__module__.startswith("safetensors") or \
        type(error).__name__ == "SafetensorError"


def _describe(error: BaseException) -> Optional[str]:
    """What a library error says about a file, or None for errors that are not about the file
    (our own ValueErrors, which already say what is wrong, and programming errors)."""
    if isinstance(error, CheckpointFileError):
        return None
    if isinstance(error, json.JSONDecodeError):
        return f"malformed JSON ({error.msg} at line {error.lineno} column {error.colno})"
    if isinstance(error, UnicodeDecodeError):
        return f"not text ({error.reason} at byte {error.start})"
    if isinstance(error, FileNotFoundError):
        return "the file does not exist"
    if isinstance(error, OSError):
        return (error.strerror or str(error)).lower() if error.errno else str(error)
    if isinstance(error, (EOFError, struct.error)):
        return f"truncated ({type(error).__name__}: {error})"
    if isinstance(error, pickle.UnpicklingError):
        return f"corrupt ({type(error).__name__}: {error})"
    if _is_safetensors_error(error):
        return f"corrupt or truncated (safetensors: {error})"
    if isinstance(error, RuntimeError):  # torch.load: "PytorchStreamReader failed reading ..."
        return f"corrupt or truncated ({error})"
    return None


def _unwrap(error: BaseException) -> BaseException:
    """The first rank's error inside torch.distributed.checkpoint's CheckpointException (a
    BaseException holding {rank: (exception, stack)}); other errors as they are."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        if isinstance(first, tuple) and first and isinstance(first[0], BaseException):
            return first[0]
    return error


@contextlib.contextmanager
def reading(file: str, what: str = "checkpoint file", tensor: Optional[str] = None
            ) -> Iterator[str]:
    """Read `file` (a `what`: "safetensors shard", "index", "config.json", ...) inside the block;
    an error of the file's content or of the OS becomes a CheckpointFileError naming the file (and
    `tensor`): "FILE is not a readable WHAT: the file is empty (0 bytes)". Our own ValueErrors
    (CheckpointFileError included) and programming errors pass through unchanged. Yields `file`."""
    try:
        yield file
    except BaseException as error:
        cause = _unwrap(error)
        detail = _describe(cause) if isinstance(cause, Exception) else None
        if detail is None:
            raise
        try:
            if os.path.isfile(file) and os.path.getsize(file) == 0:
                detail = "the file is empty (0 bytes)"
        except OSError:
            pass
        raise CheckpointFileError(file, f"is not a readable {what}: {detail}", tensor) from error


# -- writing ------------------------------------------------------------------------------------
# What torch.save (its C++ PyTorchStreamWriter, which loses errno) raises when a write fails, as
# seen from torch 2.13 on a full tmpfs: "[enforce fail at inline_container.cc:672] . unexpected pos
# 576 vs 534" while writing, "basic_ios::clear: iostream error" when the disk is full at the start.
_TORCH_WRITE_FAILURES = ("inline_container.cc", "iostream error", "file write failed",
                         "PytorchStreamWriter failed")
# torch's message does not say why the write failed: it is a full disk when (before the partial
# file is removed) the file system has less than this left for us.
_FULL_BELOW_BYTES = 64 * 2**20


def no_space_error(file: str) -> OSError:
    return OSError(errno.ENOSPC, f"no space left on device while writing {file}")


def _free_bytes(file: str) -> Optional[int]:
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(file)))
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def _write_failure(error: BaseException, file: str) -> Optional[OSError]:
    """The OSError naming `file` that a failed write should raise, or None to keep `error`."""
    if isinstance(error, OSError):
        if error.errno == errno.ENOSPC:
            return no_space_error(file)
        if error.errno and error.filename is None:  # a write(2) error: add the file
            return OSError(error.errno, f"{(error.strerror or str(error)).lower()} "
                                        f"while writing {file}")
        return None
    message = str(error)
    if _is_safetensors_error(error) and ("os error 28" in message
                                         or "No space left on device" in message):
        return no_space_error(file)
    if isinstance(error, RuntimeError) and any(p in message for p in _TORCH_WRITE_FAILURES):
        free = _free_bytes(file)
        if free is not None and free < _FULL_BELOW_BYTES:
            return no_space_error(file)
        return OSError(errno.EIO, f"write failed while writing {file} ({message})")
    return None


def _signature(file: str):
    """What tells whether a block wrote a regular file (None: absent or not a regular file, such as
    /dev/full, which is never removed)."""
    try:
        st = os.stat(file)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None


@contextlib.contextmanager
def writing(file: str) -> Iterator[str]:
    """Write `file` inside the block; yields `file`:

        with writing(path):                 # or: with writing(path) as path:
            torch.save(state, path)

    If the block fails, the partial file is removed (unless it existed before the block and the
    block did not touch it), and a failed write names the file: a full disk (errno ENOSPC, or
    torch.save's RuntimeError for it) raises OSError(ENOSPC, "no space left on device while
    writing FILE"); another write(2) error raises OSError(its errno, "... while writing FILE");
    torch.save's other write failures raise OSError(EIO, "write failed while writing FILE (...)").
    Everything else is re-raised unchanged. It does not make the write atomic (the directory
    commit does that); it guarantees no half-written file is left behind by a failed write.
    """
    before = _signature(file)
    try:
        yield file
    except BaseException as error:
        translated = _write_failure(error, file) if isinstance(error, Exception) else None
        # (judge a full disk above before the partial file is removed and frees its space)
        if translated is not None:
            # torch.save's C++ writer, still referenced by the tracebacks' frames, holds the file
            # open: without this the removed file's space stays in use until it is collected
            seen, chained = set(), error
            while chained is not None and id(chained) not in seen:
                seen.add(id(chained))
                traceback.clear_frames(chained.__traceback__)
                chained = chained.__cause__ or chained.__context__
        after = _signature(file)
        if after is not None and after != before:
            with contextlib.suppress(OSError):
                os.remove(file)
        if translated is None:
            raise
        raise translated from error


def describe(error: BaseException) -> tuple:
    """(type name, message) of an error, to broadcast to the other ranks."""
    return type(error).__name__, str(error)


def rank0_failure(failure: tuple, what: str) -> Exception:
    """Rank 0's failure `failure` (from describe) for the other ranks to raise: a ValueError where
    it was a refusal, else a RuntimeError saying rank 0 could not `what`."""
    kind, message = failure
    if kind in ("ValueError", "CheckpointFileError"):
        return ValueError(message)
    return RuntimeError(f"rank 0 could not {what} ({kind}: {message})")
