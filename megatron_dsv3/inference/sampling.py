"""Next-token choice from logits: greedy, or sampled with temperature, top-k and top-p; and the
log-probabilities of the chosen tokens.

Log-probabilities are the model's: log_softmax of the raw logits (float32), before temperature,
top-k and top-p, so they do not depend on how a token was chosen (as the "logprobs" of most
generation APIs).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from megatron_dsv3.cli import int_range, non_negative_float, non_negative_int, probability

SEEDS = int_range(0, 2**64 - 1)
"""Seeds torch.Generator.manual_seed takes as themselves (it also takes -2**63..-1, as aliases of
2**64 + seed)."""


@dataclass
class SamplingParams:
    temperature: float = 0.0
    """0 = greedy (argmax); otherwise logits are divided by it before sampling."""
    top_k: int = 0
    """Sample among the k most likely tokens only (0 = all)."""
    top_p: float = 1.0
    """Sample among the smallest set of most likely tokens whose probability reaches top_p."""
    seed: Optional[int] = None
    """Seed of the request's own torch.Generator (None: drawn from torch's global RNG)."""
    logprobs: int = 0
    """Also report, for every generated token, the log-probabilities of this many most likely
    tokens at its position (0 = only the chosen token's, which is always reported)."""

    def __post_init__(self):
        for name, allowed in (("temperature", non_negative_float.with_note("0 = greedy")),
                              ("top_k", non_negative_int.with_note("0 = off")),
                              ("top_p", probability),
                              ("logprobs", non_negative_int.with_note("0 = the chosen token's "
                                                                      "only")),
                              ("seed", SEEDS.with_note("or None: drawn from torch's global "
                                                       "RNG"))):
            value = getattr(self, name)
            if not (name == "seed" and value is None) and not allowed.contains(value):
                raise ValueError(f"{name}={value!r} is invalid: allowed values are "
                                 f"{allowed.describe()}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


FLOAT32_ZERO_BELOW = 2.0 ** -150
"""Temperatures at or below it (half float32's smallest subnormal, 2^-149) round to 0 in float32."""


def filtered_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [V] / temperature with everything outside top-k and top-p set to -inf (shifted by
    their maximum first: the same softmax, and no overflow to inf - then NaN - for a very small
    temperature)."""
    logits = logits.float()
    if params.temperature <= FLOAT32_ZERO_BELOW:
        # a temperature float32 rounds to 0 divides by 0 there: its limit, the most likely
        # token(s), all the mass (ties share it)
        return torch.where(logits == logits.max(), 0.0, float("-inf"))
    logits = logits - logits.max()
    if params.top_k and params.top_k < logits.numel():
        # (before the temperature: a huge one makes every logit 0 in float32, and top-k then
        # kept the whole vocabulary)
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # (a temperature above float32's range is inf there: finite / inf = 0, the uniform limit;
    # a dropped token's -inf stays -inf instead of -inf / inf = NaN)
    logits = torch.where(torch.isinf(logits), logits, logits / params.temperature)
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class NonFiniteLogitsError(ValueError):
    """The model produced NaN or infinite logits: no token can be chosen from them (its weights or
    activations hold NaN/inf, e.g. a checkpoint with broken scales, or an overflow)."""


_DEFERRED: contextvars.ContextVar[Optional[List[BaseException]]] = contextvars.ContextVar(
    "dsv3_deferred_nonfinite", default=None)


@contextlib.contextmanager
def deferring_nonfinite() -> Iterator[List[BaseException]]:
    """Within the block check_finite_logits records its error and makes the logits finite
    instead of raising, so a step whose forwards other ranks take part in (expert parallelism)
    runs to its end; the caller raises the first recorded error after the step."""
    errors: List[BaseException] = []
    token = _DEFERRED.set(errors)
    try:
        yield errors
    finally:
        _DEFERRED.reset(token)


def check_finite_logits(logits: torch.Tensor, requests: Sequence[int], positions: Sequence[int],
                        step: str) -> None:
    """NonFiniteLogitsError naming the step, the request and the position unless every logit is
    finite. logits [b, t, V]: row i is request `requests[i]` (its index in the caller's list) at
    positions positions[i] .. positions[i] + t - 1. One reduction when all are finite. Inside
    `deferring_nonfinite` the error is recorded and the logits are zeroed where not finite."""
    finite = torch.isfinite(logits)
    if bool(finite.all()):
        return
    row, t = (int(x) for x in (~finite).any(-1).nonzero()[0])  # the first bad (request, position)
    value = logits[row, t][~finite[row, t]][0].item()
    error = NonFiniteLogitsError(
        f"{step}: request {requests[row]} has non-finite logits ({value}) at position "
        f"{positions[row] + t}; refusing to choose a token from them (the model's weights or "
        "activations hold NaN or infinity)")
    deferred = _DEFERRED.get()
    if deferred is None:
        raise error
    deferred.append(error)
    logits.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # (the step's tokens are discarded)


def make_generator(params: SamplingParams, device) -> Optional[torch.Generator]:
    if params.greedy or params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def sample_next(logits: torch.Tensor, params: SamplingParams,
                generator: Optional[torch.Generator] = None) -> int:
    """One token id from logits [V]."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(filtered_logits(logits, params), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class Sampled:
    """Tokens chosen for one request in one step, with their log-probabilities under the model."""

    tokens: List[int] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)
    """log p(token) per token: log_softmax of the raw logits at its position."""
    top_logprobs: List[Dict[int, float]] = field(default_factory=list)
    """Per token, the SamplingParams.logprobs most likely tokens -> their log-probabilities
    (empty when SamplingParams.logprobs is 0)."""


def with_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: int = 0) -> Sampled:
    """`tokens` chosen from logits [n, V] (row j for tokens[j]), with log_softmax(logits) of each
    and, if `top`, the `top` most likely tokens of each row."""
    logp = torch.log_softmax(logits.float(), dim=-1)                          # [n, V]
    chosen = torch.tensor(list(tokens), dtype=torch.long, device=logp.device)
    out = Sampled(list(tokens), logp.gather(-1, chosen[:, None])[:, 0].tolist())
    if top:
        values, ids = torch.topk(logp, min(top, logp.shape[-1]), dim=-1)       # [n, top]
        out.top_logprobs = [dict(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    return out
