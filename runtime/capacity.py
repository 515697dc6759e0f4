"""Capacity: the highest arrival rate a deployment serves within its SLA (pure).

What people compare deployments by is what they serve within the SLA. The capacity of a
deployment, for an app, a workload shape and an SLA, is `max_goodput_rps`: the highest
open-loop arrival rate at which SLA attainment (the share of requests answered within the
deadline, runtime.metrics) stays at or above a target, and `cost_per_1k_at_capacity_usd`:
what the deployment's replicas cost per 1000 requests served within the SLA at that rate.

This module holds the parts that need no engine and no simulator, so they are tested on
fake attainment functions:

- `CapacitySpec`: the run's setting that turns the measurement on (target, tolerance,
  bounds of the search, requests per rate, whether the real engine confirms it);
- `search_max_rate`: a search over rates fed by any function rate -> attainment (bracket
  by doubling or halving from a start rate, then bisection until the bracket is narrower
  than the tolerance). Attainment is assumed to fall as the rate rises; the search checks
  the assumption on the rates it tried and says where it did not hold;
- `confirm_rate`: the real confirmation's policy (one run at the found rate; below the
  target, one more a step lower, and the result says so);
- `workload_at_rate`: the workload a probe sends (the run's own, with Poisson arrivals at
  the rate, or gamma ones keeping the workload's burstiness);
- `cost_per_1k_at_rate` and `CapacityMeasurement.metrics`: the two metrics.

Who supplies the attainment function: the simulator searches (tuner.capacity: the run's
request shapes and the stored step-time profiles through runtime.simrun), and the real
engine confirms the found rate (runtime.run.execute_run, the run's own replica pool).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from runtime.workload import GammaArrivals, PoissonArrivals, WorkloadSpec

logger = logging.getLogger(__name__)

#: The capacity metrics and the direction each is better in (objectives may name them).
CAPACITY_METRICS: dict[str, Literal["maximize", "minimize"]] = {
    "max_goodput_rps": "maximize",
    "cost_per_1k_at_capacity_usd": "minimize",
}
#: The key of metrics.json that holds how the capacity was found (rates tried, attainments).
CAPACITY_DETAIL = "capacity"

SearchStatus = Literal["found", "never_meets", "always_meets"]
"""How a rate search ended: a bracket narrower than the tolerance (`found`); even the lowest
rate missed the target (`never_meets`, capacity 0); even the highest met it
(`always_meets`, the rate is a lower bound)."""


class CapacitySpec(BaseModel):
    """The capacity measurement of a run: present turns it on (`capacity: {target: 0.9}`).

    After the run, the simulator searches the highest Poisson arrival rate whose SLA
    attainment stays >= `target` (the run's request shapes, the stored step-time profile of
    each engine), then the real engine runs the workload at that rate once to confirm it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: float = Field(
        default=0.95,
        gt=0,
        le=1,
        description="SLA attainment the rate must keep: the share of requests answered "
        "within sla.e2e_s (failed and shed requests count as misses), in (0, 1].",
    )
    tolerance: float = Field(
        default=0.05,
        gt=0,
        le=0.5,
        description="Relative precision of the rate: the search stops once the lowest rate "
        "that missed the target is within (1 + tolerance) of the highest that met it.",
    )
    start_rps: float | None = Field(
        default=None,
        gt=0,
        description="First rate tried, requests per second; default the run's own measured "
        "throughput (requests_per_s), or 1 when it has none.",
    )
    min_rps: float = Field(
        default=0.01,
        gt=0,
        description="Lowest rate tried: a deployment that misses the target even here has "
        "capacity 0.",
    )
    max_rps: float = Field(
        default=1000.0,
        gt=0,
        description="Highest rate tried: a deployment that meets the target even here reports "
        "this rate (a lower bound of its capacity).",
    )
    num_requests: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="Requests sent at each rate, simulated and confirmed; default the "
        "workload's num_requests. More requests measure a sustained rate rather than a burst.",
    )
    confirm: bool = Field(
        default=True,
        description="Run the workload once on the real engine at the found rate (one more "
        "run `step_down` lower when it misses the target there). False: the simulated rate "
        "is reported unconfirmed.",
    )
    step_down: float = Field(
        default=0.8,
        gt=0,
        lt=1,
        description="Factor of the found rate the confirmation tries once more at when the "
        "real engine missed the target at the found rate.",
    )

    @model_validator(mode="after")
    def _ordered_bounds(self) -> CapacitySpec:
        """min_rps < max_rps, and a start rate between them."""
        if self.min_rps >= self.max_rps:
            raise ValueError(
                f"capacity.min_rps must be below capacity.max_rps ({self.max_rps}), "
                f"got {self.min_rps}"
            )
        if self.start_rps is not None and not self.min_rps <= self.start_rps <= self.max_rps:
            raise ValueError(
                f"capacity.start_rps must be within [{self.min_rps}, {self.max_rps}], "
                f"got {self.start_rps}"
            )
        return self


# --------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RateProbe:
    """One rate tried and the SLA attainment measured (or simulated) at it."""

    rate_rps: float
    attainment: float


@dataclass(frozen=True)
class RateSearch:
    """How a search over rates ended."""

    status: SearchStatus
    rate_rps: float
    """The highest rate tried that met the target (0 when none did: `never_meets`)."""
    attainment: float | None
    """The attainment at `rate_rps` (None when no rate met the target)."""
    missed_rps: float | None
    """The lowest rate tried that missed the target (None when none did)."""
    probes: tuple[RateProbe, ...]
    """Every rate tried, in the order tried."""
    violations: tuple[tuple[float, float], ...] = ()
    """Pairs of rates tried (lower, higher) where the higher rate had the higher attainment
    (by more than the slack): places where attainment did not fall with the rate."""

    @property
    def monotone(self) -> bool:
        """Whether attainment fell (or stayed) as the rate rose over every rate tried."""
        return not self.violations


def monotone_violations(
    probes: tuple[RateProbe, ...] | list[RateProbe], slack: float = 0.0
) -> tuple[tuple[float, float], ...]:
    """Pairs (lower rate, higher rate) among the probes where attainment rose with the rate
    by more than ``slack``: the evidence against the search's assumption."""
    ordered = sorted(probes, key=lambda probe: probe.rate_rps)
    found: list[tuple[float, float]] = []
    for index, low in enumerate(ordered):
        for high in ordered[index + 1 :]:
            if high.rate_rps > low.rate_rps and high.attainment > low.attainment + slack:
                found.append((low.rate_rps, high.rate_rps))
    return tuple(found)


def search_max_rate(
    attainment_at: Callable[[float], float],
    *,
    target: float,
    tolerance: float,
    start_rps: float,
    min_rps: float,
    max_rps: float,
    slack: float = 0.0,
    checks: tuple[float, ...] = (0.5, 0.25),
) -> RateSearch:
    """The highest rate in [min_rps, max_rps] whose attainment is >= target, to a relative
    ``tolerance``.

    From ``start_rps`` (clamped to the bounds) the rate doubles while it meets the target,
    or halves while it misses, until a rate that meets and one that misses bracket the
    capacity (or a bound is reached); bisection then narrows the bracket until the missing
    rate is within (1 + tolerance) of the meeting one. Attainment is assumed to fall as the
    rate rises: every pair of rates tried where it rose by more than ``slack`` is reported
    in `violations` (a noisy attainment function rises by a request's share now and then).
    To check it below the found rate too, the rate times each of ``checks`` is tried once
    more unless a rate within 10% of it was tried already.
    """
    if not 0 < target <= 1:
        raise ValueError(f"target must be in (0, 1], got {target}")
    if tolerance <= 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance}")
    if not 0 < min_rps < max_rps:
        raise ValueError(f"min_rps must be in (0, max_rps={max_rps}), got {min_rps}")
    probes: list[RateProbe] = []

    def meets(rate: float) -> bool:
        value = float(attainment_at(rate))
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"attainment at {rate:.4g} req/s must be in [0, 1], got {value}")
        probes.append(RateProbe(rate, value))
        logger.debug("capacity probe: %.4g req/s -> attainment %.3f", rate, value)
        return value >= target

    def finish(status: SearchStatus, met: float | None, missed: float | None) -> RateSearch:
        at = {probe.rate_rps: probe.attainment for probe in probes}
        return RateSearch(
            status=status,
            rate_rps=met if met is not None else 0.0,
            attainment=at[met] if met is not None else None,
            missed_rps=missed,
            probes=tuple(probes),
            violations=monotone_violations(probes, slack),
        )

    rate = min(max(start_rps, min_rps), max_rps)
    if meets(rate):
        met = rate
        while True:
            if met >= max_rps:
                return finish("always_meets", met, None)
            rate = min(2.0 * met, max_rps)
            if not meets(rate):
                missed = rate
                break
            met = rate
    else:
        missed = rate
        while True:
            if missed <= min_rps:
                return finish("never_meets", None, missed)
            rate = max(missed / 2.0, min_rps)
            if meets(rate):
                met = rate
                break
            missed = rate
    while missed - met > tolerance * met:
        rate = (met + missed) / 2.0
        if meets(rate):
            met = rate
        else:
            missed = rate
    for factor in checks:
        rate = met * factor
        if rate >= min_rps and not any(abs(p.rate_rps - rate) <= 0.1 * rate for p in probes):
            meets(rate)  # only evidence for the check: the bracket stays as it is
    return finish("found", met, missed)


# --------------------------------------------------------------------------------------------
# The real confirmation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Confirmation:
    """What the real engine measured at the found rate (and one step lower if needed)."""

    probes: tuple[RateProbe, ...]
    """One run at the found rate, and a second at a lower rate when the first missed."""
    target: float

    @property
    def rate_rps(self) -> float:
        """The last rate run."""
        return self.probes[-1].rate_rps

    @property
    def attainment(self) -> float:
        """The attainment of the last run."""
        return self.probes[-1].attainment

    @property
    def met(self) -> bool:
        """Whether the last run met the target."""
        return self.attainment >= self.target

    @property
    def stepped_down(self) -> bool:
        """Whether the found rate missed the target on the real engine."""
        return len(self.probes) > 1


def confirm_rate(
    attainment_at: Callable[[float], float], rate_rps: float, *, target: float, step_down: float
) -> Confirmation:
    """Run ``rate_rps`` once; when it misses the target, run ``rate_rps * step_down`` once
    more (and no further: the caller reports what it got)."""
    if not 0 < step_down < 1:
        raise ValueError(f"step_down must be in (0, 1), got {step_down}")
    first = RateProbe(rate_rps, float(attainment_at(rate_rps)))
    if first.attainment >= target:
        return Confirmation((first,), target)
    lower = rate_rps * step_down
    logger.warning(
        "the real engine missed the attainment target %.3f at %.4g req/s (%.3f); "
        "trying %.4g req/s once",
        target, rate_rps, first.attainment, lower,
    )  # fmt: skip
    return Confirmation((first, RateProbe(lower, float(attainment_at(lower)))), target)


# --------------------------------------------------------------------------------------------
# Workload and metrics
# --------------------------------------------------------------------------------------------


def workload_at_rate(
    workload: WorkloadSpec, rate_rps: float, num_requests: int | None = None
) -> WorkloadSpec:
    """The workload a probe at ``rate_rps`` sends: the same seed and warm-up, one repeat,
    open-loop arrivals at the rate (gamma arrivals keep their burstiness; closed loops,
    traces and Poisson arrivals become Poisson), ``num_requests`` requests (default the
    workload's). With one seed, the schedules of two rates are the same draws scaled in
    time, so attainment compares across rates."""
    if rate_rps <= 0 or not math.isfinite(rate_rps):
        raise ValueError(f"rate_rps must be a positive number, got {rate_rps}")
    arrivals: PoissonArrivals | GammaArrivals
    if isinstance(workload.arrivals, GammaArrivals):
        arrivals = GammaArrivals(rate_rps=rate_rps, cv=workload.arrivals.cv)
    else:
        arrivals = PoissonArrivals(rate_rps=rate_rps)
    return workload.model_copy(
        update={
            "arrivals": arrivals,
            "num_requests": num_requests or workload.num_requests,
            "repeats": 1,
        }
    )


def cost_per_1k_at_rate(
    prices: Mapping[str, float],
    replicas: Mapping[str, int],
    rate_rps: float,
    attainment: float,
) -> float | None:
    """USD per 1000 requests served within the SLA when the deployment takes ``rate_rps``:
    the replicas' hourly prices (by model key) over the requests per hour that meet the SLA
    (rate x attainment). None when nothing is served within the SLA."""
    for key, count in replicas.items():
        if count < 0:
            raise ValueError(f"replicas[{key!r}] must be >= 0, got {count}")
        if key not in prices:
            raise ValueError(f"prices has no entry for model key {key!r}, got {sorted(prices)}")
    served_per_hour = rate_rps * attainment * 3600.0
    if served_per_hour <= 0:
        return None
    per_hour = sum(prices[key] * count for key, count in replicas.items())
    return per_hour / served_per_hour * 1000.0


@dataclass(frozen=True)
class CapacityMeasurement:
    """A capacity found in the simulator and, when asked, confirmed on the real engine."""

    spec: CapacitySpec
    search: RateSearch
    """The simulated search."""
    confirmation: Confirmation | None
    """The real runs (None when not confirmed: `confirm: false`, or nothing to confirm)."""
    prices: Mapping[str, float]
    """USD per replica-hour, by model key."""
    replicas: Mapping[str, int]
    """Replicas of each model key the deployment runs."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall seconds of each phase (`simulated`, `confirmed`)."""

    @property
    def max_goodput_rps(self) -> float | None:
        """The capacity: the confirmed rate (the found one, or one step lower when that
        missed), or the simulated rate when not confirmed; None when the real engine missed
        the target at both rates it ran (no rate is known to meet it)."""
        if self.confirmation is None:
            return self.search.rate_rps
        return self.confirmation.rate_rps if self.confirmation.met else None

    @property
    def attainment(self) -> float | None:
        """The attainment at the capacity (the confirmed one when confirmed)."""
        if self.confirmation is not None:
            return self.confirmation.attainment if self.confirmation.met else None
        return self.search.attainment

    @property
    def cost_per_1k_usd(self) -> float | None:
        """USD per 1000 requests served within the SLA at the capacity."""
        rate, attainment = self.max_goodput_rps, self.attainment
        if not rate or attainment is None:
            return None
        return cost_per_1k_at_rate(self.prices, self.replicas, rate, attainment)

    def detail(self) -> dict[str, Any]:
        """How the capacity was found, for metrics.json and the bundle README."""
        confirmation = self.confirmation
        return {
            "target": self.spec.target,
            "tolerance": self.spec.tolerance,
            "status": self.search.status,
            "simulated_rps": self.search.rate_rps,
            "simulated_attainment": self.search.attainment,
            "simulated_missed_rps": self.search.missed_rps,
            "simulated_probes": [[p.rate_rps, p.attainment] for p in self.search.probes],
            "monotone": self.search.monotone,
            "violations": [list(pair) for pair in self.search.violations],
            "confirmed": confirmation is not None and confirmation.met,
            "confirmed_probes": (
                [[p.rate_rps, p.attainment] for p in confirmation.probes] if confirmation else []
            ),
            "stepped_down": bool(confirmation and confirmation.stepped_down),
            "replicas": dict(self.replicas),
            "seconds": dict(self.seconds),
        }

    def metrics(self) -> dict[str, Any]:
        """The metrics a run adds: the two capacity metrics and CAPACITY_DETAIL."""
        return {
            "max_goodput_rps": self.max_goodput_rps,
            "cost_per_1k_at_capacity_usd": self.cost_per_1k_usd,
            CAPACITY_DETAIL: self.detail(),
        }


def capacity_line(metrics: Mapping[str, Any]) -> str | None:
    """One sentence on a run's capacity from its metrics (None when it was not measured):
    the rate, the SLA and target, the cost at that rate, and how it was confirmed."""
    detail = metrics.get(CAPACITY_DETAIL)
    if "max_goodput_rps" not in metrics or not isinstance(detail, Mapping):
        return None
    rate = metrics.get("max_goodput_rps")
    target = float(detail.get("target", 0.0))
    sla = metrics.get("sla_e2e_s")
    within = f"within {sla:g} s " if isinstance(sla, int | float) else ""
    probes = list(detail.get("confirmed_probes") or [])
    simulated = detail.get("simulated_rps")
    if rate is None:
        tried = ", ".join(f"{r:.3g} req/s: {a:.1%}" for r, a in probes)
        return (
            f"Capacity not confirmed: the simulator found {simulated:.3g} req/s but the real "
            f"engine missed {target:.0%} attainment {within}at every rate it ran ({tried})."
        )
    cost = metrics.get("cost_per_1k_at_capacity_usd")
    priced = f", {cost:.4g} USD per 1000 requests served within the SLA" if cost else ""
    text = (
        f"Capacity: {rate:.3g} req/s with at least {target:.0%} of requests answered "
        f"{within}(SLA attainment){priced}."
    )
    if detail.get("status") == "always_meets":
        text += " This is the highest rate tried, a lower bound."
    if detail.get("status") == "never_meets":
        text += " Even the lowest rate tried missed the target."
    if probes:
        confirmed = probes[-1]
        text += (
            f" Simulated attainment at {simulated:.3g} req/s: "
            f"{detail.get('simulated_attainment') or 0:.1%}; confirmed on the real engine at "
            f"{confirmed[0]:.3g} req/s: {confirmed[1]:.1%}"
        )
        text += (
            f" (stepped down from {probes[0][0]:.3g} req/s, where it was {probes[0][1]:.1%})."
            if detail.get("stepped_down")
            else "."
        )
    else:
        text += " Simulated only, not confirmed on the real engine."
    return text
