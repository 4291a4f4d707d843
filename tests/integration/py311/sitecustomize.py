"""Put on PYTHONPATH by test_megatron_lm_loop.run_loop on Python < 3.12 only: Megatron-LM 0.19+'s
training package imports typing.override (Python 3.12); the typing_extensions back-port (same
decorator) stands in, in every process, including those multiprocessing spawns (0.19's
checkpoint writer). Not a CUDA site: the Python version only."""

import typing

try:
    import typing_extensions
except ImportError:  # nothing to back-port from
    typing_extensions = None

if typing_extensions is not None and not hasattr(typing, "override"):
    typing.override = typing_extensions.override
