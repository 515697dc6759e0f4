"""vLLM's scheduler semantics on hand-worked cases: every step's tokens and times are worked
out by hand from the rules in runtime/sim/scheduler.py's docstring, then checked."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from runtime.sim.scheduler import (
    ReplicaScheduler,
    RequestState,
    SchedulerConfig,
    SimRequest,
    prefix_block_hashes,
)
from runtime.sim.steptime import StepFeatures, StepTimeCoefficients

#: 1 ms per prefill token, 10 ms per decoding sequence, nothing else: times are easy sums.
SIMPLE = StepTimeCoefficients(base_s=0.0, prefill_token_s=0.001, decode_seq_s=0.01)


def config(**changes: object) -> SchedulerConfig:
    base: dict[str, object] = {
        "block_size": 16,
        "num_blocks": 100,
        "max_num_seqs": 4,
        "max_num_batched_tokens": 2048,
        "enable_prefix_caching": False,
    }
    return SchedulerConfig(**{**base, **changes})  # type: ignore[arg-type]


def drive(
    scheduler: ReplicaScheduler, start: float = 0.0
) -> list[tuple[float, StepFeatures, list[str], list[str]]]:
    """Step until idle: (end time, features of the step's first step, keys that got their
    first token, keys that finished) per (macro) step."""
    steps = []
    now = start
    while scheduler.has_work:
        end = scheduler.start_step(now)
        assert end is not None
        features = scheduler.last_features
        first, done = scheduler.finish_step(end)
        steps.append((end, features, [r.key for r in first], [r.key for r in done]))
        now = end
    return steps


@pytest.mark.parametrize("macro", [True, False])
def test_a_single_request_prefills_in_one_step_then_decodes_one_token_per_step(
    macro: bool,
) -> None:
    coefficients = StepTimeCoefficients(base_s=0.01, prefill_token_s=0.001, decode_seq_s=0.005)
    scheduler = ReplicaScheduler(config(), coefficients, macro_steps=macro)
    request = SimRequest("a", prompt_tokens=100, output_tokens=5)
    scheduler.add(request, 0.0)
    drive(scheduler)
    # step 1: 100 prefill tokens, 0.01 + 0.1 = 0.11 s, samples the first token
    assert request.first_token_s == pytest.approx(0.11)
    # steps 2-5: one decode each, 0.01 + 0.005 = 0.015 s: tokens 2..5
    assert request.finished_s == pytest.approx(0.11 + 4 * 0.015)
    assert request.last_token_s == pytest.approx(0.17)
    assert request.emissions == 5
    assert request.num_output == 5
    assert scheduler.counters.steps == 5
    assert scheduler.counters.prefill_tokens == 100
    assert scheduler.pool.num_free == 100  # every block back


def test_the_step_time_counts_what_each_step_computes() -> None:
    coefficients = StepTimeCoefficients(
        base_s=0.002, prefill_token_s=0.001, decode_seq_s=0.004, context_token_s=0.0001
    )
    scheduler = ReplicaScheduler(config(), coefficients, macro_steps=False)
    scheduler.add(SimRequest("a", prompt_tokens=20, output_tokens=3), 0.0)
    end = scheduler.start_step(0.0)
    assert end == pytest.approx(0.002 + 0.020)
    assert scheduler.last_features == StepFeatures(
        prefill_tokens=20, prefill_pairs=20 * 21 // 2, decode_seqs=0, context_tokens=0
    )
    scheduler.finish_step(end)
    # the decode of token 2 attends the 21 tokens of the sequence
    second = scheduler.start_step(end)
    assert scheduler.last_features.context_tokens == 21
    assert second == pytest.approx(end + 0.002 + 0.004 + 21 * 0.0001)


@pytest.mark.parametrize("macro", [True, False])
def test_two_requests_share_the_step_token_budget_by_chunked_prefill(macro: bool) -> None:
    scheduler = ReplicaScheduler(config(max_num_batched_tokens=64), SIMPLE, macro_steps=macro)
    first = SimRequest("A", prompt_tokens=100, output_tokens=2)
    second = SimRequest("B", prompt_tokens=50, output_tokens=2)
    scheduler.add(first, 0.0)
    scheduler.add(second, 0.0)
    steps = drive(scheduler)
    # 1: A takes the whole budget (64 of 100); B waits
    # 2: A's last 36, then B's first 28 (64 - 36): A samples its first token
    # 3: A decodes (1) and B's last 22: A's second token ends A, B samples its first
    # 4: B decodes its second token
    assert [(s[1].prefill_tokens, s[1].decode_seqs) for s in steps] == [
        (64, 0),
        (64, 0),
        (22, 1),
        (0, 1),
    ]
    assert [end for end, *_ in steps] == pytest.approx([0.064, 0.128, 0.160, 0.170])
    assert [(s[2], s[3]) for s in steps] == [([], []), (["A"], []), (["B"], ["A"]), ([], ["B"])]


@pytest.mark.parametrize("macro", [True, False])
def test_the_last_admitted_request_is_preempted_when_blocks_run_out_and_recomputed(
    macro: bool,
) -> None:
    # 4 blocks of 16 tokens: A and B (30-token prompts) hold 2 blocks each
    scheduler = ReplicaScheduler(config(num_blocks=4), SIMPLE, macro_steps=macro)
    a = SimRequest("A", prompt_tokens=30, output_tokens=10)
    b = SimRequest("B", prompt_tokens=30, output_tokens=10)
    scheduler.add(a, 0.0)
    scheduler.add(b, 0.0)
    drive(scheduler)
    # step 1: both prefill (60 tokens, 0.06 s); steps 2-3: both decode (0.02 s each), so
    # each holds 32 tokens. Step 4: A's 33rd token needs a third block, none is free: B
    # (admitted last) is preempted and A decodes alone (0.01 s). A decodes alone until its
    # 10th token at step 10: 0.06 + 2 * 0.02 + 7 * 0.01 = 0.17 s.
    assert a.finished_s == pytest.approx(0.17)
    assert (a.preemptions, b.preemptions) == (0, 1)
    assert scheduler.counters.preemptions == 1
    # B waited for A's blocks, then recomputed its 30 prompt + 3 output tokens in one step
    # (0.033 s), which samples its 4th token; 6 decodes more make 10.
    assert b.finished_s == pytest.approx(0.17 + 0.033 + 6 * 0.01)
    assert b.first_token_s == pytest.approx(0.06)  # TTFT is the first token ever
    assert scheduler.counters.prefill_tokens == 30 + 30 + 33
    assert scheduler.counters.steps == 17


def test_a_waiting_request_is_admitted_only_when_its_whole_prompt_fits() -> None:
    scheduler = ReplicaScheduler(config(num_blocks=4), SIMPLE)
    scheduler.add(SimRequest("A", prompt_tokens=40, output_tokens=2), 0.0)  # 3 blocks
    scheduler.add(SimRequest("B", prompt_tokens=20, output_tokens=2), 0.0)  # 2 blocks
    scheduler.start_step(0.0)
    assert [r.key for r in scheduler.running] == ["A"]
    assert [r.key for r in scheduler.waiting] == ["B"]


@pytest.mark.parametrize("macro", [True, False])
def test_a_prefix_cache_hit_skips_the_shared_full_blocks(macro: bool) -> None:
    scheduler = ReplicaScheduler(config(enable_prefix_caching=True), SIMPLE, macro_steps=macro)
    shared = ((("global", "system"), 64),)
    a = SimRequest("A", prompt_tokens=84, output_tokens=2, prefix=shared)
    b = SimRequest("B", prompt_tokens=84, output_tokens=2, prefix=shared)
    scheduler.add(a, 0.0)
    end = scheduler.start_step(0.0)
    assert scheduler.last_features.prefill_tokens == 84
    scheduler.finish_step(end)
    scheduler.add(b, end)
    scheduler.start_step(end)
    # A decodes; B finds the 4 full blocks of the shared 64 tokens and computes 20
    assert scheduler.last_features.prefill_tokens == 20
    assert scheduler.last_features.decode_seqs == 1
    assert b.cached_tokens == 64
    assert scheduler.counters.prefix_hit_tokens == 64


def test_a_fully_cached_prompt_still_recomputes_its_last_block() -> None:
    scheduler = ReplicaScheduler(config(enable_prefix_caching=True), SIMPLE)
    shared = ((("global", "system"), 64),)
    first = SimRequest("A", prompt_tokens=64, output_tokens=1, prefix=shared)
    scheduler.add(first, 0.0)
    drive(scheduler)
    again = SimRequest("B", prompt_tokens=64, output_tokens=1, prefix=shared)
    scheduler.add(again, 1.0)
    scheduler.start_step(1.0)
    # at most num_tokens - 1 = 63 tokens may hit: 3 whole blocks, the 4th is recomputed
    assert again.cached_tokens == 48
    assert scheduler.last_features.prefill_tokens == 16


def test_a_warmed_prefix_is_hit_like_one_a_finished_request_left() -> None:
    shared = ((("global", "system"), 64),)
    warmed = ReplicaScheduler(config(enable_prefix_caching=True), SIMPLE)
    assert warmed.warm(shared) == 4  # the 4 full blocks of 64 tokens, free and cached
    assert warmed.pool.num_free == 100
    assert warmed.warm(shared) == 0  # already cached
    request = SimRequest("A", prompt_tokens=84, output_tokens=1, prefix=shared)
    warmed.add(request, 0.0)
    warmed.start_step(0.0)
    assert request.cached_tokens == 64
    assert warmed.last_features.prefill_tokens == 20
    # without prefix caching there is nothing to warm
    plain = ReplicaScheduler(config(enable_prefix_caching=False), SIMPLE)
    assert plain.warm(shared) == 0


def test_warmed_blocks_are_evicted_when_the_cache_needs_room() -> None:
    scheduler = ReplicaScheduler(config(enable_prefix_caching=True, num_blocks=8), SIMPLE)
    assert scheduler.warm(((("global", "system"), 64),)) == 4
    # a request of 8 blocks takes the 4 uncached ones, then the 4 warmed ones
    scheduler.add(SimRequest("big", prompt_tokens=120, output_tokens=1), 0.0)
    drive(scheduler)
    assert scheduler.pool.cached.keys().isdisjoint(
        prefix_block_hashes([(("global", "system"), 64)], 16)
    )


def test_prompts_that_differ_inside_a_block_share_only_the_blocks_before() -> None:
    same = prefix_block_hashes([(("g", "system"), 40)], 16)
    other = prefix_block_hashes([(("g", "system"), 20), (("r", 1, "article"), 20)], 16)
    assert len(same) == 2 and len(other) == 2
    assert same[0] == other[0]
    assert same[1] != other[1]


def test_without_prefix_caching_nothing_is_shared() -> None:
    scheduler = ReplicaScheduler(config(enable_prefix_caching=False), SIMPLE)
    shared = ((("global", "system"), 64),)
    scheduler.add(SimRequest("A", prompt_tokens=84, output_tokens=1, prefix=shared), 0.0)
    drive(scheduler)
    scheduler.add(SimRequest("B", prompt_tokens=84, output_tokens=1, prefix=shared), 1.0)
    scheduler.start_step(1.0)
    assert scheduler.last_features.prefill_tokens == 84


@pytest.mark.parametrize(("acceptance", "steps"), [(1.0, 3), (0.0, 9)])
def test_speculation_shortens_decoding_by_the_accepted_drafts(
    acceptance: float, steps: int
) -> None:
    scheduler = ReplicaScheduler(
        config(num_speculative_tokens=3, proposal_rate=1.0, acceptance_rate=acceptance), SIMPLE
    )
    request = SimRequest("a", prompt_tokens=10, output_tokens=9)
    scheduler.add(request, 0.0)
    trace = drive(scheduler)
    # prefill samples token 1 and proposes 3 drafts; each decode step verifies 3 drafts:
    # all accepted gives 4 tokens a step (1 + 4 + 4 = 9 in 3 steps), none gives 1 (9 steps)
    assert len(trace) == steps
    assert request.num_output == 9
    assert trace[1][1].spec_tokens == 3
    assert scheduler.counters.draft_tokens == 3 * (steps - 1)
    assert scheduler.counters.accepted_tokens == (6 if acceptance else 0)


def test_the_output_stops_at_max_model_len_and_longer_prompts_are_refused() -> None:
    scheduler = ReplicaScheduler(config(max_model_len=40), SIMPLE)
    capped = SimRequest("a", prompt_tokens=30, output_tokens=50)
    refused = SimRequest("b", prompt_tokens=40, output_tokens=5)
    scheduler.add(capped, 0.0)
    scheduler.add(refused, 0.0)
    assert refused.state is RequestState.REJECTED
    assert "max_model_len" in (refused.error or "")
    drive(scheduler)
    assert capped.num_output == 10


def test_a_request_larger_than_the_whole_cache_is_refused() -> None:
    scheduler = ReplicaScheduler(config(num_blocks=2), SIMPLE)
    request = SimRequest("a", prompt_tokens=30, output_tokens=10)
    scheduler.add(request, 0.0)
    assert request.state is RequestState.REJECTED
    assert scheduler.rejected == [request]
    assert not scheduler.has_work


def test_max_num_seqs_bounds_the_running_batch() -> None:
    scheduler = ReplicaScheduler(config(max_num_seqs=2), SIMPLE)
    for key in "abc":
        scheduler.add(SimRequest(key, prompt_tokens=10, output_tokens=3), 0.0)
    scheduler.start_step(0.0)
    assert [r.key for r in scheduler.running] == ["a", "b"]
    assert scheduler.num_waiting == 1


def test_an_aborted_request_frees_its_blocks_and_cuts_a_macro_step() -> None:
    scheduler = ReplicaScheduler(config(), SIMPLE)
    a = SimRequest("a", prompt_tokens=10, output_tokens=50)
    b = SimRequest("b", prompt_tokens=10, output_tokens=50)
    scheduler.add(a, 0.0)
    scheduler.add(b, 0.0)
    end = scheduler.start_step(0.0)
    scheduler.finish_step(end)
    long_end = scheduler.start_step(end)  # both decode: a macro step of many steps
    assert long_end is not None and long_end > end + 0.05
    scheduler.abort(b, end + 0.045)
    cut = scheduler.interrupt(end + 0.045)
    assert cut == pytest.approx(end + 3 * 0.02)  # the third step was running at +0.045
    assert b.state is RequestState.ABORTED
    scheduler.finish_step(cut)
    assert a.num_output == 1 + 3
    assert scheduler.pool.num_free == 100 - 1  # only a's one block is held


def test_macro_steps_give_the_same_times_as_stepping_one_by_one() -> None:
    coefficients = StepTimeCoefficients(
        base_s=0.003, prefill_token_s=0.0002, decode_seq_s=0.002, context_token_s=0.00001
    )
    results = []
    for macro in (True, False):
        scheduler = ReplicaScheduler(
            config(num_blocks=14, max_num_batched_tokens=128, enable_prefix_caching=True),
            coefficients,
            macro_steps=macro,
        )
        requests = [
            SimRequest(
                i, prompt_tokens=20 + 13 * i, output_tokens=20 + 9 * (i % 4),
                prefix=((("g", "system"), 16),),
            )
            for i in range(8)
        ]  # fmt: skip
        arrivals = [0.0, 0.0, 0.05, 0.11, 0.3, 0.31, 0.6, 0.9]
        now, pending = 0.0, list(zip(arrivals, requests, strict=True))
        end: float | None = None
        while pending or scheduler.has_work:
            if end is None:
                if pending and (not scheduler.has_work or pending[0][0] <= now):
                    when, request = pending.pop(0)
                    now = max(now, when)
                    scheduler.add(request, now)
                    continue
                end = scheduler.start_step(now)
                continue
            if pending and pending[0][0] < end:
                when, request = pending.pop(0)
                scheduler.add(request, when)
                end = scheduler.interrupt(when) or end
                continue
            scheduler.finish_step(end)
            now, end = end, None
        results.append(
            [(r.first_token_s, r.finished_s, r.preemptions, r.cached_tokens) for r in requests]
        )
    assert sum(r[2] for r in results[0]) > 0  # the case preempts
    assert any(r[3] for r in results[0])  # and hits the prefix cache
    for fast, slow in zip(*results, strict=True):
        assert fast[0] == pytest.approx(slow[0], rel=1e-9)
        assert fast[1] == pytest.approx(slow[1], rel=1e-9)
        assert fast[2:] == slow[2:]


def _random_case(
    seed: int, speculation: bool
) -> tuple[SchedulerConfig, list[tuple[float, SimRequest]]]:
    """A random small replica and its arrivals: tight caches, small budgets, shared prefixes."""
    rng = random.Random(seed)
    config = SchedulerConfig(
        block_size=rng.choice([16, 32]),
        num_blocks=rng.randint(6, 40),
        max_num_seqs=rng.randint(1, 8),
        max_num_batched_tokens=rng.choice([16, 64, 256]),
        enable_prefix_caching=rng.random() < 0.7,
        max_model_len=rng.choice([None, 300]),
        num_speculative_tokens=rng.choice([0, 3]) if speculation else 0,
        proposal_rate=0.8,
        acceptance_rate=0.6,
    )
    arrivals = []
    for key in range(rng.randint(1, 25)):
        shared = ((("g", rng.randint(0, 2)), 40),) if rng.random() < 0.5 else ()
        request = SimRequest(key, rng.randint(41, 150), rng.randint(1, 60), prefix=shared)
        arrivals.append((round(rng.random() * 2, 3), request))
    return config, sorted(arrivals, key=lambda item: item[0])


def _replay(
    scheduler: ReplicaScheduler,
    arrivals: list[tuple[float, SimRequest]],
    on_step: Callable[[ReplicaScheduler], None] = lambda _: None,
) -> None:
    """Drive a replica as the cluster does: arrivals join (cutting a macro step), steps end."""
    now, end, pending = 0.0, None, list(arrivals)
    while pending or scheduler.has_work or end is not None:
        if end is None:
            if pending and (not scheduler.has_work or pending[0][0] <= now):
                when, request = pending.pop(0)
                now = max(now, when)
                scheduler.add(request, now)
                continue
            end = scheduler.start_step(now)
            continue
        if pending and pending[0][0] < end:
            when, request = pending.pop(0)
            scheduler.add(request, when)
            end = scheduler.interrupt(when) or end
            continue
        scheduler.finish_step(end)
        now, end = end, None
        on_step(scheduler)


@pytest.mark.parametrize("seed", range(25))
def test_blocks_are_never_lost_or_double_counted(seed: int) -> None:
    config, arrivals = _random_case(seed, speculation=True)

    def check(scheduler: ReplicaScheduler) -> None:
        held = {id(block): block for r in scheduler.running for block in r.blocks}
        users: dict[int, int] = {}
        for request in scheduler.running:
            for block in request.blocks:
                users[id(block)] = users.get(id(block), 0) + 1
        assert all(block.ref == users[key] for key, block in held.items())
        assert scheduler.pool.num_free + len(held) == config.num_blocks
        assert all(not request.blocks for request in scheduler.waiting)

    scheduler = ReplicaScheduler(config, SIMPLE, seed=seed)
    _replay(scheduler, arrivals, check)
    for _, request in arrivals:
        assert request.state in (RequestState.FINISHED, RequestState.REJECTED)
        if request.state is RequestState.FINISHED:
            assert request.num_output == request.output_tokens
    assert scheduler.pool.num_free == config.num_blocks


@pytest.mark.parametrize("seed", range(25))
def test_macro_steps_match_single_steps_on_random_replicas(seed: int) -> None:
    coefficients = StepTimeCoefficients(
        base_s=0.003, prefill_token_s=0.0002, decode_seq_s=0.002, context_token_s=0.00001
    )
    outcomes = []
    for macro in (True, False):
        config, arrivals = _random_case(seed, speculation=False)
        _replay(ReplicaScheduler(config, coefficients, macro_steps=macro), arrivals)
        outcomes.append(
            [(r.first_token_s, r.finished_s, r.preemptions, r.cached_tokens) for _, r in arrivals]
        )
    for fast, slow in zip(*outcomes, strict=True):
        assert fast[2:] == slow[2:]
        for one, other in zip(fast[:2], slow[:2], strict=True):  # None: refused
            assert one == other or one == pytest.approx(other, rel=1e-9)


def test_a_clone_plays_forward_without_touching_the_replica() -> None:
    scheduler = ReplicaScheduler(config(enable_prefix_caching=True), SIMPLE)
    keys = [object(), object()]
    for key in keys:
        scheduler.add(SimRequest(key, prompt_tokens=40, output_tokens=6, prefix=(("p", 32),)), 0.0)
    end = scheduler.start_step(0.0)
    assert end is not None and scheduler.busy
    free, running = scheduler.pool.num_free, list(scheduler.running)

    clone = scheduler.clone()
    clone.add(SimRequest("extra", prompt_tokens=20, output_tokens=3), 0.0)
    clone.finish_step(end)  # the step in flight ends in the clone too
    done = [key for *_, ended in drive(clone, end) for key in ended]
    assert set(done) == {"extra", *keys}  # its requests keep their keys
    # the replica itself is where it was: same step in flight, same blocks, same requests
    assert scheduler.busy and scheduler.pool.num_free == free
    assert scheduler.running == running
    assert all(r.state is RequestState.RUNNING and r.num_output == 0 for r in scheduler.running)
    first, _ = scheduler.finish_step(end)
    assert [r.key for r in first] == keys
