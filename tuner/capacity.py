"""A run's capacity, measured: simulated search over rates, confirmed on the real engine.

`runtime.capacity` holds the pure parts (the setting, the search over rates, the
confirmation policy, the cost); this module feeds them:

- the simulated attainment at a rate is `runtime.simrun.simulate_run` of the run's spec with
  its workload at that rate (`runtime.capacity.workload_at_rate`), the request shapes of the
  run just measured (its trace: each LLM call's tokens; more requests than the run had reuse
  its shapes in order) and the stored step-time profile of each engine
  (`runtime.profiler.profile_engine`, measured first when none is stored);
- the confirmation runs the same workload at the found rate on the real engine through the
  caller's evaluation (the run's own replica pool: the replicas are hot).

`fmtune run` and real trials of `fmtune tune` call `capacity_of_run` after measuring a spec
with `capacity` set; simulated trials (`fidelity: sim`, the screening of `multi`) call
`measure_capacity` with their calibration's shapes and no confirmation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

from runtime.capacity import (
    CapacityMeasurement,
    CapacitySpec,
    Confirmation,
    confirm_rate,
    search_max_rate,
    workload_at_rate,
)
from runtime.profiler import profile_engine, profiling_config
from runtime.run import RunResult, RunSpec
from runtime.sim.cluster import RequestShape
from runtime.sim.steptime import StepTimeProfile
from runtime.simrun import shapes_from_run, simulate_run

logger = logging.getLogger(__name__)

RealEvaluate = Callable[[RunSpec], RunResult]
Phase = Callable[[str], None]


def spec_at_rate(spec: RunSpec, rate_rps: float) -> RunSpec:
    """The run at ``rate_rps``: its workload's arrivals at that rate, the capacity setting's
    request count, one repeat, no capacity measurement of its own."""
    assert spec.capacity is not None
    workload = workload_at_rate(spec.workload, rate_rps, spec.capacity.num_requests)
    return spec.model_copy(update={"workload": workload, "capacity": None})


def replica_counts(spec: RunSpec, sized: Mapping[str, int] | None = None) -> dict[str, int]:
    """Replicas of each model key: the deployment's count, or for 'auto' the count it was
    sized to (``sized``; 1 when unknown)."""
    found = dict(sized or {})
    return {
        key: int(model.replicas) if model.replicas != "auto" else int(found.get(key, 1))
        for key, model in spec.deployment.models.items()
    }


def stored_profiles(spec: RunSpec) -> dict[str, StepTimeProfile]:
    """Each model key's step-time profile (the stored one; measured and stored first when
    there is none, which starts replicas for a few minutes)."""
    return {
        key: profile_engine(profiling_config(model.engine)).profile
        for key, model in spec.deployment.models.items()
    }


def simulated_attainment(
    spec: RunSpec, shapes: Sequence[RequestShape], profiles: Mapping[str, StepTimeProfile]
) -> Callable[[float], float]:
    """rate -> the simulated SLA attainment of the run at that rate (0 when undefined)."""

    def attainment(rate_rps: float) -> float:
        result = simulate_run(spec_at_rate(spec, rate_rps), shapes, profiles)
        return float(result.metrics.sla_attainment or 0.0)

    return attainment


def measure_capacity(
    spec: RunSpec,
    shapes: Sequence[RequestShape],
    profiles: Mapping[str, StepTimeProfile],
    *,
    evaluate_real: RealEvaluate | None = None,
    start_rps: float | None = None,
    replicas: Mapping[str, int] | None = None,
    on_phase: Phase | None = None,
) -> CapacityMeasurement:
    """The capacity of ``spec`` (which has `capacity` set): searched in the simulator, then
    confirmed by ``evaluate_real`` when given and the setting asks for it.

    start_rps: where the search starts when the setting names none (the run's throughput).
    replicas: the replica count of each model key (default: the deployment's, 1 for 'auto').
    """
    setting: CapacitySpec | None = spec.capacity
    if setting is None:
        raise ValueError(f"run '{spec.name}' has no capacity setting")

    def phase(text: str) -> None:
        logger.info(text)
        if on_phase is not None:
            on_phase(text)

    seconds: dict[str, float] = {}
    phase(f"capacity: searching rates in the simulator (target {setting.target:.0%})")
    started = time.monotonic()
    search = search_max_rate(
        simulated_attainment(spec, shapes, profiles),
        target=setting.target,
        tolerance=setting.tolerance,
        start_rps=setting.start_rps or start_rps or 1.0,
        min_rps=setting.min_rps,
        max_rps=setting.max_rps,
    )
    seconds["simulated"] = time.monotonic() - started
    if not search.monotone:
        logger.warning(
            "capacity of %s: simulated attainment rose with the rate between %s; the search "
            "assumes it falls, so the found rate may not be the highest",
            spec.name, search.violations,
        )  # fmt: skip
    logger.info(
        "capacity of %s in the simulator: %.4g req/s (%s, %d rates tried)",
        spec.name, search.rate_rps, search.status, len(search.probes),
    )  # fmt: skip
    confirmation: Confirmation | None = None
    if setting.confirm and evaluate_real is not None and search.rate_rps > 0:
        phase(f"capacity: confirming {search.rate_rps:.3g} req/s on the real engine")
        started = time.monotonic()

        def measured(rate_rps: float) -> float:
            result = evaluate_real(spec_at_rate(spec, rate_rps))
            return float(result.metrics.sla_attainment or 0.0)

        confirmation = confirm_rate(
            measured, search.rate_rps, target=setting.target, step_down=setting.step_down
        )
        seconds["confirmed"] = time.monotonic() - started
    prices = spec.pricing.cost_model(spec.deployment).price_per_replica_hour_usd
    return CapacityMeasurement(
        spec=setting,
        search=search,
        confirmation=confirmation,
        prices=prices,
        replicas=dict(replicas) if replicas is not None else replica_counts(spec),
        seconds=seconds,
    )


def capacity_of_run(
    spec: RunSpec,
    result: RunResult,
    evaluate_real: RealEvaluate | None,
    *,
    profiles: Mapping[str, StepTimeProfile] | None = None,
    on_phase: Phase | None = None,
) -> CapacityMeasurement:
    """The capacity of a run just measured: its trace gives the request shapes, its
    throughput the first rate tried, its sizing the replica counts of 'auto' model keys;
    ``evaluate_real`` (the run's own pool) confirms the found rate."""
    rows = result.trace.to_dict("records")
    shapes = shapes_from_run(spec, rows, result.examples)
    sized = {key: sizing.replicas for key, sizing in result.sizing.items()}
    return measure_capacity(
        spec,
        shapes,
        profiles if profiles is not None else stored_profiles(spec),
        evaluate_real=evaluate_real,
        start_rps=result.metrics.requests_per_s,
        replicas=replica_counts(spec, sized),
        on_phase=on_phase,
    )
