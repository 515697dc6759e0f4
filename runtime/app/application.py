"""What the runtime needs of an application, whatever its shape, and the knobs it takes.

An `Application` builds its DAG from `AppKnobs` (which DAG variant, which prompt variant,
few-shot examples on or off, the output format, sampling and loop overrides, and which model
key each llm node calls), gives its dataset as `Example`s and scores answers with a `Scorer`.
An app folder (app.yaml, runtime.app.appfile) becomes one; so may a Python package that
registers an `Application` object (runtime.app.registry finds both by name).

The knobs are declared once, here: `AppSpec` (runtime.deployment, what experiment and DEPLOY
files write under `app:`) extends AppKnobs, so the tuner sees each as `app.<knob>` and
`app.nodes.<id>.model`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from runtime.app.dag import App, LlmNode, RenderedCall, render_calls
from runtime.app.datasets import Example
from runtime.app.formats import OutputFormat
from runtime.app.scoring import Scorer
from runtime.errors import closest_name

logger = logging.getLogger(__name__)

MODEL_KEY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]*$"
"""What a model key (and an app's name in a deployment) looks like."""


class NodeKnobs(BaseModel):
    """Knobs of one llm node of an app."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Annotated[str, Field(pattern=MODEL_KEY_PATTERN)] | None = Field(
        default=None,
        description="The deployment's model key this node calls (none: as `model_key`, or the "
        "key the app names).",
    )


class AppKnobs(BaseModel):
    """The app-layer knobs every application takes; the tuner sees each as `app.<knob>`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: str = Field(
        default="",
        description="The DAG variant (the app's cognitive architecture), one of the app's "
        "`variants` (`fmtune apps check` lists them). Empty: the app's first.",
    )
    prompt: str = Field(
        default="",
        description="The prompt variant, one of the names under the app's `prompts`; its "
        "texts fill the {prompt.<name>} placeholders of the templates. Empty: the app's first.",
    )
    few_shot: bool = Field(
        default=False,
        description="Fill the {few_shot} placeholder of the templates with worked examples "
        "from the dataset's train rows (the app must declare `few_shot`); off: it is empty.",
    )
    format: OutputFormat = Field(
        default=OutputFormat.JSON, description="Output format between the LLM steps."
    )
    structured_output: bool = Field(
        default=False,
        description="Constrain every llm node with output fields with vLLM's structured "
        "outputs (JSON schema); forces the json format.",
    )
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        le=32768,
        description="Most tokens every llm node generates (none: each node's own).",
    )
    temperature: float | None = Field(
        default=None,
        ge=0.0,
        le=2.0,
        description="Sampling temperature of every llm node (none: each node's own).",
    )
    max_rounds: int | None = Field(
        default=None,
        ge=1,
        le=100,
        description="Most rounds of every loop of the variant, e.g. the extraction app's "
        "judge (none: each loop's own).",
    )
    model_key: Annotated[str, Field(pattern=f"{MODEL_KEY_PATTERN}|^$")] = Field(
        default="",
        description="The deployment's model key every llm node calls unless `nodes.<id>.model` "
        "names another. Empty: each node calls the model key the app names.",
    )
    nodes: dict[str, NodeKnobs] = Field(
        default_factory=dict,
        description="Per llm node id: its knobs (`model`). A node of another variant is "
        "ignored, so one search space can pick variants and per-node models together.",
    )

    @model_validator(mode="after")
    def _structured_needs_json(self) -> AppKnobs:
        if self.structured_output and self.format != OutputFormat.JSON:
            raise ValueError(
                f"structured_output needs format 'json', got format '{self.format.value}'"
            )
        return self


def apply_node_knobs(app: App, knobs: AppKnobs) -> App:
    """The app with the knobs that reach node settings applied: each llm node's model key
    (`nodes.<id>.model`, else `model_key`, else its own), max_tokens, temperature and
    structured output, and every loop's max_rounds."""
    nodes = []
    for node in app.nodes:
        if not isinstance(node, LlmNode):
            nodes.append(node)
            continue
        sampling = node.sampling.model_copy(
            update={
                key: value
                for key, value in (
                    ("max_tokens", knobs.max_tokens),
                    ("temperature", knobs.temperature),
                )
                if value is not None
            }
        )
        per_node = knobs.nodes.get(node.id)
        model = (per_node.model if per_node else None) or knobs.model_key or node.model
        structured = node.structured_output or (
            knobs.structured_output and bool(node.output_fields)
        )
        nodes.append(
            node.model_copy(
                update={"model": model, "sampling": sampling, "structured_output": structured}
            )
        )
    loops = [
        loop.model_copy(update={"max_rounds": knobs.max_rounds})
        if knobs.max_rounds is not None
        else loop
        for loop in app.loops
    ]
    return App(
        name=app.name,
        inputs=app.inputs,
        nodes=tuple(nodes),
        loops=tuple(loops),
        outputs=app.outputs,
        format=knobs.format,
    )


def llm_model_keys(app: App) -> list[str]:
    """The model keys the app's llm nodes call, sorted."""
    return sorted({node.model for node in app.nodes if isinstance(node, LlmNode)})


@dataclass(frozen=True)
class Application:
    """An application: its DAG variants, its dataset and its scorer."""

    name: str
    """Its name: what `fmtune apps list` shows and a deployment serves it under by default."""
    description: str
    """One line on what the app does."""
    inputs: tuple[str, ...]
    """The request inputs its DAG reads."""
    answer: tuple[str, ...]
    """The answer fields every variant's outputs give."""
    architectures: tuple[str, ...]
    """The DAG variants (the `architecture` knob); the first is the default."""
    variant: Callable[[AppKnobs], App]
    """knobs -> the DAG of the chosen variant with its prompt texts and few-shot examples
    filled in (node settings are applied by `build`)."""
    examples: Callable[[int, int], list[Example]]
    """(size, seed) -> the first `size` examples evaluated (generated apps use the seed)."""
    scorer: Scorer
    """Scores one answer against its example."""
    prompts: tuple[str, ...] = ()
    """The prompt variants (the `prompt` knob); none when the app has no prompt texts."""
    few_shot: bool = False
    """Whether the app has few-shot examples (the `few_shot` knob)."""
    llm_nodes: tuple[str, ...] = ()
    """The ids of the llm nodes of all its variants (what `nodes.<id>` may name)."""
    folder: Path | None = None
    """The app folder it was loaded from (none for an app defined in Python)."""

    def check_knobs(self, knobs: AppKnobs) -> dict[str, str]:
        """The knobs' architecture and prompt, defaults filled in (the first of each);
        ValueError naming the knob and its closest valid value for one the app lacks."""
        architecture = knobs.architecture or self.architectures[0]
        if architecture not in self.architectures:
            raise ValueError(self._not_one_of("architecture", architecture, self.architectures))
        prompt = knobs.prompt or (self.prompts[0] if self.prompts else "")
        if self.prompts and prompt not in self.prompts:
            raise ValueError(self._not_one_of("prompt", prompt, self.prompts))
        if not self.prompts and prompt:
            raise ValueError(f"prompt: app '{self.name}' has no prompt variants, got '{prompt}'")
        if knobs.few_shot and not self.few_shot:
            raise ValueError(f"few_shot: app '{self.name}' declares no few-shot examples")
        unknown = [node_id for node_id in knobs.nodes if node_id not in self.llm_nodes]
        if unknown:
            guess = closest_name(unknown[0], self.llm_nodes)
            hint = f"did you mean '{guess}'?" if guess else f"llm nodes: {list(self.llm_nodes)}"
            raise ValueError(
                f"nodes.{unknown[0]}: app '{self.name}' has no llm node '{unknown[0]}' ({hint})"
            )
        return {"architecture": architecture, "prompt": prompt}

    def _not_one_of(self, knob: str, value: str, valid: tuple[str, ...]) -> str:
        guess = closest_name(value, valid)
        hint = f" (did you mean '{guess}'?)" if guess else ""
        return f"{knob} must be one of {list(valid)} for app '{self.name}', got '{value}'{hint}"

    def build(self, knobs: AppKnobs) -> App:
        """The DAG these knobs make (validated: ValueError naming what is wrong)."""
        return apply_node_knobs(self.variant(knobs), knobs)

    def dry_run(self, knobs: AppKnobs, example: Example | None = None) -> list[RenderedCall]:
        """The chat calls one request (the first evaluated example unless given) would make
        with these knobs, rendered without any engine (runtime.app.dag.render_calls)."""
        chosen = example or self.examples(1, 0)[0]
        return render_calls(self.build(knobs), chosen.inputs)
