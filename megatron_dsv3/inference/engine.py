"""Batched generation over the latent cache: requests, streaming events, stop conditions.

    engine = InferenceEngine(model, block_size=16, decode=tokenizer.detokenize)
    for event in engine.stream([Request(prompt_ids, max_new_tokens=64)]):
        print(event.text, end="")                     # tokens as they are produced
    results = engine.generate(requests, speculative=True)    # MTP drafts, main model verifies

Each admitted request is prefilled on its own (its prompt's latents go into its blocks), then all
running requests decode together, one token each per step (two with `speculative`: the pending
token and the MTP draft), each at its own position. A request is admitted when the free blocks
can hold its prompt plus max_new_tokens (the last token is never cached, the draft position is),
so a running request never runs out of cache; finished requests return their blocks and waiting
ones take their place.

Every generated token comes with its log-probability under the model (log_softmax of the raw
logits at its position, before temperature, top-k and top-p), and with SamplingParams(logprobs=k)
the k most likely tokens there: TokenEvent.logprobs / top_logprobs, Completion.logprobs /
top_logprobs.

With expert parallelism every rank of the expert-parallel group runs its own engine over its own
requests (attention data-parallel), in lockstep (megatron_dsv3.inference.parallel).

`stream` runs the whole loop; serving that places the prefill and the decode of a request on
different ranks (megatron_dsv3.inference.disaggregated) drives the same steps through the public
step API: `validate`, `admit`, `prefill`, `hand_off`, `adopt`, `blocks_needed`, `decode_step`,
and the `cache` attribute (the engine's LatentCache).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import numbers
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from megatron_dsv3.cli import non_negative_float, positive_int
from megatron_dsv3.dispatch.comm import ExchangeError
from megatron_dsv3.inference.cache import LatentCache, blocks_for
from megatron_dsv3.inference.decoder import Chunk, LatentDecoder
from megatron_dsv3.inference.parallel import (PeerStoppedError, expert_parallel_group_of,
                                              lockstep_for)
from megatron_dsv3.inference.sampling import (
    Sampled,
    SamplingParams,
    check_finite_logits,
    deferring_nonfinite,
    make_generator,
    sample_next,
    with_logprobs,
)
from megatron_dsv3.inference.speculative import speculative_step
from megatron_dsv3.lanes import StepTrace, run_on_two_lanes


def _final_part(text: str, stop_strings: Sequence[str]) -> str:
    """What of an unfinished request's text can be streamed: without an incomplete multi-byte
    character at its end (until it completes) and without an end that may be the start of a
    stop string (if the string completes, the text is cut before it)."""
    text = text.rstrip("\ufffd")
    hold = max((k for s in stop_strings for k in range(1, len(s))
                if text.endswith(s[:k])), default=0)
    return text[: len(text) - hold]


@dataclass
class Request:
    prompt: List[int]
    max_new_tokens: int = 32
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: Sequence[int] = ()
    """Generation ends after any of these tokens (which is kept in the output tokens)."""
    stop_strings: Sequence[str] = ()
    """Generation ends once the decoded output contains one (needs the engine's `decode`); the
    text is cut before it."""
    arrival: float = 0.0
    """Seconds after the stream starts at which the request arrives (admitted no earlier)."""


def request_blocks(request: Request, block_size: int,
                   max_positions: Optional[int] = None) -> int:
    """Cache blocks of `block_size` positions a request holds from admission to its end: its
    prompt, its new tokens but the last (never fed back) and the speculative draft position, i.e.
    positions [0, prompt + max_new_tokens): the last speculative step starts with
    max_new_tokens - 1 tokens out, one of them pending, and writes it and the draft.
    `max_positions`: at most that many positions (sizing a cache before the requests are checked:
    a longer request is refused, and must not ask for its memory first)."""
    positions = len(request.prompt) + request.max_new_tokens
    if max_positions is not None:
        positions = min(positions, max_positions)
    return blocks_for(positions, block_size)


@dataclass
class TokenEvent:
    """What one step produced for one request."""

    index: int                      # the request's index in the list given to stream/generate
    tokens: List[int]
    text: str = ""                  # newly completed text (empty without `decode`)
    finished: bool = False
    finish_reason: Optional[str] = None   # "length", "stop_token" or "stop_string"
    time: float = 0.0               # time.time() when the tokens were produced
    logprobs: List[float] = field(default_factory=list)   # log p of each token (see Sampled)
    top_logprobs: List[Dict[int, float]] = field(default_factory=list)
    """Per token, the most likely tokens -> log p (only with SamplingParams.logprobs > 0)."""


@dataclass
class Completion:
    tokens: List[int]
    text: Optional[str]
    finish_reason: str
    logprobs: List[float] = field(default_factory=list)
    """log p(token) of each token: log_softmax of the model's raw logits at its position."""
    top_logprobs: List[Dict[int, float]] = field(default_factory=list)
    """Per token, the SamplingParams.logprobs most likely tokens -> log p (empty when 0)."""


@dataclass
class GenerationStats:
    """Decode steps (prefill excluded), per request, summed: main-model forwards, tokens emitted
    (after stop conditions), and with speculative decoding MTP drafts proposed and accepted."""

    forwards: int = 0
    tokens: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / self.forwards if self.forwards else 0.0


class RequestState:
    """A request while it runs (made by InferenceEngine.admit): its index in the caller's list,
    its cache key, the tokens generated so far, its cached length, the pending token (generated,
    not yet in the cache), the MTP draft and, once finished, the finish reason."""

    def __init__(self, index: int, key: int, request: Request, device):
        self.index, self.request = index, request
        self.key = key               # the request's name in the cache (unique in the engine)
        self.generated: List[int] = []
        self.length = 0              # positions of this request in the cache
        self.pending: int = -1       # the last generated token, not in the cache yet
        self.draft: Optional[int] = None
        self.generator = make_generator(request.sampling, device)
        self.text_sent = ""
        self.stop_text: Optional[str] = None
        self.finish_reason: Optional[str] = None


class InferenceEngine:
    def __init__(self, model, *, block_size: int = 16, num_blocks: Optional[int] = None,
                 max_batch_size: int = 16, decode: Optional[Callable[[List[int]], str]] = None,
                 cache_dtype: Optional[torch.dtype] = None, lockstep="auto",
                 micro_batches: int = 1):
        """`lockstep`: with expert parallelism ("auto": when the model's MoE layers have an
        expert-parallel group of more than one rank) every rank of that group must run this
        engine's `stream`/`generate` at the same time, each with its own requests (see
        megatron_dsv3.inference.parallel); None turns it off, or pass a `Lockstep`.

        `micro_batches=2`: each decode step runs the running requests as two micro-batches in two
        threads, the second on the other lane (megatron_dsv3.lanes; the dispatcher keeps one
        process group per lane), so that one computes while the other's dispatch and combine are
        in flight. `trace_steps` (a set of decode-step numbers) records those steps' timelines into
        `traces`."""
        if micro_batches not in (1, 2):
            raise ValueError(f"micro_batches={micro_batches!r} is invalid: allowed values are 1, 2")
        for name, value, allowed in (
                ("block_size", block_size, positive_int.describe()),
                ("max_batch_size", max_batch_size, positive_int.describe()),
                ("num_blocks", num_blocks, f"{positive_int.describe()} or None (room for "
                                           "max_batch_size requests of the full length)")):
            if not (name == "num_blocks" and value is None) and not positive_int.contains(value):
                raise ValueError(f"{name}={value!r} is invalid: allowed values are {allowed}")
        if block_size > model.config.max_position_embeddings:  # (before the cache is allocated)
            raise ValueError(f"block_size={block_size} is invalid: allowed values are 1.."
                             f"{model.config.max_position_embeddings} (max_position_embeddings: "
                             "no request holds more positions, and every block holds block_size)")
        model.eval()
        self.model, self.config, self.decode = model, model.config, decode
        self.max_batch_size = max_batch_size
        if num_blocks is None:
            # room for max_batch_size requests of the model's full length (capped at 4096)
            tokens = min(self.config.max_position_embeddings, 4096) + 1
            num_blocks = max_batch_size * -(-tokens // block_size)
        device = model.embedding.word_embeddings.weight.device
        if micro_batches == 2 and device.type == "cuda" and \
                expert_parallel_group_of(model) is not None:
            # the two threads would wait on one default stream, tying each lane's all-to-alls to
            # the other's: ranks interleaving them differently deadlock (docs/backends.md)
            raise ValueError("micro_batches=2 is refused on CUDA with expert parallelism: the "
                             "two decode threads share the default stream, and expert-parallel "
                             "ranks whose threads issue the lanes' all-to-alls in different "
                             "orders deadlock (docs/backends.md). Allowed here: micro_batches=1")
        tp = getattr(self.config, "tensor_model_parallel_size", 1) or 1
        if micro_batches == 2 and tp > 1:
            raise ValueError(f"micro_batches=2 is refused with tensor_model_parallel_size={tp}: "
                             "the two decode threads would issue the tensor-parallel "
                             "all-reduces (which have no lanes) in orders that differ between "
                             "ranks. Allowed here: micro_batches=1")
        self.device = device
        # the latent cache (public: `hand_off`/`adopt` move a request's latents between engines)
        self.cache = LatentCache.for_config(self.config, num_blocks, block_size, device=device,
                                            dtype=cache_dtype or self.config.params_dtype)
        self.decoder = LatentDecoder(model, self.cache)
        self.lockstep = lockstep_for(model) if lockstep == "auto" else lockstep
        self._in_step = False  # lockstep: inside a step's forwards (see _tell_peers_we_stop)
        self.micro_batches = micro_batches
        self.trace_steps: set = set()
        self.traces: dict = {}
        self._step = 0
        self.stats = GenerationStats()
        self._keys = itertools.count()
        self.start_time = time.time()  # time.time() from which the stream counts arrivals

    # -- public API -------------------------------------------------------------------------
    @property
    def decode_steps(self) -> int:
        """Decode steps this engine has run: the next one has this number in `trace_steps`."""
        return self._step

    def generate(self, requests: Sequence[Request], *, speculative: bool = False,
                 on_event: Optional[Callable[[TokenEvent], None]] = None,
                 start_time: Optional[float] = None) -> List[Completion]:
        results = [Completion([], None, "") for _ in requests]
        for event in self.stream(requests, speculative=speculative, start_time=start_time):
            done = results[event.index]
            done.tokens += event.tokens
            done.logprobs += event.logprobs
            done.top_logprobs += event.top_logprobs
            if on_event is not None:
                on_event(event)
            if event.finished:
                done.finish_reason = event.finish_reason
        if self.decode is not None:
            for done, request in zip(results, requests):
                done.text = self._text(done.tokens, request)
        return results

    def stream(self, requests: Sequence[Request], *, speculative: bool = False,
               start_time: Optional[float] = None) -> Iterator[TokenEvent]:
        """Yield a TokenEvent per request and step as tokens are produced (one stream at a time
        per engine: its admission control assumes it owns the cache). Requests are admitted in
        order of arrival, `request.arrival` seconds after `start_time` (time.time(), default
        now)."""
        self._in_step = False
        try:
            self.validate(requests, speculative)
        except BaseException:
            self._tell_peers_we_stop()
            raise
        self.start_time = time.time() if start_time is None else start_time
        order = sorted(range(len(requests)), key=lambda i: requests[i].arrival)
        waiting = collections.deque(self.admit(i, requests[i]) for i in order)
        running: List[RequestState] = []
        try:
            yield from self._serve(waiting, running, speculative)
        except PeerStoppedError:
            raise
        except BaseException as error:  # an error of ours, or the consumer stopped reading
            if self._in_step and isinstance(error, ExchangeError):  # a peer left inside the step
                raise PeerStoppedError(
                    "a rank of the expert-parallel group left inside a step (its own log or "
                    "exception says why): this rank's all-to-all with it failed, and this rank "
                    "stops too") from error
            self._tell_peers_we_stop()
            raise
        finally:  # also when the consumer stops early: running requests give their blocks back
            for st in running:
                self.cache.release(st.key)

    def _tell_peers_we_stop(self) -> None:
        """Expert parallelism: this rank stops serving. Between steps (where every rank's next
        collective is the agreement) the others learn it at once and raise PeerStoppedError.
        Non-finite logits are raised after the step. Any other error inside a step's forwards,
        where the others wait in all-to-alls it cannot pair, reaches them when this rank's
        process ends: their all-to-all fails with ExchangeError, which `stream` raises as
        PeerStoppedError. While that process lives on they wait until the group's timeout
        (gloo's ProcessGroup.abort and destroy_process_group do not close its connections,
        measured on torch 2.13)."""
        if self.lockstep is not None and not self._in_step:
            self.lockstep.stop()

    def _serve(self, waiting, running: List[RequestState],
               speculative: bool) -> Iterator[TokenEvent]:
        reserved = 0
        while True:
            admitted: List[RequestState] = []
            now = time.time() - self.start_time
            while (waiting and len(running) + len(admitted) < self.max_batch_size
                   and waiting[0].request.arrival <= now):
                need = self.blocks_needed(waiting[0].request)
                if reserved + need > self.cache.num_blocks:
                    break
                admitted.append(waiting.popleft())
                reserved += need
            idle_prefills = 0
            if self.lockstep is not None:  # expert parallelism: all ranks step together
                busy, most = self.lockstep.agree(bool(admitted or running or waiting),
                                                 len(admitted))
                if not busy:
                    break
                idle_prefills = most - len(admitted)
                self._in_step = True
            elif not (admitted or running or waiting):
                break
            elif not (admitted or running):  # idle until the next request arrives
                time.sleep(max(0.0, waiting[0].request.arrival - now))
                continue
            # in lockstep the step's events are handed out after the step: a consumer that
            # stops reading stops this rank between steps, where the others can be told; and
            # non-finite logits are raised after the step, whose forwards the others share
            held: List[TokenEvent] = []
            with (deferring_nonfinite() if self.lockstep is not None
                  else contextlib.nullcontext([])) as errors:
                for st in admitted:
                    running.append(st)
                    event = self.prefill(st, speculative)
                    if self.lockstep is None:
                        yield event
                    else:
                        held.append(event)
                for _ in range(idle_prefills):
                    self.decoder.idle(mtp=speculative)
                events, freed = self.decode_step(running, speculative)
            reserved -= freed
            self._in_step = False
            if errors:
                raise errors[0]
            yield from held + events

    # -- step API (also used by megatron_dsv3.inference.disaggregated) ---------------------
    def validate(self, requests: Sequence[Request], speculative: bool = False) -> None:
        """ValueError naming the request and the allowed values unless every request can run on
        this engine (prompt, lengths, arrival, cache size, stop strings, speculative needs)."""
        vocab = self.config.vocab_size
        for i, r in enumerate(requests):
            if isinstance(r.prompt, torch.Tensor) or not isinstance(r.prompt, Sequence):
                raise ValueError(f"request {i}: prompt is a {type(r.prompt).__name__}: allowed "
                                 "is a list of token ids (integers)")
            if not r.prompt:
                raise ValueError(f"request {i} has an empty prompt: allowed are >= 1 tokens")
            bad = next((j for j, t in enumerate(r.prompt) if not (
                isinstance(t, numbers.Integral) and not isinstance(t, bool) and 0 <= t < vocab)),
                None)
            if bad is not None:
                raise ValueError(f"request {i}: prompt token {r.prompt[bad]!r} at position "
                                 f"{bad} is invalid: allowed token ids are integers in "
                                 f"[0, {vocab - 1}] (the model's vocab_size={vocab})")
            if not positive_int.contains(r.max_new_tokens):
                raise ValueError(f"request {i}: max_new_tokens={r.max_new_tokens!r} is invalid: "
                                 f"allowed values are {positive_int.describe()}")
            if not non_negative_float.contains(r.arrival):
                raise ValueError(f"request {i}: arrival={r.arrival!r} is invalid: allowed values "
                                 f"are {non_negative_float.describe()} (seconds after the stream "
                                 "starts)")
            total = len(r.prompt) + r.max_new_tokens
            if total > self.config.max_position_embeddings:
                raise ValueError(f"request {i}: prompt ({len(r.prompt)}) + max_new_tokens "
                                 f"({r.max_new_tokens}) = {total} exceeds the model's "
                                 f"max_position_embeddings={self.config.max_position_embeddings}")
            if self.blocks_needed(r) > self.cache.num_blocks:
                raise ValueError(f"request {i} needs {self.blocks_needed(r)} cache blocks; the "
                                 f"cache has {self.cache.num_blocks} of {self.cache.block_size} "
                                 "tokens (raise the engine's num_blocks)")
            if not isinstance(r.sampling, SamplingParams):
                raise ValueError(f"request {i}: sampling={r.sampling!r} is invalid: allowed is a "
                                 "SamplingParams")
            if isinstance(r.stop_strings, str) or not isinstance(r.stop_strings, Sequence) or \
                    not all(isinstance(s, str) and s for s in r.stop_strings):
                raise ValueError(f"request {i}: stop_strings={r.stop_strings!r} is invalid: "
                                 "allowed is a list of non-empty strings (a bare string would be "
                                 "read as its characters)")
            if isinstance(r.stop_token_ids, (str, torch.Tensor)) or not isinstance(
                    r.stop_token_ids, Sequence) or not all(
                    isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 0
                    for t in r.stop_token_ids):
                raise ValueError(f"request {i}: stop_token_ids={r.stop_token_ids!r} is invalid: "
                                 "allowed is a list of token ids (integers >= 0)")
            if r.stop_strings and self.decode is None:
                raise ValueError(f"request {i} has stop_strings but the engine has no decode "
                                 "function to turn tokens into text")
            if speculative:
                if not r.sampling.greedy:
                    raise ValueError(f"request {i}: speculative decoding verifies greedy choices "
                                     "only: allowed temperature is 0")
                if self.decoder.mtp_layer is None:
                    raise ValueError("speculative decoding needs the MTP module: the model has "
                                     "mtp_num_layers=None")

    def admit(self, index: int, request: Request) -> RequestState:
        """A new running state for `request` (`index`: its place in the caller's list, reported in
        its events), under a cache key no other request of this engine has."""
        return RequestState(index, next(self._keys), request, self.device)

    def blocks_needed(self, request: Request) -> int:
        """Cache blocks reserved for a request from admission to its end (request_blocks)."""
        return request_blocks(request, self.cache.block_size)

    def prefill(self, state: RequestState, speculative: bool = False) -> TokenEvent:
        """One forward over the prompt: its latents go into the cache (every decoder layer, and
        the MTP layer when `speculative`), the first token is chosen (and the MTP draft made).
        -> the first token's event; a request that finished there has its blocks released."""
        prompt = list(state.request.prompt)
        logits, hidden = self.decoder.forward([Chunk(state.key, prompt, 0)])
        check_finite_logits(logits[:, -1:], [state.index], [len(prompt) - 1], "prefill")
        state.length = len(prompt)
        first = sample_next(logits[0, -1], state.request.sampling, state.generator)
        if speculative:
            # MTP position i sees h_i and t_{i+1}: the prompt shifted by one, then `first`
            mtp_logits = self.decoder.forward_mtp([Chunk(state.key, prompt[1:] + [first], 0)],
                                                  hidden)
            state.draft = int(torch.argmax(mtp_logits[0, -1]))
        event = self._emit(state, with_logprobs(logits[0, -1:], [first],
                                                state.request.sampling.logprobs))
        if state.finish_reason:
            self.cache.release(state.key)
        return event

    def hand_off(self, state: RequestState) -> torch.Tensor:
        """The prefilled request's latents [layers, cached length, kv_lora_rank + rope dim] (for
        another engine's `adopt`); its blocks go back to this engine's free list."""
        latents = self.cache.export(state.key, state.length)
        self.cache.release(state.key)
        return latents

    def adopt(self, state: RequestState, first: Sampled, latents: Optional[torch.Tensor],
              draft: Optional[int] = None, rng_state: Optional[torch.Tensor] = None) -> TokenEvent:
        """Continue a request another engine prefilled: its first token (with log-probabilities,
        as that engine's `prefill` reported them) goes through this engine's stop conditions;
        unless that finished it, its latents (that engine's `hand_off`) go into this cache and,
        with the MTP draft, the state is ready for `decode_step`. `rng_state`: a seeded
        request's generator state after that prefill (its sampling continues from there, as on
        one engine). -> the first token's event."""
        event = self._emit(state, first)
        if not state.finish_reason:
            self.cache.adopt(state.key, latents)
            state.length, state.draft = latents.shape[1], draft
            if rng_state is not None and state.generator is not None:
                state.generator.set_state(rng_state)
        return event

    def decode_step(self, running: List[RequestState],
                    speculative: bool = False) -> Tuple[List[TokenEvent], int]:
        """One decode step over the running requests (one token each; with `speculative` the
        pending token and the MTP draft are verified together), stop conditions applied; the
        requests that finished leave `running` and release their blocks.
        -> (events, blocks no longer reserved: blocks_needed of the finished requests)."""
        new = self._traced_step(running, speculative)
        events = []
        for st, sampled in zip(running, new):
            if sampled.tokens:  # (requests that finished at prefill get none)
                events.append(self._emit(st, sampled))
                self.stats.tokens += len(events[-1].tokens)
        freed = 0
        for st in [st for st in running if st.finish_reason]:
            running.remove(st)
            freed += self.blocks_needed(st.request)
            self.cache.release(st.key)
        return events, freed

    # -- steps ------------------------------------------------------------------------------
    def _traced_step(self, running: List[RequestState], speculative: bool) -> List[Sampled]:
        step, self._step = self._step, self._step + 1
        if step not in self.trace_steps:
            return self._step_tokens(running, speculative)
        with StepTrace().recording() as trace:
            out = self._step_tokens(running, speculative)
        self.traces[step] = trace.to_json()
        return out

    def _step_tokens(self, running: List[RequestState], speculative: bool) -> List[Sampled]:
        """One decode step over the running requests -> new tokens of each (finished: none)."""
        if self.micro_batches == 1:
            return self._micro_batch_step(running, speculative, self.stats)
        active = [st for st in running if not st.finish_reason]
        for st in active:  # blocks for this step's positions, taken here rather than in threads
            self.cache.ensure(st.key, st.length + (2 if speculative else 1))
        half = (len(active) + 1) // 2
        parts, stats = [active[:half], active[half:]], [GenerationStats(), GenerationStats()]
        results: List[List[Sampled]] = [[], []]

        def run(i: int) -> None:
            results[i] = self._micro_batch_step(parts[i], speculative, stats[i])

        run_on_two_lanes(lambda: run(0), lambda: run(1), name="dsv3-decode-mb0")
        for s in stats:
            self.stats.forwards += s.forwards
            self.stats.drafted += s.drafted
            self.stats.accepted += s.accepted
        produced = {st.key: new for i in (0, 1) for st, new in zip(parts[i], results[i])}
        return [produced.get(st.key, Sampled()) for st in running]

    def _micro_batch_step(self, running: List[RequestState], speculative: bool,
                          stats: GenerationStats) -> List[Sampled]:
        if self.lockstep is not None and all(st.finish_reason for st in running):
            self.decoder.idle(mtp=speculative)  # nothing to decode here this step
            return [Sampled() for _ in running]
        if speculative:
            return speculative_step(self.decoder, running, stats, f"decode step {self._step - 1}")
        return self._decode_step(running, stats)

    def _decode_step(self, running: List[RequestState],
                     stats: GenerationStats) -> List[Sampled]:
        active = [st for st in running if not st.finish_reason]
        if not active:
            return [Sampled() for _ in running]
        logits, _ = self.decoder.forward([Chunk(st.key, [st.pending], st.length)
                                          for st in active])
        check_finite_logits(logits, [st.index for st in active], [st.length for st in active],
                            f"decode step {self._step - 1}")
        out = {}
        for i, st in enumerate(active):
            st.length += 1
            token = sample_next(logits[i, 0], st.request.sampling, st.generator)
            out[st.key] = with_logprobs(logits[i, :1], [token], st.request.sampling.logprobs)
            stats.forwards += 1
        return [out.get(st.key, Sampled()) for st in running]

    # -- bookkeeping ------------------------------------------------------------------------
    def _emit(self, st: RequestState, new: Sampled) -> TokenEvent:
        """Append tokens to the request until a stop condition holds."""
        r, kept = st.request, []
        for t in new.tokens:
            st.generated.append(t)
            kept.append(t)
            st.pending = t
            if t in r.stop_token_ids:
                st.finish_reason = "stop_token"
            elif r.stop_strings and self.decode is not None and any(
                    s in self.decode(st.generated) for s in r.stop_strings):
                st.finish_reason = "stop_string"
            elif len(st.generated) >= r.max_new_tokens:
                st.finish_reason = "length"
            if st.finish_reason:
                break
        text = ""
        if self.decode is not None:
            full = self._text(st.generated, r)
            if not st.finish_reason:
                full = _final_part(full, r.stop_strings)
            if len(full) > len(st.text_sent):
                text, st.text_sent = full[len(st.text_sent):], full
        return TokenEvent(st.index, kept, text, bool(st.finish_reason), st.finish_reason,
                          time.time(), new.logprobs[: len(kept)], new.top_logprobs[: len(kept)])

    def _text(self, tokens: List[int], request: Request) -> str:
        text = self.decode(tokens)
        cut = [text.find(s) for s in request.stop_strings if s in text]
        return text[: min(cut)] if cut else text
