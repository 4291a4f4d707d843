"""Range-checked numbers for our command lines, with one wording for every refusal.

A `NumberRange` is an argparse `type=` (argparse puts the flag in front of the message:
``argument --top-p: 1.5 is invalid: allowed values are numbers in (0, 1]``) and checks values that
arrive another way, e.g. dataclass fields (``--clip-grad -1.0 is invalid: allowed values are
numbers >= 0 (0 = off)``). Floats must be finite; integers must be written as integers.

Imports nothing heavy: every CLI may import it before parsing.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Optional, Union

Number = Union[int, float]


def _fmt(x: Number) -> str:
    return str(x) if isinstance(x, int) or not float(x).is_integer() else str(int(x))


@dataclasses.dataclass(frozen=True)
class NumberRange:
    integer: bool
    low: Optional[Number] = None
    high: Optional[Number] = None
    low_open: bool = False   # low itself is excluded
    high_open: bool = False  # high itself is excluded
    note: str = ""           # what special values mean, e.g. "0 = off"

    def describe(self) -> str:
        kind = "integers" if self.integer else "numbers"
        if self.low is not None and self.high is not None:
            text = (f"{kind} in {'(' if self.low_open else '['}{_fmt(self.low)}, "
                    f"{_fmt(self.high)}{')' if self.high_open else ']'}")
        elif self.low is not None:
            text = f"{kind} {'>' if self.low_open else '>='} {_fmt(self.low)}"
        elif self.high is not None:
            text = f"{kind} {'<' if self.high_open else '<='} {_fmt(self.high)}"
        else:
            text = f"finite {kind}" if not self.integer else kind
        return f"{text} ({self.note})" if self.note else text

    def with_note(self, note: str) -> "NumberRange":
        return dataclasses.replace(self, note=note)

    def contains(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def error(self, flag: str, value) -> str:
        return f"{flag} {value} is invalid: allowed values are {self.describe()}"

    def check(self, flag: str, value) -> None:
        """ValueError naming `flag` and the allowed values unless `value` is in the range."""
        if not self.contains(value):
            raise ValueError(self.error(flag, value))

    def __call__(self, text: str) -> Number:
        """argparse `type=`: the parsed number, or ArgumentTypeError with the allowed values."""
        try:
            value = int(text) if self.integer else float(text)
        except (TypeError, ValueError):
            value = None
        if value is None or not self.contains(value):
            shown = text if text and not any(c.isspace() for c in text) else repr(text)
            raise argparse.ArgumentTypeError(
                f"{shown} is invalid: allowed values are {self.describe()}")
        return value


def int_range(low: Optional[int] = None, high: Optional[int] = None, note: str = "") -> NumberRange:
    return NumberRange(True, low, high, note=note)


def float_range(low: Optional[float] = None, high: Optional[float] = None, *,
                low_open: bool = False, high_open: bool = False, note: str = "") -> NumberRange:
    return NumberRange(False, low, high, low_open, high_open, note)


positive_int = int_range(1)
non_negative_int = int_range(0)
positive_float = float_range(0, low_open=True)
non_negative_float = float_range(0)
probability = float_range(0, 1, low_open=True)  # (0, 1]
seed_int = int_range(0, 2**32 - 1)  # numpy's RandomState (Megatron's datasets) takes no more
port_int = int_range(1, 65535)


def check_device(flag: str, value: Optional[str]):
    """torch.device of `value` (None: None), or ValueError naming `flag` and the allowed values:
    cpu or cuda[:N], cuda only where CUDA is available."""
    if value is None:
        return None
    import torch

    try:
        device = torch.device(value)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"{flag} {value!r} is invalid: allowed are cpu, cuda, cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag} {value} is invalid here: CUDA is not available (allowed: cpu)")
    return device


PLOT_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg")


def check_plot_path(flag: str, path: str) -> str:
    """`path` for a plot file, or ValueError naming `flag`: a file name ending in one of
    PLOT_FORMATS, in a directory that exists, not itself a directory."""
    import os

    ext = os.path.splitext(path)[1].lstrip(".").lower()
    if not path or os.path.isdir(path) or ext not in PLOT_FORMATS:
        raise ValueError(f"{flag} {path!r} is invalid: allowed are file names ending in "
                         f"{', '.join('.' + f for f in PLOT_FORMATS)}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path}: the directory {parent} does not exist (allowed: a file "
                         "in an existing directory)")
    return path


def path_text(value: str) -> str:
    """argparse type of a path flag: any non-empty string (an empty one names no file, and
    os.path treats it as the current directory)."""
    if not value:
        raise argparse.ArgumentTypeError("'' is invalid: allowed are non-empty paths")
    return value
