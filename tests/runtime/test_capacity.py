"""Capacity (runtime.capacity): the search over rates on fake attainment functions, the real
confirmation's policy, the workload of a probe, the cost at capacity, the setting's checks
and the capacity sentence."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from runtime.capacity import (
    CapacityMeasurement,
    CapacitySpec,
    RateProbe,
    capacity_line,
    confirm_rate,
    cost_per_1k_at_rate,
    monotone_violations,
    search_max_rate,
    workload_at_rate,
)
from runtime.errors import ConfigError
from runtime.run import load_run_spec
from runtime.workload import ClosedLoop, GammaArrivals, PoissonArrivals, WorkloadSpec

ROOT = Path(__file__).resolve().parents[2]
BOUNDS = {"min_rps": 0.01, "max_rps": 1000.0}


def step(capacity: float, below: float = 1.0, above: float = 0.5) -> Callable[[float], float]:
    """Attainment `below` up to `capacity` req/s, `above` past it."""
    return lambda rate: below if rate <= capacity else above


def test_a_step_is_found_within_the_tolerance_from_below_and_from_above() -> None:
    for start in (0.1, 3.0, 50.0):
        found = search_max_rate(step(3.7), target=0.95, tolerance=0.02, start_rps=start, **BOUNDS)
        assert found.status == "found"
        assert found.rate_rps <= 3.7 < found.missed_rps  # type: ignore[operator]
        assert found.missed_rps <= found.rate_rps * 1.02  # type: ignore[operator]
        assert found.attainment == 1.0 and found.monotone
        assert len(found.probes) <= 15


def test_a_noisy_falling_attainment_lands_near_its_crossing_and_the_noise_is_reported() -> None:
    rng = np.random.default_rng(0)

    def noisy(rate: float) -> float:  # falls from 1 to 0 around 5 req/s, +-0.02 of noise
        true = 1.0 / (1.0 + (rate / 5.0) ** 8)
        return float(np.clip(true + rng.uniform(-0.02, 0.02), 0.0, 1.0))

    found = search_max_rate(noisy, target=0.9, tolerance=0.05, start_rps=1.0, **BOUNDS)
    crossing = 5.0 * (1 / 0.9 - 1) ** (1 / 8)  # where the noiseless curve is 0.9
    assert found.status == "found"
    assert found.rate_rps == pytest.approx(crossing, rel=0.12)
    slack = search_max_rate(noisy, target=0.9, tolerance=0.05, start_rps=1.0, slack=0.05, **BOUNDS)
    assert slack.monotone  # within the noise: no evidence against the assumption


def test_attainment_that_rises_with_the_rate_is_reported() -> None:
    probes = [RateProbe(1.0, 0.8), RateProbe(2.0, 0.95), RateProbe(4.0, 0.5)]
    assert monotone_violations(probes) == ((1.0, 2.0),)
    assert monotone_violations(probes, slack=0.2) == ()
    rising = search_max_rate(
        lambda rate: 0.7 if rate < 1.5 else (0.96 if rate < 3 else 0.1),
        target=0.9, tolerance=0.05, start_rps=2.0, **BOUNDS,
    )  # fmt: skip
    assert rising.status == "found" and not rising.monotone


def test_a_deployment_that_never_meets_the_target_has_capacity_zero() -> None:
    calls: list[float] = []

    def never(rate: float) -> float:
        calls.append(rate)
        return 0.4

    found = search_max_rate(never, target=0.95, tolerance=0.05, start_rps=2.0, **BOUNDS)
    assert found.status == "never_meets"
    assert found.rate_rps == 0.0 and found.attainment is None
    assert min(calls) == BOUNDS["min_rps"] and found.missed_rps == BOUNDS["min_rps"]


def test_a_deployment_that_always_meets_the_target_reports_the_highest_rate_tried() -> None:
    found = search_max_rate(lambda _rate: 1.0, target=0.95, tolerance=0.05, start_rps=2.0, **BOUNDS)
    assert found.status == "always_meets"
    assert found.rate_rps == BOUNDS["max_rps"] and found.missed_rps is None
    assert [p.rate_rps for p in found.probes] == [2.0 * 2**k for k in range(9)] + [1000.0]


def test_an_attainment_outside_zero_one_stops_the_search() -> None:
    with pytest.raises(ValueError, match=r"must be in \[0, 1\], got 1.5"):
        search_max_rate(lambda _r: 1.5, target=0.9, tolerance=0.1, start_rps=1, **BOUNDS)


def test_the_confirmation_steps_down_once_when_the_real_engine_misses() -> None:
    kept = confirm_rate(step(4.0), 3.0, target=0.9, step_down=0.8)
    assert kept.met and not kept.stepped_down and kept.rate_rps == 3.0
    stepped = confirm_rate(step(3.0), 3.5, target=0.9, step_down=0.8)
    assert stepped.stepped_down and stepped.met
    assert stepped.rate_rps == pytest.approx(2.8)
    assert [p.rate_rps for p in stepped.probes] == [3.5, pytest.approx(2.8)]
    missed = confirm_rate(step(1.0), 3.5, target=0.9, step_down=0.8)
    assert missed.stepped_down and not missed.met and len(missed.probes) == 2


def test_a_probe_sends_the_workload_open_loop_at_the_rate() -> None:
    closed = WorkloadSpec(arrivals=ClosedLoop(users=4), num_requests=8, seed=3, repeats=3)
    probe = workload_at_rate(closed, 2.5)
    assert probe.arrivals == PoissonArrivals(rate_rps=2.5)
    assert (probe.num_requests, probe.seed, probe.repeats) == (8, 3, 1)
    assert workload_at_rate(closed, 2.5, 100).num_requests == 100
    bursty = closed.model_copy(update={"arrivals": GammaArrivals(rate_rps=1.0, cv=2.0)})
    assert workload_at_rate(bursty, 4.0).arrivals == GammaArrivals(rate_rps=4.0, cv=2.0)


def test_the_cost_at_capacity_is_the_replica_hours_per_request_served_in_the_sla() -> None:
    # two replicas at 0.1 USD/h serving 2 req/s, 90% within the SLA: 0.2 USD per 6480 requests
    cost = cost_per_1k_at_rate({"llm": 0.1}, {"llm": 2}, 2.0, 0.9)
    assert cost == pytest.approx(0.2 / 6480 * 1000)
    assert cost_per_1k_at_rate({"llm": 0.1}, {"llm": 1}, 2.0, 0.0) is None
    with pytest.raises(ValueError, match="no entry for model key 'judge'"):
        cost_per_1k_at_rate({"llm": 0.1}, {"judge": 1}, 1.0, 1.0)


def measurement(confirmed: tuple[RateProbe, ...] | None) -> CapacityMeasurement:
    from runtime.capacity import Confirmation

    search = search_max_rate(step(3.0), target=0.9, tolerance=0.05, start_rps=1.0, **BOUNDS)
    return CapacityMeasurement(
        spec=CapacitySpec(target=0.9),
        search=search,
        confirmation=Confirmation(confirmed, 0.9) if confirmed else None,
        prices={"llm": 0.0832},
        replicas={"llm": 1},
    )


def test_the_metrics_take_the_confirmed_rate_and_say_how_it_was_found() -> None:
    simulated = measurement(None).metrics()
    assert simulated["max_goodput_rps"] == pytest.approx(3.0, rel=0.05)
    assert simulated["capacity"]["confirmed"] is False
    stepped = measurement((RateProbe(3.0, 0.8), RateProbe(2.4, 0.95))).metrics()
    assert stepped["max_goodput_rps"] == 2.4
    assert stepped["cost_per_1k_at_capacity_usd"] == pytest.approx(
        0.0832 / (2.4 * 0.95 * 3600) * 1000
    )
    assert stepped["capacity"]["stepped_down"] and stepped["capacity"]["confirmed"]
    line = capacity_line({**stepped, "sla_e2e_s": 30.0})
    assert line is not None
    assert line.startswith("Capacity: 2.4 req/s with at least 90% of requests answered within 30 s")
    assert "stepped down from 3 req/s, where it was 80.0%" in line
    missed = measurement((RateProbe(3.0, 0.5), RateProbe(2.4, 0.6))).metrics()
    assert missed["max_goodput_rps"] is None and missed["cost_per_1k_at_capacity_usd"] is None
    assert "Capacity not confirmed" in (capacity_line(missed) or "")
    assert capacity_line({"sla_attainment": 1.0}) is None


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"capacity.target": 1.5}, "capacity.target: Input should be less than or equal to 1"),
        ({"capacity.tolerance": 0}, "capacity.tolerance: Input should be greater than 0"),
        ({"capacity.min_rps": 5, "capacity.max_rps": 2}, "capacity.min_rps must be below"),
        ({"capacity.taget": 0.9}, "did you mean 'target'"),
    ],
)
def test_a_bad_capacity_setting_is_one_line_naming_the_file_and_field(
    override: dict[str, object], expected: str
) -> None:
    path = ROOT / "experiments" / "quickstart.yaml"
    with pytest.raises(ConfigError) as raised:
        load_run_spec(path, override)
    message = str(raised.value)
    assert "\n" not in message and str(path) in message and expected in message


def test_the_setting_turns_the_measurement_on_with_documented_defaults() -> None:
    spec = load_run_spec(ROOT / "experiments" / "quickstart.yaml", {"capacity.target": 0.9})
    assert spec.capacity == CapacitySpec(target=0.9)
    assert load_run_spec(ROOT / "experiments" / "quickstart.yaml").capacity is None
    assert all(field.description for field in CapacitySpec.model_fields.values())
