"""A run simulated: what `runtime.run.execute_run` measures, predicted by the simulator.

`simulate_run` takes the same RunSpec a real run takes, the stored step-time profile of each
model key's engine (runtime.profiler) and one `RequestShape` per request (what each LLM
call of the request asks of its model: prompt and output tokens, and the prompt's leading
content shared with other calls), and returns the simulator's result, whose
`metrics_dict()` has the keys of a real run's metrics.json. Quality is not simulated.

Request shapes come from a real run of the same app knobs and workload (`shapes_from_run`:
token counts from its trace, shared prompt prefixes from the app's prompts as the model's
tokenizer and chat template render them), so a simulated trial pays for one real run per
app configuration, not one per deployment.

Replicas of one machine slow each other (runtime.sim.steptime.StepTimeProfile.contention):
on CPU every replica of the deployment runs on this machine, so step times are scaled by
the factor of the deployment's replica count (all of them busy, the state of a loaded run).

`prediction_errors` compares a simulated run with a measured one, metric by metric; the
fidelity benchmark and multi-fidelity studies report it.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from typing import Any

from runtime.app.dag import App, LlmNode, render_calls
from runtime.engine.config import EngineConfig
from runtime.engine.models import resolve_model
from runtime.run import RunSpec
from runtime.sim.cluster import (
    RequestShape,
    Segment,
    SimModel,
    SimProvisioner,
    SimResult,
    SimSpec,
    shapes_from_spans,
    simulate,
)
from runtime.sim.steptime import StepTimeCoefficients, StepTimeProfile
from runtime.workload import sample_requests

logger = logging.getLogger(__name__)

#: The metrics a simulation is judged on against a real run, in report order.
FIDELITY_METRICS: tuple[str, ...] = (
    "e2e_p50_s",
    "e2e_p95_s",
    "ttft_p50_s",
    "tpot_p50_s",
    "requests_per_s",
    "sla_attainment",
)


# --------------------------------------------------------------------------------------------
# Shapes from a real run
# --------------------------------------------------------------------------------------------


@cache
def _tokenizer(folder: str) -> Any:
    """The model folder's tokenizer (transformers, loaded once per folder)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def chat_token_ids(engine: EngineConfig, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """The prompt token ids a vLLM server of this engine computes for a chat call (the
    model's chat template with the generation prompt)."""
    tokenizer = _tokenizer(str(resolve_model(engine.model)))
    ids = tokenizer.apply_chat_template(
        [dict(message) for message in messages], tokenize=True, add_generation_prompt=True
    )
    if isinstance(ids, Mapping):  # newer transformers return a BatchEncoding
        ids = ids["input_ids"]
    return [int(token) for token in ids]


def common_prefix(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix every sequence starts with (0 for none)."""
    if not sequences:
        return 0
    length = min(len(sequence) for sequence in sequences)
    first = sequences[0]
    for index in range(length):
        token = first[index]
        if any(sequence[index] != token for sequence in sequences[1:]):
            return index
    return length


def _digest(tokens: Sequence[int]) -> str:
    return hashlib.sha256(",".join(map(str, tokens)).encode()).hexdigest()[:16]


def shared_segments(
    calls: Mapping[int, Mapping[str, list[int]]],
) -> dict[tuple[int, str], tuple[Segment, ...]]:
    """The shared leading segments of every call, from the token ids of each request's calls
    (request index -> llm node id -> prompt token ids).

    A node's *global* segment is the prefix its prompt has in every request (chat template,
    system prompt, the literal text before the first input), keyed by its content so nodes
    with the same head share it. The *request* segment is what follows it and every call of
    the same request has in common (the request's input read by several nodes).
    """
    by_node: dict[str, list[list[int]]] = {}
    for nodes in calls.values():
        for node_id, ids in nodes.items():
            by_node.setdefault(node_id, []).append(ids)
    heads = {node_id: common_prefix(found) for node_id, found in by_node.items()}
    segments: dict[tuple[int, str], tuple[Segment, ...]] = {}
    for request, nodes in calls.items():
        together = common_prefix(list(nodes.values())) if len(nodes) > 1 else 0
        for node_id, ids in nodes.items():
            head = heads[node_id] if len(by_node[node_id]) > 1 else 0
            found: list[Segment] = []
            if head:
                found.append(Segment(scope="global", key=_digest(ids[:head]), tokens=head))
            if together > head:
                found.append(Segment(scope="request", key="shared", tokens=together - head))
            segments[(request, node_id)] = tuple(found)
    return segments


def request_token_ids(spec: RunSpec, examples: Sequence[int]) -> dict[int, dict[str, list[int]]]:
    """Per request (index in ``examples``, the dataset example each request carried), the
    prompt token ids of each llm node's first call as the app renders it (fields of other
    nodes stand as placeholders: only the leading, shared part matters here)."""
    app = spec.app.build()
    application = spec.app.application()
    dataset = application.examples(spec.dataset.size, spec.dataset.seed)
    engines = {key: model.engine for key, model in spec.deployment.models.items()}
    found: dict[int, dict[str, list[int]]] = {}
    rendered: dict[int, dict[str, list[int]]] = {}
    for request, example in enumerate(examples):
        if example not in rendered:
            calls = render_calls(app, dict(dataset[example].inputs))
            rendered[example] = {
                call.node_id: chat_token_ids(engines[call.model], call.messages) for call in calls
            }
        found[request] = rendered[example]
    return found


def shapes_from_run(
    spec: RunSpec,
    rows: Iterable[Mapping[str, Any]],
    examples: Sequence[int],
    repeat: int = 0,
) -> list[RequestShape]:
    """One shape per measured request of a real run: token counts from its trace rows
    (trace.parquet as dicts), shared prompt segments from the app's rendered prompts."""
    shapes = shapes_from_spans(rows, repeat=repeat)
    segments = shared_segments(request_token_ids(spec, examples))
    out: list[RequestShape] = []
    for index, shape in enumerate(shapes):
        calls = {
            node_id: tuple(
                call.model_copy(update={"shared": _fit(segments.get((index, node_id), ()), call)})
                for call in found
            )
            for node_id, found in shape.calls.items()
        }
        out.append(shape.model_copy(update={"calls": calls}))
    return out


def _fit(segments: tuple[Segment, ...], call: Any) -> tuple[Segment, ...]:
    """Segments cut to the call's prompt (a trace's count may differ by a token or two)."""
    kept: list[Segment] = []
    room = int(call.prompt_tokens)
    for segment in segments:
        if room <= 0:
            break
        tokens = min(segment.tokens, room)
        kept.append(segment.model_copy(update={"tokens": tokens}))
        room -= tokens
    return tuple(kept)


# --------------------------------------------------------------------------------------------
# The RunSpec as a SimSpec
# --------------------------------------------------------------------------------------------


def contended(profile: StepTimeProfile, busy: int) -> StepTimeProfile:
    """The profile with step times scaled by ``busy`` replicas computing at once."""
    factor = profile.slowdown(busy)
    if factor == 1.0:
        return profile
    values = profile.coefficients.model_dump()
    scaled = StepTimeCoefficients(**{name: value * factor for name, value in values.items()})
    return profile.model_copy(update={"coefficients": scaled})


def replica_count(spec: RunSpec) -> int | None:
    """Replicas the deployment runs on this machine (None while some are 'auto')."""
    counts = [model.replicas for model in spec.deployment.models.values()]
    if any(count == "auto" for count in counts):
        return None
    return sum(int(count) for count in counts)


def sim_spec(
    spec: RunSpec,
    shapes: Sequence[RequestShape],
    profiles: Mapping[str, StepTimeProfile],
    *,
    seed: int = 0,
) -> SimSpec:
    """The SimSpec of a RunSpec: the same app, workload, SLA, engines, replicas, router,
    provisioner and prices, with each model key's profile (slowed by the replicas sharing
    the machine when the engines run on CPU). One shape per request of the workload."""
    app: App = spec.app.build()
    busy = replica_count(spec) or 1
    models = {}
    for key, model in spec.deployment.models.items():
        profile = profiles[key]
        if model.engine.device == "cpu":
            profile = contended(profile, busy)
        models[key] = SimModel(engine=model.engine, replicas=model.replicas, profile=profile)
    provisioner = spec.deployment.provisioner
    return SimSpec(
        app=app,
        workload=spec.workload,
        shapes=tuple(shapes),
        sla_e2e_s=spec.sla.e2e_s,
        models=models,
        router=spec.deployment.router,
        provisioner=SimProvisioner(
            target_rps=provisioner.target_rps,
            sla_p99_s=provisioner.sla_p99_s,
            epsilon=provisioner.epsilon,
            scaling=provisioner.scaling,
        ),
        prices=spec.pricing.cost_model(spec.deployment),
        node_timeout_s=spec.node_timeout_s,
        seed=seed,
    )


def shapes_for_requests(shapes: Sequence[RequestShape], count: int) -> list[RequestShape]:
    """``count`` shapes, cycling through the measured ones (a simulated workload longer than
    the run that gave the shapes reuses them in order)."""
    if not shapes:
        raise ValueError("shapes must hold at least one request shape")
    return [shapes[index % len(shapes)] for index in range(count)]


def simulate_run(
    spec: RunSpec,
    shapes: Sequence[RequestShape],
    profiles: Mapping[str, StepTimeProfile],
    *,
    seed: int = 0,
) -> SimResult:
    """Simulate the run ``spec`` describes (one repeat of its workload)."""
    needed = spec.workload.num_requests
    chosen = list(shapes) if len(shapes) == needed else shapes_for_requests(shapes, needed)
    return simulate(sim_spec(spec, chosen, profiles, seed=seed))


def workload_examples(spec: RunSpec) -> list[int]:
    """The dataset example each request of the run carries (as `execute_run` picks them)."""
    dataset = spec.app.application().examples(spec.dataset.size, spec.dataset.seed)
    return sample_requests(spec.workload, len(dataset))


def llm_node_ids(app: App) -> list[str]:
    """The app's llm nodes."""
    return [node.id for node in app.nodes if isinstance(node, LlmNode)]


# --------------------------------------------------------------------------------------------
# How far a prediction is from a measurement
# --------------------------------------------------------------------------------------------


def percent_error(predicted: float | None, measured: float | None) -> float | None:
    """|predicted - measured| / |measured| in percent; None when either is missing or the
    measurement is 0 (no relative error exists), 0 when both are 0."""
    if predicted is None or measured is None:
        return None
    if not (math.isfinite(predicted) and math.isfinite(measured)):
        return None
    if measured == 0:
        return 0.0 if predicted == 0 else None
    return 100.0 * abs(predicted - measured) / abs(measured)


def prediction_errors(
    predicted: Mapping[str, Any],
    measured: Mapping[str, Any],
    metrics: Sequence[str] = FIDELITY_METRICS,
) -> dict[str, float | None]:
    """Per metric, the absolute percentage error of a simulated value against a measured one."""
    return {
        name: percent_error(_number(predicted.get(name)), _number(measured.get(name)))
        for name in metrics
    }


def _number(value: Any) -> float | None:
    """A metric value as a float; None when it is missing or not a number."""
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def error_summary(
    rows: Sequence[Mapping[str, float | None]], metrics: Sequence[str] = FIDELITY_METRICS
) -> dict[str, tuple[float | None, float | None, int]]:
    """Per metric over several comparisons: (median error, worst error, comparisons that had
    one), errors in percent."""
    import statistics

    summary: dict[str, tuple[float | None, float | None, int]] = {}
    for name in metrics:
        values = [row[name] for row in rows if row.get(name) is not None]
        found = [float(value) for value in values if value is not None]
        if found:
            summary[name] = (float(statistics.median(found)), max(found), len(found))
        else:
            summary[name] = (None, None, 0)
    return summary
