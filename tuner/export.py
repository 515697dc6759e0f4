"""Export the Pareto-optimal deployments of a study as bundles people deploy.

Each bundle (DEPLOY.yaml for `fmtune serve`, vLLM command lines, docker-compose.yaml,
Kubernetes manifests, a README with the trial's metrics, and measured.json: what the trial
measured and how, for `fmtune regress`) is rebuilt from what the study
storage holds: the experiment the study was created with and the trial's knobs. Nothing is
read from the trial's output folder, so `fmtune export --storage URL` works on any machine.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from runtime.capacity import CAPACITY_DETAIL
from runtime.deployment import Deployment
from runtime.errors import ConfigError
from runtime.render.bundle import write_bundle
from runtime.run import RunSpec
from tuner.experiment import Experiment
from tuner.knobs import check_knob_names, trial_spec
from tuner.pareto import Objective, front_table, pareto_front
from tuner.space import load_space
from tuner.study import ATTR_METRICS, deployment_of

logger = logging.getLogger(__name__)


MEASURED_FILE = "measured.json"
"""The file of a bundle holding what its trial measured and how (`measured_record`)."""


def bundle_name(trial: int) -> str:
    """The folder of a trial's bundle in an export (also its name in `fmtune regress`)."""
    return f"trial-{trial:04d}"


@dataclass(frozen=True)
class ExportedBundle:
    """One written bundle."""

    trial: int
    folder: Path
    files: tuple[Path, ...]
    metrics: dict[str, Any]


def load_study(study_name: str, storage_url: str) -> optuna.Study:
    """An existing study; a clear error when the name or storage is wrong."""
    try:
        return optuna.load_study(study_name=study_name, storage=storage_url)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage_url)]
        raise ConfigError(
            f"study must be one of {names} in {storage_url}, got '{study_name}'"
        ) from None


def study_experiment(study: optuna.Study, wait_s: float = 0.0) -> Experiment:
    """The experiment a study was created with (stored in its user attributes); waits up to
    wait_s for a study that `fmtune tune` is creating at this moment (`Study.user_attrs` reads
    the storage on every access, so polling it sees the creator's write)."""
    deadline = time.monotonic() + wait_s
    data = study.user_attrs.get("fmtune.experiment")
    while data is None and time.monotonic() < deadline:
        time.sleep(0.5)
        data = study.user_attrs.get("fmtune.experiment")
    if data is None:
        raise ConfigError(f"study '{study.study_name}' was not created by fmtune tune")
    return Experiment.model_validate(data)


def study_objectives(study: optuna.Study) -> list[Objective]:
    """The objectives a study optimizes."""
    return [Objective.model_validate(o) for o in study.user_attrs.get("fmtune.objectives", [])]


def trial_run_spec(experiment: Experiment, trial: optuna.trial.FrozenTrial) -> RunSpec:
    """The RunSpec a trial measured: the experiment with the trial's knobs applied, built
    exactly as the study built it."""
    assert experiment.tune is not None
    space = load_space(experiment.tune.search_space)
    check_knob_names(
        space, experiment.deployment.models, experiment.tune.search_space, experiment.app
    )
    return trial_spec(experiment, space, trial.params)


def trial_deployment(experiment: Experiment, trial: optuna.trial.FrozenTrial) -> Deployment:
    """The DEPLOY.yaml content of a trial (see trial_run_spec)."""
    return deployment_of(trial_run_spec(experiment, trial))


def measured_record(
    study: optuna.Study, experiment: Experiment, trial: optuna.trial.FrozenTrial
) -> dict[str, Any]:
    """MEASURED_FILE's content: what the trial measured and how, so that `fmtune regress`
    can measure the bundle again the same way (workload, dataset, SLA, prices) and compare:
    `run_spec` (the trial's RunSpec), `objectives`, `regress` (the experiment's thresholds),
    `metrics` (the trial's metrics.json, with per-repeat values and per-example quality),
    and, for `fmtune regress --retune`, `params` (the trial's knobs) and `experiment` (the
    study's experiment, its search space included)."""
    assert experiment.tune is not None
    return {
        "study": study.study_name,
        "trial": trial.number,
        "run_spec": trial_run_spec(experiment, trial).model_dump(mode="json"),
        "objectives": [o.model_dump(mode="json") for o in experiment.tune.objectives],
        "regress": experiment.tune.regress.model_dump(mode="json"),
        "metrics": dict(trial.user_attrs.get(ATTR_METRICS, {})),
        "params": dict(trial.params),
        "experiment": experiment.model_dump(mode="json"),
    }


def export_front(study: optuna.Study, out_dir: Path) -> list[ExportedBundle]:
    """Write one bundle per Pareto-optimal trial into out_dir/trial-NNNN/."""
    experiment = study_experiment(study)
    front = pareto_front(study)
    if not front:
        raise ConfigError(
            f"study '{study.study_name}' has no feasible complete trial to export yet"
        )
    bundles = []
    for trial in front:
        deployment = trial_deployment(experiment, trial)
        metrics = dict(trial.user_attrs.get(ATTR_METRICS, {}))
        folder = out_dir / bundle_name(trial.number)
        title = f"{study.study_name} trial {trial.number}"
        shown = {  # no raw data; the capacity's detail makes the README's capacity sentence
            k: v for k, v in metrics.items() if not isinstance(v, dict) or k == CAPACITY_DETAIL
        }
        files = write_bundle(deployment, folder, metrics=shown, title=title)
        measured = folder / MEASURED_FILE
        record = measured_record(study, experiment, trial)
        measured.write_text(json.dumps(record, indent=1) + "\n")
        bundles.append(ExportedBundle(trial.number, folder, (*files, measured), metrics))
    logger.info("exported %d bundles to %s", len(bundles), out_dir)
    return bundles


def front_frame(study: optuna.Study) -> Any:
    """The study's trials with objective values and front membership (pandas DataFrame)."""
    return front_table(study, study_objectives(study))
