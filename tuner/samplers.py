"""The search algorithms a study may use, declared once: name, one line, how to build it.

The experiment schema (`tune.sampler`), `make_sampler`, the study loop and the CLI's
`--sampler` help all read this registry, so adding an algorithm is one entry here.

Most entries are optuna samplers. An entry with a `driver` keeps its own population and
proposes each trial's knobs itself (pymoo's NSGA-II through its ask/tell interface): the study
loop enqueues what the driver proposes and tells it every result; its optuna sampler only
fills in what the driver left open.

Importing this module is cheap (optuna and pymoo load inside the factories), so the CLI can
list the names in its help without loading either.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

from runtime.errors import ConfigError, unknown_name_message

if TYPE_CHECKING:
    import optuna

    from tuner.experiment import TuneSpec
    from tuner.space import SearchSpace

logger = logging.getLogger(__name__)


class PopulationDriver(Protocol):
    """An algorithm that proposes trials itself and learns from every result, in order."""

    def next_params(self) -> dict[str, Any]:
        """The knobs of the next trial to evaluate."""
        ...

    def tell(self, params: dict[str, Any], values: list[float], feasible: bool) -> None:
        """The objective values of the trial handed out last."""
        ...

    def fail(self) -> None:
        """The trial handed out last could not be measured."""
        ...


SamplerFactory = Callable[["TuneSpec", "SearchSpace"], "optuna.samplers.BaseSampler"]
DriverFactory = Callable[["SearchSpace", "TuneSpec", "optuna.Study"], PopulationDriver]


@dataclass(frozen=True)
class SamplerEntry:
    """One search algorithm: its name, a line for help texts, and how to build it."""

    name: str
    description: str
    sampler: SamplerFactory
    """Builds the optuna sampler of the study."""
    driver: DriverFactory | None = None
    """Builds the population driver, for algorithms that propose trials themselves."""


def _nsga2(tune: TuneSpec, space: SearchSpace) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.NSGAIISampler(population_size=tune.population_size, seed=tune.seed)


def _nsga3(tune: TuneSpec, space: SearchSpace) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.NSGAIIISampler(population_size=tune.population_size, seed=tune.seed)


def _tpe(tune: TuneSpec, space: SearchSpace) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.TPESampler(
        seed=tune.seed, multivariate=True, n_startup_trials=min(5, tune.trials)
    )


def _random(tune: TuneSpec, space: SearchSpace) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.RandomSampler(seed=tune.seed)


def _grid(tune: TuneSpec, space: SearchSpace) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.GridSampler(space.grid(), seed=tune.seed)


def _pymoo_nsga2(space: SearchSpace, tune: TuneSpec, study: optuna.Study) -> PopulationDriver:
    from tuner.pymoo_driver import PymooDriver

    return PymooDriver(space, tune, study)


SAMPLERS: Mapping[str, SamplerEntry] = MappingProxyType(
    {
        entry.name: entry
        for entry in (
            SamplerEntry("nsga2", "optuna's NSGA-II, evolutionary", _nsga2),
            SamplerEntry("tpe", "optuna's multivariate TPE, Bayesian", _tpe),
            SamplerEntry("nsga3", "optuna's NSGA-III, for three or more objectives", _nsga3),
            SamplerEntry("random", "optuna's uniform random sampling, a baseline", _random),
            SamplerEntry("grid", "the search space's grid, in random order", _grid),
            SamplerEntry(
                "pymoo-nsga2",
                "pymoo's NSGA-II through ask/tell, its population driven by one worker",
                _nsga2,
                driver=_pymoo_nsga2,
            ),
        )
    }
)
"""Every search algorithm by name, in the order help texts list them."""


def sampler_entry(name: str) -> SamplerEntry:
    """The registry entry of a sampler; an unknown name is a ConfigError naming the closest."""
    entry = SAMPLERS.get(name)
    if entry is None:
        raise ConfigError(unknown_name_message("sampler", name, SAMPLERS))
    return entry


def sampler_help() -> str:
    """The names with their one-line descriptions, for help texts and the schema."""
    return ", ".join(f"{entry.name} ({entry.description})" for entry in SAMPLERS.values())


def make_sampler(tune: TuneSpec, space: SearchSpace) -> optuna.samplers.BaseSampler:
    """The optuna sampler of the algorithm the tune section names (or defaults to)."""
    return sampler_entry(tune.sampler_name()).sampler(tune, space)


def make_driver(tune: TuneSpec, space: SearchSpace, study: optuna.Study) -> PopulationDriver | None:
    """The population driver of the algorithm, or None when optuna's sampler decides alone."""
    entry = sampler_entry(tune.sampler_name())
    if entry.driver is None:
        return None
    logger.info("sampler %s proposes each trial's knobs itself", entry.name)
    return entry.driver(space, tune, study)
