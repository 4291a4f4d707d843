"""Prefill/decode separation: prefill ranks build a request's latent cache, decode ranks continue.

    roles = Roles(prefill=[0], decode=[1, 2])           # ranks of the default process group
    done = serve_separated(model, requests, roles, speculative=True)   # on every rank

A prefill rank takes the requests `roles.prefill_rank(i)` names, in order of arrival: one forward
over the prompt writes its latents (every decoder layer and the MTP layer) into the rank's own
cache, the first token is sampled (and, speculative, the MTP draft computed); then the request
moves to decode rank `roles.decode_rank(i)` as point-to-point messages (tags 0, 1 and 2):

    header  float64 [request index, prompt length, first token, draft or -1, finished at
            prefill (0/1), time of the first token, its log-probability, k]
    top     float64 [2, k]: the first token's k most likely tokens and their log-probabilities,
            when the request asks for them (SamplingParams.logprobs = k > 0)
    latents [layers, prompt length, kv_lora_rank + rope dim] in the cache dtype (576 values per
            token and layer for DeepSeek-V3), unless the request already finished

and its blocks return to the prefill rank's free list (InferenceEngine.hand_off). A decode rank
receives from each prefill rank in a thread; between decode steps it adopts arrived requests into
free blocks (InferenceEngine.adopt) and decodes all of them together (InferenceEngine.decode_step),
exactly as the colocated engine would after its own prefill, so every request's tokens are those
of colocated serving. When a prefill rank has sent all its requests it sends a header with index
-1 to every decode rank. Both roles drive their engine through its public step API only.

`mixed_load` generates a request stream (Poisson arrivals, short and long prompts) and
`latency_summary` turns per-request times into time to first token and time per output token.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_dsv3.inference.engine import InferenceEngine, Request
from megatron_dsv3.inference.parallel import PeerStoppedError, expert_parallel_group_of
from megatron_dsv3.inference.sampling import Sampled

HEADER = 9
HEADER_TAG, LATENT_TAG, TOP_TAG, RNG_TAG = 0, 1, 2, 3
END, KEEPALIVE, STOPPED = -1.0, -2.0, -3.0  # a header's first field below 0: no hand-off


@dataclass
class Roles:
    prefill: List[int]
    decode: List[int]

    def __post_init__(self):
        ranks = [*self.prefill, *self.decode]
        # (a rank listed twice got two receiver threads on a decode rank, one of them waiting
        # for an end that is sent once)
        if (not self.prefill or not self.decode or len(set(ranks)) != len(ranks)
                or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0
                           for r in ranks)):
            raise ValueError(f"roles prefill={self.prefill} decode={self.decode}: allowed are two "
                             "non-empty lists of distinct ranks (integers >= 0), no rank in both "
                             "or twice")

    def prefill_rank(self, i: int) -> int:
        return self.prefill[i % len(self.prefill)]

    def decode_rank(self, i: int) -> int:
        return self.decode[i % len(self.decode)]


@dataclass
class Served:
    """One request's outcome on the rank that finished it."""

    tokens: List[int]
    finish_reason: str
    token_times: List[float]   # time.time() at which each token was produced
    logprobs: List[float] = field(default_factory=list)   # as Completion.logprobs
    top_logprobs: List[Dict[int, float]] = field(default_factory=list)

    def add(self, event) -> None:
        """Append a TokenEvent of this request."""
        self.tokens += event.tokens
        self.token_times += [event.time] * len(event.tokens)
        self.logprobs += event.logprobs
        self.top_logprobs += event.top_logprobs
        self.finish_reason = event.finish_reason or ""


def _refuse_expert_parallel(model, where: str) -> None:
    """Each rank here serves its own requests, so ranks run different numbers of forwards: an
    expert-parallel model's all-to-alls would not pair up (the busier rank would wait for ever)."""
    if expert_parallel_group_of(model) is not None:
        raise ValueError(f"{where}: the model is expert-parallel (its MoE layers exchange tokens "
                         "with other ranks every forward), but each rank here serves its own "
                         "requests; allowed: a model without expert parallelism "
                         "(expert_model_parallel_size=1), or InferenceEngine with its lockstep "
                         "for expert-parallel serving")


def serve_separated(model, requests: Sequence[Request], roles: Roles, *,
                    speculative: bool = False, block_size: int = 16,
                    max_batch_size: int = 16, num_blocks: Optional[int] = None,
                    start_time: Optional[float] = None) -> Dict[int, Served]:
    """Run this rank's role; decode ranks return {request index: Served} of the requests they
    finished, prefill ranks {}. `start_time` (time.time(), shared by all ranks) anchors the
    requests' arrival times."""
    _refuse_expert_parallel(model, "serve_separated")
    rank = dist.get_rank()
    if rank not in roles.prefill + roles.decode:
        raise ValueError(f"rank {rank} has no role: prefill={roles.prefill}, "
                         f"decode={roles.decode}")
    engine = InferenceEngine(model, block_size=block_size, max_batch_size=max_batch_size,
                             num_blocks=num_blocks, lockstep=None)
    engine.validate(requests, speculative)
    t0 = time.time() if start_time is None else start_time
    if rank in roles.prefill:
        _prefill_role(engine, requests, roles, rank, speculative, t0)
        return {}
    return _DecodeRole(engine, requests, roles, speculative).run()


def _keepalive_seconds() -> float:
    """How often an idle prefill rank tells its decode ranks it is alive: a third of the group's
    timeout (a decode rank's receive of the next hand-off must not time out while the prefill
    rank only waits for the next request to arrive)."""
    from megatron_dsv3.liveness import group_timeout

    timeout = group_timeout()
    return timeout.total_seconds() / 3 if timeout is not None else 60.0


def _header(kind: float, value: float = 0.0) -> torch.Tensor:
    """A control header: END (no more hand-offs), KEEPALIVE, or STOPPED (value: the rank)."""
    header = torch.full((HEADER,), kind, dtype=torch.float64)
    header[1] = value
    return header


def _prefill_role(engine: InferenceEngine, requests, roles: Roles, rank: int,
                  speculative: bool, t0: float) -> None:
    try:
        _prefill_requests(engine, requests, roles, rank, speculative, t0)
    except BaseException:
        for dst in roles.decode:  # the decode ranks stop at once, naming this rank
            dist.send(_header(STOPPED, rank), dst, tag=HEADER_TAG)
        raise
    for dst in roles.decode:
        dist.send(_header(END), dst, tag=HEADER_TAG)


def _prefill_requests(engine: InferenceEngine, requests, roles: Roles, rank: int,
                      speculative: bool, t0: float) -> None:
    mine = sorted((i for i in range(len(requests)) if roles.prefill_rank(i) == rank),
                  key=lambda i: requests[i].arrival)
    keepalive = _keepalive_seconds()
    for i in mine:
        while t0 + requests[i].arrival - time.time() > keepalive:
            time.sleep(keepalive)
            for dst in roles.decode:
                dist.send(_header(KEEPALIVE), dst, tag=HEADER_TAG)
        time.sleep(max(0.0, t0 + requests[i].arrival - time.time()))
        st = engine.admit(i, requests[i])
        event = engine.prefill(st, speculative)
        draft = -1 if st.draft is None else st.draft
        top = event.top_logprobs[0] if event.top_logprobs else {}
        # a seeded request's sampling continues from where the prefill left its generator
        rng = st.generator is not None and not event.finished
        header = torch.tensor([i, st.length, event.tokens[0], draft, int(event.finished),
                               event.time, event.logprobs[0], len(top), int(rng)],
                              dtype=torch.float64)
        dst = roles.decode_rank(i)
        dist.send(header, dst, tag=HEADER_TAG)
        if top:
            dist.send(torch.tensor([list(top), list(top.values())], dtype=torch.float64), dst,
                      tag=TOP_TAG)
        if not event.finished:
            dist.send(engine.hand_off(st).contiguous(), dst, tag=LATENT_TAG)
        if rng:
            dist.send(st.generator.get_state(), dst, tag=RNG_TAG)


class _DecodeRole:
    """A receiver thread per prefill rank (blocking receives: gloo's irecv never reports
    completion to is_completed) feeds a queue that the decode loop drains between steps."""

    def __init__(self, engine: InferenceEngine, requests, roles: Roles, speculative: bool):
        self.engine, self.requests, self.speculative = engine, requests, speculative
        self.cache = engine.cache
        self.inbox: queue.Queue = queue.Queue()
        self.senders = len(roles.prefill)
        self.rng_bytes = torch.Generator(device=engine.device).get_state().numel()
        self.arrived: List = []
        self.served: Dict[int, Served] = {}
        self.threads = [threading.Thread(target=self._receive, args=(src,), daemon=True,
                                         name=f"dsv3-handoff-from-{src}") for src in roles.prefill]
        for t in self.threads:
            t.start()

    def _receive(self, src: int) -> None:
        try:
            while True:
                header = torch.empty(HEADER, dtype=torch.float64)
                dist.recv(header, src, tag=HEADER_TAG)
                index, n, token, draft, finished, t_first, logprob, k, rng = header.tolist()
                if index == KEEPALIVE:
                    continue
                if index == STOPPED:
                    raise PeerStoppedError(f"prefill rank {int(n)} stopped serving (its own log "
                                           "or exception says why); this decode rank stops too")
                if index == END:
                    break
                top = []
                if k:
                    pairs = torch.empty(2, int(k), dtype=torch.float64)
                    dist.recv(pairs, src, tag=TOP_TAG)
                    top = [{int(t): v for t, v in zip(*pairs.tolist())}]
                first = Sampled([int(token)], [logprob], top)
                latents = None
                if not finished:
                    latents = torch.empty(self.cache.num_layers, int(n),
                                          self.cache.values_per_token_per_layer,
                                          dtype=self.cache.data.dtype)
                    dist.recv(latents, src, tag=LATENT_TAG)
                state = None
                if rng:
                    state = torch.empty(self.rng_bytes, dtype=torch.uint8)
                    dist.recv(state, src, tag=RNG_TAG)
                self.inbox.put((int(index), first, int(draft), t_first, latents, state))
        except BaseException as error:  # re-raised by the decode loop
            self.inbox.put(error)
        self.inbox.put(None)  # this sender is done

    def _poll(self, block: bool) -> None:
        """Move arrived hand-offs to `arrived`; with `block`, wait for at least one message."""
        while self.senders:
            try:
                item = self.inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if item is None:
                self.senders -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                self.arrived.append(item)

    def _record(self, event) -> None:
        self.served.setdefault(event.index, Served([], "", [])).add(event)

    def run(self) -> Dict[int, Served]:
        engine, running, reserved = self.engine, [], 0
        while True:
            self._poll(block=not running and not self.arrived)
            while self.arrived and len(running) < engine.max_batch_size:
                index, first, draft, t_first, latents, rng_state = self.arrived[0]
                request = self.requests[index]
                need = engine.blocks_needed(request)
                if latents is not None and reserved + need > self.cache.num_blocks:
                    break
                self.arrived.pop(0)
                st = engine.admit(index, request)
                # the prefill rank's token, through the same stop conditions
                event = engine.adopt(st, first, latents, draft if draft >= 0 else None,
                                     rng_state=rng_state)
                event.time = t_first
                self._record(event)
                if st.finish_reason:
                    continue
                running.append(st)
                reserved += need
            if running:
                events, freed = engine.decode_step(running, self.speculative)
                reserved -= freed
                for event in events:
                    self._record(event)
            elif not self.senders and not self.arrived:
                for t in self.threads:
                    t.join()
                return self.served


def serve_colocated(model, requests: Sequence[Request], rank: int, world: int, *,
                    speculative: bool = False, block_size: int = 16, max_batch_size: int = 16,
                    num_blocks: Optional[int] = None,
                    start_time: Optional[float] = None) -> Dict[int, Served]:
    """The baseline: every rank prefills and decodes its share of the requests (round-robin)."""
    _refuse_expert_parallel(model, "serve_colocated")
    engine = InferenceEngine(model, block_size=block_size, max_batch_size=max_batch_size,
                             num_blocks=num_blocks, lockstep=None)
    mine = list(range(rank, len(requests), world))
    served: Dict[int, Served] = {}
    for event in engine.stream([requests[i] for i in mine], speculative=speculative,
                               start_time=start_time):
        served.setdefault(mine[event.index], Served([], "", [])).add(event)
    return served


def mixed_load(num_requests: int, *, rate: float, vocab_size: int, seed: int = 0,
               short_prompt=(4, 16), long_prompt=(48, 96), long_fraction: float = 0.3,
               new_tokens=(8, 24)) -> List[Request]:
    """Poisson arrivals at `rate` requests/s; prompts short (chat turns) or, with probability
    `long_fraction`, long (documents); output lengths uniform in `new_tokens`."""
    if rate <= 0 or num_requests < 1:
        raise ValueError(f"rate={rate}, num_requests={num_requests}: both must be positive")
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(num_requests):
        lo, hi = long_prompt if rng.random() < long_fraction else short_prompt
        prompt = [rng.randrange(1, vocab_size) for _ in range(rng.randint(lo, hi))]
        out.append(Request(prompt, rng.randint(*new_tokens), arrival=t))
        t += rng.expovariate(rate)
    return out


def latency_summary(requests: Sequence[Request], served: Dict[int, Served],
                    start_time: float) -> Dict[str, float]:
    """Time to first token (from arrival) and time per output token after the first, in
    seconds: mean and 90th percentile over requests."""
    ttft, tpot = [], []
    for i, s in served.items():
        ttft.append(s.token_times[0] - (start_time + requests[i].arrival))
        if len(s.token_times) > 1:
            tpot.append((s.token_times[-1] - s.token_times[0]) / (len(s.token_times) - 1))

    def p90(xs):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(0.9 * len(xs)))] if xs else float("nan")

    return {"ttft_mean": sum(ttft) / len(ttft) if ttft else float("nan"), "ttft_p90": p90(ttft),
            "tpot_mean": sum(tpot) / len(tpot) if tpot else float("nan"), "tpot_p90": p90(tpot),
            "requests": len(served)}
