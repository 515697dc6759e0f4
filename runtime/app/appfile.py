"""The app folder format: an `app.yaml` (AppFile) with its dataset, scorer and code files.

A user's application is a folder:

```yaml
# app.yaml
name: arithmetic                   # how deployments and `fmtune apps list` name it
description: Word problems with exact numeric answers.
inputs: [question]                 # what each request carries
answer: [answer]                   # the fields every variant answers
models: [llm]                      # the model keys its llm nodes call
variants:                          # the `architecture` knob; the first is the default
  direct:                          # the DAG grammar of runtime.app.dag, inline ...
    nodes:
      - {id: solve, kind: llm, model: llm, output_fields: [answer],
         prompt: "{prompt.instruction}\\n{few_shot}Question: {question}\\n{format_instructions}"}
    outputs: {answer: solve.answer}
  expression: {file: variants/expression.yaml}   # ... or in a file of the folder
prompts:                           # the `prompt` knob: texts by prompt variant
  instruction: {plain: "Solve the problem.", teacher: "You are a patient maths teacher."}
few_shot:                          # the `few_shot` knob: worked examples from the train rows
  count: 3
  template: "Question: {question}\\nAnswer: {answer}\\n\\n"
dataset: {path: data.jsonl, split: {test_fraction: 0.5, seed: 0}}
scorer: {kind: numeric}            # or {kind: python, function: score.py:score}, ...
```

Templates of llm nodes (prompt and system) may use, besides the DAG grammar's placeholders,
`{prompt.<name>}` (the text of the chosen prompt variant; itself a template fragment) and
`{few_shot}` (the worked examples, or nothing when the knob is off). Code nodes and the Python
scorer name `file.py:function`, relative to the folder. `load_app_folder` validates all of it,
builds every variant with every prompt variant, reads the dataset and tries the scorer on the
first row's own reference, so a mistake is one line naming the file, the field (or node, or
row) and the value before anything runs. `AppFile.model_json_schema()` is the JSON schema
editors use (apps/app.schema.json, `fmtune apps schema`).
"""

from __future__ import annotations

import functools
import logging
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
)

from runtime.app.application import MODEL_KEY_PATTERN, AppKnobs, Application
from runtime.app.dag import (
    FORMAT_INSTRUCTIONS,
    App,
    LlmNode,
    Loop,
    Node,
    Ref,
    render,
    template_refs,
)
from runtime.app.datasets import Dataset, DatasetFile, Example, load_dataset, shown_path
from runtime.app.scoring import Scorer, ScorerSpec, build_scorer, check_score
from runtime.errors import ConfigError, describe_validation_error, unknown_name_message

logger = logging.getLogger(__name__)

APP_FILE = "app.yaml"
"""The name of the file that makes a folder an app."""
FEW_SHOT = "few_shot"
"""The template placeholder the few-shot examples fill."""
PROMPT = "prompt"
"""`{prompt.<name>}` in a template is the chosen prompt variant's text named <name>."""
_IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]*$"


class VariantFile(BaseModel):
    """A DAG variant kept in its own YAML file (the same keys as an inline variant)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = Field(min_length=1, description="The variant's YAML file, relative to the folder.")


class Variant(BaseModel):
    """One DAG variant: nodes, loops and where each answer field comes from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = Field(default="", description="What this variant does differently.")
    nodes: tuple[Node, ...] = Field(
        min_length=1, description="The steps (llm, code, api nodes; runtime.app.dag)."
    )
    loops: tuple[Loop, ...] = Field(default=(), description="Bounded loops over groups of nodes.")
    outputs: dict[str, str] = Field(
        min_length=1,
        description="Each answer field -> the 'node.field' (or input) it comes from; exactly "
        "the app's `answer` fields.",
    )


def _variant_kind(value: Any) -> str:
    return "file" if isinstance(value, Mapping) and "file" in value else "inline"


VariantEntry = Annotated[
    Annotated[Variant, Tag("inline")] | Annotated[VariantFile, Tag("file")],
    Discriminator(_variant_kind),
]
"""A variant written inline, or `{file: ...}`."""


class FewShot(BaseModel):
    """Worked examples the `few_shot` knob puts into the templates' {few_shot}."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    count: int = Field(default=3, ge=1, le=50, description="How many train rows to show.")
    template: str = Field(
        min_length=1,
        description="One example: a template over the row's inputs and reference columns, "
        "e.g. 'Question: {question}\\nAnswer: {answer}\\n\\n'; the examples are joined as is.",
    )


class AppFile(BaseModel):
    """app.yaml: an application in the public format."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        pattern=MODEL_KEY_PATTERN,
        description="The app's name: what `fmtune apps list` shows and a deployment serves it "
        "as by default.",
    )
    description: str = Field(default="", description="One line on what the app does.")
    inputs: tuple[Annotated[str, Field(pattern=_IDENTIFIER)], ...] = Field(
        min_length=1, description="The request inputs, e.g. [question]."
    )
    answer: tuple[Annotated[str, Field(pattern=_IDENTIFIER)], ...] = Field(
        min_length=1, description="The answer fields every variant gives, e.g. [answer]."
    )
    models: tuple[Annotated[str, Field(pattern=MODEL_KEY_PATTERN)], ...] = Field(
        default=("llm",),
        min_length=1,
        description="The model keys its llm nodes call; a deployment serves each (or the "
        "experiment's `app.model_key` / `app.nodes.<id>.model` maps them to its own).",
    )
    variants: dict[Annotated[str, Field(pattern=_IDENTIFIER)], VariantEntry] = Field(
        min_length=1,
        description="The DAG variants by name (the `architecture` knob); the first is the "
        "default. Each is inline or `{file: variants/x.yaml}`.",
    )
    prompts: dict[Annotated[str, Field(pattern=_IDENTIFIER)], dict[str, str]] = Field(
        default_factory=dict,
        description="Texts by name, each by prompt variant (the `prompt` knob; every text "
        "has the same variants, the first is the default): {prompt.<name>} in a template.",
    )
    few_shot: FewShot | None = Field(
        default=None,
        description="Worked examples from the dataset's train rows for {few_shot} (needs "
        "dataset.split); absent: the app has no `few_shot` knob.",
    )
    dataset: DatasetFile = Field(description="The rows runs evaluate (and few-shot train rows).")
    scorer: ScorerSpec = Field(description="How an answer is scored against its reference.")

    @field_validator("prompts")
    @classmethod
    def _same_variants(cls, prompts: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        variants: list[str] | None = None
        for name, texts in prompts.items():
            if not texts:
                raise ValueError(f"prompts.{name}: needs a text for at least one prompt variant")
            if variants is None:
                variants = list(texts)
            elif set(texts) != set(variants):
                raise ValueError(
                    f"prompts.{name}: has prompt variants {list(texts)}, but every text needs "
                    f"the same as the first: {variants}"
                )
        return prompts

    def prompt_variants(self) -> tuple[str, ...]:
        """The prompt variants, in the order the first text lists them."""
        return tuple(next(iter(self.prompts.values()), {}))


# --------------------------------------------------------------------------------------------
# Templates: {prompt.<name>} and {few_shot}
# --------------------------------------------------------------------------------------------


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def fill_template(template: str, texts: Mapping[str, str], few_shot: str | None) -> str:
    """The template with {prompt.<name>} replaced by texts[name] (a template fragment, kept
    as written) and {few_shot} by the few-shot text (literal: its braces escaped); every other
    placeholder is kept. ValueError for an unknown text name, or {few_shot} when few_shot is
    None (the app has no few-shot examples). A template that does not parse is returned as
    is, for the DAG's validation to report."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError:
        return template
    parts: list[str] = []
    for literal, name, spec, conversion in parsed:
        parts.append(_escape(literal))
        if name is None:
            continue
        if name == FEW_SHOT:
            if few_shot is None:
                raise ValueError("uses {few_shot} but the app declares no few_shot examples")
            parts.append(_escape(few_shot))
        elif name.startswith(f"{PROMPT}."):
            key = name.removeprefix(f"{PROMPT}.")
            if key not in texts:
                raise ValueError(
                    f"uses {{{name}}}: " + unknown_name_message("prompt text", key, texts)
                )
            parts.append(texts[key])
        else:
            parts.append(
                "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
                + "}"
            )  # fmt: skip
    return "".join(parts)


def few_shot_text(spec: FewShot, train: Sequence[Example]) -> str:
    """The first spec.count train rows, each rendered by spec.template."""
    examples = train[: spec.count]

    def lookup(example: Example) -> Any:
        def value(ref: Ref) -> Any:
            if ref.field in example.inputs:
                return example.inputs[ref.field]
            return example.reference[ref.field]

        return value

    return "".join(render(spec.template, lookup(example)) for example in examples)


def build_variant(
    app: AppFile, name: str, variant: Variant, knobs: AppKnobs, few_shot: str | None
) -> App:
    """The DAG of one variant: its templates filled for the knobs' prompt variant and
    few-shot setting, in the knobs' format (node settings are applied by the Application).
    ValueError (or pydantic's ValidationError) naming the node and the value when it does not
    make a valid DAG."""
    prompt = knobs.prompt or (app.prompt_variants()[0] if app.prompts else "")
    texts = {key: by_variant[prompt] for key, by_variant in app.prompts.items()}
    shots = (few_shot if knobs.few_shot else "") if few_shot is not None else None
    nodes: list[Any] = []
    for node in variant.nodes:
        if node.id == PROMPT:
            raise ValueError(f"node id '{PROMPT}' is reserved for {{prompt.<name>}} texts")
        if not isinstance(node, LlmNode):
            nodes.append(node)
            continue
        filled: dict[str, Any] = {}
        for field in ("prompt", "system"):
            template = getattr(node, field)
            if template is not None:
                try:
                    filled[field] = fill_template(template, texts, shots)
                except ValueError as error:
                    raise ValueError(f"node '{node.id}': {field} {error}") from None
        nodes.append(LlmNode.model_validate({**node.model_dump(exclude={"kind"}), **filled}))
    return App(
        name=f"{app.name}-{name}",
        inputs=app.inputs,
        nodes=tuple(nodes),
        loops=variant.loops,
        outputs=variant.outputs,
        format=knobs.format,
    )


# --------------------------------------------------------------------------------------------
# Loading a folder
# --------------------------------------------------------------------------------------------


def _read_mapping(path: Path, shown: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{shown}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{shown}: cannot read it ({error})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{shown}: not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{shown}: expected a mapping at the top level")
    return data


def _absolute_callables(variant: Any, folder: Path) -> Any:
    """A raw variant with its code nodes' 'file.py:function' callables made absolute."""
    if not isinstance(variant, Mapping) or not isinstance(variant.get("nodes"), list):
        return variant
    nodes = []
    for node in variant["nodes"]:
        if isinstance(node, Mapping) and node.get("kind") == "code":
            target = str(node.get("callable", ""))
            file, sep, function = target.rpartition(":")
            if sep and file.endswith(".py") and not Path(file).is_absolute():
                node = {**node, "callable": f"{(folder / file).resolve()}:{function}"}
        nodes.append(node)
    return {**variant, "nodes": nodes}


def _read_variant(folder: Path, name: str, entry: VariantFile, shown: str) -> Variant:
    path = folder / entry.file
    where = shown_path(path)
    if not path.is_file():
        raise ConfigError(f"{shown}: variants.{name}.file: no such file '{entry.file}'")
    raw = _absolute_callables(_read_mapping(path, where), folder)
    try:
        return Variant.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, where, model=Variant)) from None


def _check_variant(
    app: AppFile, name: str, variant: Variant, few_shot: str | None, where: str
) -> App:
    """Build the variant for every prompt variant (and few-shot on and off); the first build.
    ConfigError naming `where` (the variant) and the problem."""
    missing = [field for field in app.answer if field not in variant.outputs]
    extra = [field for field in variant.outputs if field not in app.answer]
    if missing:
        raise ConfigError(
            f"{where}.outputs: no answer field '{missing[0]}' (answer: {list(app.answer)})"
        )
    if extra:
        raise ConfigError(
            f"{where}.outputs: {unknown_name_message('answer field', extra[0], app.answer)}"
        )
    for node in variant.nodes:
        if isinstance(node, LlmNode) and node.model not in app.models:
            raise ConfigError(
                f"{where}: node '{node.id}': model: "
                + unknown_name_message("model key", node.model, app.models)
                + f" (the app's models: {', '.join(app.models)})"
            )
    built: App | None = None
    for prompt in app.prompt_variants() or ("",):
        for shots in (False, True) if few_shot is not None else (False,):
            knobs = AppKnobs(prompt=prompt, few_shot=shots)
            try:
                dag = build_variant(app, name, variant, knobs, few_shot)
            except ValidationError as error:
                raise ConfigError(describe_validation_error(error, where)) from None
            except ValueError as error:
                raise ConfigError(f"{where}: {error}") from None
            built = built or dag
    assert built is not None
    return built


def _check_few_shot(spec: FewShot, dataset: Dataset, columns: Sequence[str], where: str) -> str:
    try:
        refs = template_refs(spec.template)
    except ValueError as error:
        raise ConfigError(f"{where}.template: {error}") from None
    for ref in refs:
        if ref.node is not None or ref.field not in columns:
            raise ConfigError(
                f"{where}.template: "
                + unknown_name_message("column", str(ref), columns)
                + " (a few-shot example reads its row's inputs and reference columns)"
            )
    if not dataset.train:
        raise ConfigError(f"{where}: needs train rows: give the dataset a split")
    return few_shot_text(spec, dataset.train)


def _check_scorer(scorer: Scorer, app: AppFile, dataset: Dataset, where: str) -> None:
    """The scorer, on the first test row's own reference as the answer, must give a number
    in [0, 1] (an LLM judge is not tried: it needs its model)."""
    if scorer.model_keys:
        return
    example = dataset.test[0]
    reference = example.reference if isinstance(example.reference, Mapping) else {}
    perfect = {field: reference.get(field) for field in app.answer}
    try:
        check_score(scorer.compare(perfect, example))
    except Exception as error:  # a user's scorer may raise anything: that is the finding
        raise ConfigError(
            f"{where}: scoring row {example.row}'s own reference as the answer failed: "
            f"{type(error).__name__}: {error}"
        ) from None


def load_app_folder(path: Path) -> Application:
    """The Application an app folder (or its app.yaml) describes, fully checked (see the
    module docstring); ConfigError, one line naming the file, the field and the value."""
    file = path / APP_FILE if path.is_dir() else path
    folder = file.parent
    shown = shown_path(file)
    if not file.is_file():
        what = "no app.yaml in the folder" if path.is_dir() else "no such file"
        raise ConfigError(f"{shown}: {what}")
    raw = _read_mapping(file, shown)
    if isinstance(raw.get("variants"), dict):
        raw["variants"] = {
            name: _absolute_callables(variant, folder) for name, variant in raw["variants"].items()
        }
    try:
        app = AppFile.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, shown, model=AppFile)) from None
    for reserved in (FEW_SHOT, FORMAT_INSTRUCTIONS):
        if reserved in app.inputs:
            raise ConfigError(f"{shown}: inputs: '{reserved}' is a reserved template name")
    dataset_inputs = tuple(app.dataset.inputs or app.inputs)
    if set(dataset_inputs) != set(app.inputs):
        raise ConfigError(
            f"{shown}: dataset.inputs must be the app's inputs {list(app.inputs)}, got "
            f"{list(dataset_inputs)}"
        )
    reference = tuple(app.dataset.reference or app.answer)
    dataset = load_dataset(app.dataset, folder, app.inputs, reference)
    few_shot: str | None = None
    if app.few_shot is not None:
        columns = list(dict.fromkeys((*app.inputs, *reference)))
        few_shot = _check_few_shot(app.few_shot, dataset, columns, f"{shown}: few_shot")
    scorer = build_scorer(
        app.scorer,
        base_dir=folder,
        answer_fields=app.answer,
        reference_columns=reference,
        inputs=app.inputs,
        where=f"{shown}: scorer",
    )
    _check_scorer(scorer, app, dataset, f"{shown}: scorer")
    variants: dict[str, Variant] = {}
    llm_nodes: list[str] = []
    for name, entry in app.variants.items():
        variant = entry if isinstance(entry, Variant) else _read_variant(folder, name, entry, shown)
        where = (
            f"{shown}: variants.{name}"
            if isinstance(entry, Variant)
            else shown_path(folder / entry.file)
        )
        _check_variant(app, name, variant, few_shot, where)
        variants[name] = variant
        llm_nodes += [
            n.id for n in variant.nodes if isinstance(n, LlmNode) and n.id not in llm_nodes
        ]

    def variant_dag(knobs: AppKnobs) -> App:
        name = knobs.architecture or next(iter(variants))
        return build_variant(app, name, variants[name], knobs, few_shot)

    def examples(size: int, seed: int) -> list[Example]:
        return dataset.first(size)

    logger.debug("loaded app '%s' from %s: variants %s", app.name, shown, list(variants))
    return Application(
        name=app.name,
        description=app.description,
        inputs=app.inputs,
        answer=app.answer,
        architectures=tuple(variants),
        variant=variant_dag,
        examples=examples,
        scorer=scorer,
        prompts=app.prompt_variants(),
        few_shot=few_shot is not None,
        llm_nodes=tuple(llm_nodes),
        folder=folder.resolve(),
    )


@functools.lru_cache(maxsize=64)
def _load_cached(file: str, mtime_ns: int) -> Application:
    return load_app_folder(Path(file))


def cached_app_folder(path: Path) -> Application:
    """load_app_folder, once per app.yaml (and again when it changes)."""
    file = path / APP_FILE if path.is_dir() else path
    try:
        stamp = file.stat().st_mtime_ns
    except OSError:
        return load_app_folder(path)  # reports the missing file
    return _load_cached(str(file.resolve()), stamp)


def app_file_schema() -> dict[str, Any]:
    """The JSON schema of app.yaml (for editors: apps/app.schema.json)."""
    schema = AppFile.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "fmtune app.yaml"
    return schema
