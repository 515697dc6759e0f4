"""Applications as DAGs of steps: LLM calls, code and external API calls.

An `App` names its request inputs, its nodes, the bounded loops among them and which node
fields make the final answer. Edges are `depends_on` lists, which give sequence and parallel
fan-out/fan-in; a node may carry a `when` condition (skipped when false); a `Loop` re-runs a
group of nodes round by round until a condition holds or `max_rounds` is reached.

Templates (prompts, system prompts, API urls and bodies) use `str.format` placeholders:
`{article}` is a request input, `{ask.email}` is field `email` of node `ask`, and
`{format_instructions}` (LLM nodes with output fields) is the instruction for the app's
output format. Every placeholder is found with `string.Formatter` at validation, so an
unbound variable, a node that is not upstream or a field a node does not produce is an error
before anything runs. Literal braces are written `{{` and `}}`.

Inside a loop, `body` lists the nodes in round order. A dependency of a body node on itself
or on a body node listed after it is a *feedback* edge: it reads that node's output from the
previous round (None in the first round) and does not order the round. Every other edge must
be acyclic. Conditions are parsed, never evaluated: `<ref> == 'value'` or `<ref> != 'value'`.
"""

from __future__ import annotations

import graphlib
import hashlib
import importlib
import importlib.util
import logging
import re
import string
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from runtime.app.formats import OutputFormat, format_instructions
from runtime.engine.client import SamplingParams
from runtime.errors import ConfigError, closest_name, describe_validation_error

logger = logging.getLogger(__name__)

FORMAT_INSTRUCTIONS = "format_instructions"
"""Reserved template variable: the output-format instruction for an LLM node's fields."""

_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_ID = re.compile(_IDENTIFIER)
_REF = re.compile(rf"(?:(?P<node>{_IDENTIFIER})\.)?(?P<field>{_IDENTIFIER})")
_CONDITION = re.compile(
    rf"\s*(?P<ref>{_IDENTIFIER}(?:\.{_IDENTIFIER})?)\s*(?P<op>==|!=)\s*"
    r"""(?:'(?P<sq>[^']*)'|"(?P<dq>[^"]*)")\s*"""
)
_CONDITION_SHAPE = "expected \"<node>.<field> == 'value'\" (or !=)"
#: Cost of a code node in deadline_shares, against 1 for an llm or api call.
CODE_NODE_COST = 0.1


# --------------------------------------------------------------------------------------------
# References, templates and conditions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ref:
    """A value a node reads: a request input (`node` is None) or a field of another node."""

    node: str | None
    field: str

    @classmethod
    def parse(cls, text: str) -> Ref:
        """'article' -> input 'article'; 'ask.email' -> field 'email' of node 'ask'."""
        match = _REF.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"'{text}' is not a reference: expected 'input' or 'node.field'")
        return cls(match.group("node"), match.group("field"))

    def __str__(self) -> str:
        return self.field if self.node is None else f"{self.node}.{self.field}"


def template_refs(template: str) -> list[Ref]:
    """The placeholders of a template, in order; ValueError for anything but plain names.

    Format specs, conversions, indexing and positional `{}` are rejected: a template only
    substitutes values, so anything else is a mistake worth reporting.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ValueError(
            f"is not a valid template ({error}); write literal braces as {{{{ }}}}"
        ) from None
    refs: list[Ref] = []
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if spec or conversion:
            raise ValueError(f"placeholder '{{{name}}}' has a format spec or conversion")
        if not name:
            raise ValueError("has a positional placeholder '{}'; name the variable")
        refs.append(Ref.parse(name))
    return refs


def render(template: str, lookup: Callable[[Ref], Any]) -> str:
    """Fill a template's placeholders with lookup(ref); None renders as an empty string."""
    parts: list[str] = []
    for literal, name, _spec, _conversion in string.Formatter().parse(template):
        parts.append(literal)
        if name is not None:
            value = lookup(Ref.parse(name))
            parts.append("" if value is None else str(value))
    return "".join(parts)


@dataclass(frozen=True)
class Condition:
    """`<ref> == 'value'` or `<ref> != 'value'`, compared ignoring case and surrounding
    whitespace and full stops (LLM answers vary in both); a missing value compares as ''."""

    ref: Ref
    op: Literal["==", "!="]
    value: str

    @classmethod
    def parse(cls, text: str) -> Condition:
        """Parse a condition; ValueError naming the text and the expected shape otherwise."""
        match = _CONDITION.fullmatch(text)
        if match is None:
            raise ValueError(f"'{text}' is not a condition: {_CONDITION_SHAPE}")
        value = match.group("sq") if match.group("sq") is not None else match.group("dq")
        op: Literal["==", "!="] = "==" if match.group("op") == "==" else "!="
        return cls(Ref.parse(match.group("ref")), op, value)

    def holds(self, actual: Any) -> bool:
        """Whether the condition is true for this value of its reference."""
        equal = _normal(actual) == _normal(self.value)
        return equal if self.op == "==" else not equal


def _normal(value: Any) -> str:
    return ("" if value is None else str(value)).strip().strip(".").strip().casefold()


def resolve_callable(path: str) -> Callable[..., Any]:
    """Import 'package.module:function', or load 'path/to/file.py:function' from a Python
    file (how app folders name their code: app.yaml's loader makes the path absolute);
    ValueError saying what is wrong with the path."""
    module_name, sep, attribute = path.rpartition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(
            f"callable must look like 'package.module:function' or 'file.py:function', got '{path}'"
        )
    if module_name.endswith(".py"):
        module = _file_module(Path(module_name), path)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ValueError(
                f"callable '{path}': cannot import '{module_name}' ({error})"
            ) from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            public = [name for name in vars(module) if not name.startswith("_")]
            hint = closest_name(part, public)
            guess = f" (did you mean '{hint}'?)" if hint else ""
            raise ValueError(
                f"callable '{path}': '{module_name}' has no attribute '{attribute}'{guess}"
            )
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"callable '{path}' is not callable")
    return target


_FILE_MODULES: dict[Path, ModuleType] = {}
"""Python files loaded by resolve_callable, by resolved path: each file is run once."""


def _file_module(file: Path, path: str) -> ModuleType:
    """The module of a Python file, loaded once under a name unique to its path."""
    resolved = file.resolve()
    if resolved in _FILE_MODULES:
        return _FILE_MODULES[resolved]
    if not resolved.is_file():
        raise ValueError(f"callable '{path}': no such file '{file}'")
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    name = f"_fmtune_file_{resolved.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise ValueError(f"callable '{path}': cannot load '{file}' as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # the file's own code may raise anything while it loads
        del sys.modules[name]
        raise ValueError(
            f"callable '{path}': loading '{file}' raised {type(error).__name__}: {error}"
        ) from None
    _FILE_MODULES[resolved] = module
    return module


# --------------------------------------------------------------------------------------------
# Nodes
# --------------------------------------------------------------------------------------------


class NodeSampling(BaseModel):
    """Sampling parameters of an LLM node."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_tokens: int = Field(128, ge=1, le=32768, description="Most tokens the node generates.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    seed: int | None = Field(None, description="Sampling seed; None lets the server choose.")
    stop: tuple[str, ...] = Field((), description="Strings that end generation.")

    def params(self, json_schema: dict[str, Any] | None = None) -> SamplingParams:
        """The client's SamplingParams, with an optional structured-output schema."""
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=self.stop,
            json_schema=json_schema,
        )


class _NodeBase(BaseModel):
    """What every node has: an id, its dependencies and an optional condition."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(pattern=f"^{_IDENTIFIER}$", description="Unique node id (an identifier).")
    depends_on: tuple[str, ...] = Field(
        (), description="Ids of the nodes that must finish before this one starts."
    )
    when: str | None = Field(
        None,
        description="Run only if this holds, e.g. \"route.kind == 'web'\"; skipped (its "
        "fields None) otherwise. The referenced node must be upstream.",
    )
    output_fields: tuple[str, ...] = Field(
        (), description="Names of the fields this node produces for later nodes and outputs."
    )

    def fields(self) -> tuple[str, ...]:
        """Every field other nodes may read from this one."""
        return self.output_fields

    def refs(self) -> list[tuple[str, Ref]]:
        """(where, ref) for every value this node reads, `when` included."""
        return [("when", Condition.parse(self.when).ref)] if self.when else []

    def _check_common(self) -> None:
        """Rules every kind shares; raises ValueError naming the node."""
        for name in self.output_fields:
            if not _ID.fullmatch(name):
                raise ValueError(f"node '{self.id}': output field '{name}' is not an identifier")
        if len(set(self.output_fields)) != len(self.output_fields):
            raise ValueError(
                f"node '{self.id}': duplicate output_fields {list(self.output_fields)}"
            )
        if self.when is not None:
            try:
                Condition.parse(self.when)
            except ValueError as error:
                raise ValueError(f"node '{self.id}': when {error}") from None


def _template_refs(node_id: str, where: str, template: str) -> list[tuple[str, Ref]]:
    try:
        return [(where, ref) for ref in template_refs(template)]
    except ValueError as error:
        raise ValueError(f"node '{node_id}': {where} {error}") from None


class LlmNode(_NodeBase):
    """One chat call to a model of the deployment; its answer parsed into output_fields."""

    kind: Literal["llm"] = Field("llm", description="Node kind discriminator.")
    model: str = Field(min_length=1, description="Model key of the deployment, e.g. 'llm'.")
    prompt: str = Field(min_length=1, description="User message template.")
    system: str | None = Field(None, description="System message template; none if absent.")
    sampling: NodeSampling = Field(default_factory=NodeSampling, description="Sampling.")
    structured_output: bool = Field(
        False,
        description="Constrain decoding to a JSON schema of output_fields (answers in JSON "
        "whatever the app's format).",
    )

    def fields(self) -> tuple[str, ...]:
        """Parsed output fields plus 'text', the raw answer."""
        return (*self.output_fields, "text")

    def refs(self) -> list[tuple[str, Ref]]:
        """Placeholders of the prompt and system prompt, and the `when` reference."""
        refs = _template_refs(self.id, "prompt", self.prompt)
        if self.system:
            refs += _template_refs(self.id, "system", self.system)
        return [*refs, *super().refs()]

    @model_validator(mode="after")
    def _check(self) -> LlmNode:
        self._check_common()
        if "text" in self.output_fields:
            raise ValueError(f"node '{self.id}': output field 'text' is reserved for the answer")
        if self.structured_output and not self.output_fields:
            raise ValueError(f"node '{self.id}': structured_output needs output_fields")
        uses_instructions = any(
            ref.node is None and ref.field == FORMAT_INSTRUCTIONS for _, ref in self.refs()
        )
        if uses_instructions and not self.output_fields:
            raise ValueError(
                f"node '{self.id}': {{{FORMAT_INSTRUCTIONS}}} needs output_fields to describe"
            )
        return self


class CodeNode(_NodeBase):
    """A Python function `f(inputs: dict) -> dict`, sync or async, imported lazily."""

    kind: Literal["code"] = Field("code", description="Node kind discriminator.")
    callable: str = Field(
        description="'package.module:function', or 'file.py:function' (in an app folder: "
        "relative to the folder)."
    )
    inputs: dict[str, str] = Field(
        default_factory=dict,
        description="Argument name -> reference ('article' or 'node.field'): the dict the "
        "function is called with.",
    )

    def refs(self) -> list[tuple[str, Ref]]:
        """The references of `inputs`, and the `when` reference."""
        refs: list[tuple[str, Ref]] = []
        for name, text in self.inputs.items():
            try:
                refs.append((f"input '{name}'", Ref.parse(text)))
            except ValueError as error:
                raise ValueError(f"node '{self.id}': input '{name}': {error}") from None
        return [*refs, *super().refs()]

    @model_validator(mode="after")
    def _check(self) -> CodeNode:
        self._check_common()
        self.refs()
        try:
            resolve_callable(self.callable)
        except ValueError as error:
            raise ValueError(f"node '{self.id}': {error}") from None
        return self


class ApiNode(_NodeBase):
    """An HTTP call; a JSON object response gives the node its fields."""

    kind: Literal["api"] = Field("api", description="Node kind discriminator.")
    url: str = Field(description="URL template, http:// or https://.")
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = Field(
        "POST", description="HTTP method."
    )
    timeout_s: float = Field(10.0, gt=0, le=3600, description="Timeout of the HTTP call.")
    headers: dict[str, str] = Field(default_factory=dict, description="Static request headers.")
    body: dict[str, str] = Field(
        default_factory=dict,
        description="Key -> value template; sent as a JSON object (query parameters for GET).",
    )

    def fields(self) -> tuple[str, ...]:
        """Declared response fields plus 'status' (HTTP code) and 'text' (raw body)."""
        return (*self.output_fields, "status", "text")

    def refs(self) -> list[tuple[str, Ref]]:
        """Placeholders of the url and body templates, and the `when` reference."""
        refs = _template_refs(self.id, "url", self.url)
        for key, template in self.body.items():
            refs += _template_refs(self.id, f"body '{key}'", template)
        return [*refs, *super().refs()]

    @model_validator(mode="after")
    def _check(self) -> ApiNode:
        self._check_common()
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"node '{self.id}': url must start with http:// or https://")
        reserved = {"status", "text"} & set(self.output_fields)
        if reserved:
            raise ValueError(f"node '{self.id}': output fields {sorted(reserved)} are reserved")
        self.refs()
        return self


Node = Annotated[LlmNode | CodeNode | ApiNode, Field(discriminator="kind")]


class Loop(BaseModel):
    """A group of nodes run round after round until `until` holds or max_rounds is reached."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(pattern=f"^{_IDENTIFIER}$", description="Loop id, used in messages.")
    body: tuple[str, ...] = Field(
        min_length=1, description="Node ids in round order (later entries feed back)."
    )
    until: str = Field(description="Stop condition on a body node, e.g. \"judge.verdict == 'ok'\".")
    max_rounds: int = Field(2, ge=1, le=100, description="Most rounds the body runs.")

    @model_validator(mode="after")
    def _check(self) -> Loop:
        if len(set(self.body)) != len(self.body):
            raise ValueError(f"loop '{self.id}': body lists a node twice: {list(self.body)}")
        try:
            Condition.parse(self.until)
        except ValueError as error:
            raise ValueError(f"loop '{self.id}': until {error}") from None
        return self


# --------------------------------------------------------------------------------------------
# Stages: the schedule's units (a node outside loops, or a whole loop)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """A unit of the request schedule: one node outside any loop, or one whole loop.

    deps are stage ids. For a loop, inner_deps gives each body node the body nodes it waits
    for within a round (feedback edges excluded).
    """

    id: str
    loop: Loop | None
    deps: tuple[str, ...]
    inner_deps: Mapping[str, tuple[str, ...]]

    @property
    def node_ids(self) -> tuple[str, ...]:
        """The nodes this stage runs."""
        return self.loop.body if self.loop else (self.id,)


# --------------------------------------------------------------------------------------------
# The application
# --------------------------------------------------------------------------------------------


class App(BaseModel):
    """An application: request inputs, a DAG of nodes with loops, and its final outputs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, description="Application name.")
    inputs: tuple[str, ...] = Field(
        min_length=1, description="Names of the request's input variables, e.g. ['article']."
    )
    nodes: tuple[Node, ...] = Field(description="The steps (at least one).")
    loops: tuple[Loop, ...] = Field((), description="Bounded loops over groups of nodes.")
    outputs: dict[str, str] = Field(
        min_length=1, description="Answer field -> 'node.field' (or an input) it comes from."
    )
    format: OutputFormat = Field(
        OutputFormat.JSON, description="Output format LLM nodes answer in (their parse format)."
    )

    # ---- lookups ---------------------------------------------------------------------------

    @cached_property
    def node_map(self) -> dict[str, LlmNode | CodeNode | ApiNode]:
        """Nodes by id."""
        return {node.id: node for node in self.nodes}

    @cached_property
    def loop_of(self) -> dict[str, Loop]:
        """The loop each body node belongs to."""
        return {node_id: loop for loop in self.loops for node_id in loop.body}

    def is_feedback(self, node_id: str, dep_id: str) -> bool:
        """Whether node_id reads dep_id's previous-round output (a loop's back edge)."""
        loop = self.loop_of.get(node_id)
        if loop is None or self.loop_of.get(dep_id) is not loop:
            return False
        return loop.body.index(dep_id) >= loop.body.index(node_id)

    @cached_property
    def stages(self) -> tuple[Stage, ...]:
        """Schedule units in declaration order (a loop where its first body node is declared)."""
        stage_of = {
            node.id: self.loop_of[node.id].id if node.id in self.loop_of else node.id
            for node in self.nodes
        }
        stages: list[Stage] = []
        seen_loops: set[str] = set()
        for node in self.nodes:
            loop = self.loop_of.get(node.id)
            if loop is None:
                deps = _unique(stage_of[d] for d in node.depends_on)
                stages.append(Stage(node.id, None, deps, {}))
                continue
            if loop.id in seen_loops:
                continue
            seen_loops.add(loop.id)
            body = set(loop.body)
            outer = _unique(
                stage_of[d] for b in loop.body for d in self.node_map[b].depends_on if d not in body
            )
            inner = {
                b: _unique(
                    d
                    for d in self.node_map[b].depends_on
                    if d in body and not self.is_feedback(b, d)
                )
                for b in loop.body
            }
            stages.append(Stage(loop.id, loop, outer, inner))
        return tuple(stages)

    @cached_property
    def upstream(self) -> dict[str, frozenset[str]]:
        """For each node, every node that finishes before it starts (feedback excluded)."""
        result: dict[str, frozenset[str]] = {}

        def visit(node_id: str) -> frozenset[str]:
            if node_id not in result:
                direct = [
                    d for d in self.node_map[node_id].depends_on if not self.is_feedback(node_id, d)
                ]
                found: set[str] = set(direct)
                for dep in direct:
                    found |= visit(dep)
                result[node_id] = frozenset(found)
            return result[node_id]

        for node in self.nodes:
            visit(node.id)
        return result

    def readable(self, node_id: str) -> frozenset[str]:
        """Nodes whose fields node_id may read: its upstream and its feedback dependencies."""
        feedback = {d for d in self.node_map[node_id].depends_on if self.is_feedback(node_id, d)}
        return self.upstream[node_id] | feedback

    # ---- validation ------------------------------------------------------------------------

    @model_validator(mode="after")
    def _check_graph(self) -> App:
        """Ids, edges, loops, cycles and every reference; all problems of a stage at once."""
        _raise(self._id_problems())
        _raise(self._edge_and_loop_problems())
        _raise(self._cycle_problems())
        _raise(self._reference_problems())
        return self

    def _id_problems(self) -> list[str]:
        if not self.nodes:
            return ["an app needs at least one node, got nodes: []"]
        problems: list[str] = []
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.id] = counts.get(node.id, 0) + 1
        problems += [f"duplicate node id '{i}' ({n} nodes)" for i, n in counts.items() if n > 1]
        for name in self.inputs:
            if not _ID.fullmatch(name):
                problems.append(f"input '{name}' is not an identifier")
            if name in counts:
                problems.append(f"input '{name}' has the same name as a node")
        if FORMAT_INSTRUCTIONS in self.inputs:
            problems.append(f"input name '{FORMAT_INSTRUCTIONS}' is reserved")
        if len(set(self.inputs)) != len(self.inputs):
            problems.append(f"duplicate inputs {list(self.inputs)}")
        loop_ids = [loop.id for loop in self.loops]
        for loop_id in sorted(set(loop_ids)):
            if loop_ids.count(loop_id) > 1:
                problems.append(f"duplicate loop id '{loop_id}'")
            if loop_id in counts:
                problems.append(f"loop '{loop_id}' has the same id as a node")
        return problems

    def _edge_and_loop_problems(self) -> list[str]:
        problems: list[str] = []
        for node in self.nodes:
            for dep in node.depends_on:
                if dep not in self.node_map:
                    problems.append(f"node '{node.id}': depends_on unknown node '{dep}'")
        owner: dict[str, str] = {}
        for loop in self.loops:
            for node_id in loop.body:
                if node_id not in self.node_map:
                    problems.append(f"loop '{loop.id}': body references unknown node '{node_id}'")
                elif node_id in owner:
                    problems.append(
                        f"loop '{loop.id}': node '{node_id}' is already in loop '{owner[node_id]}'"
                    )
                else:
                    owner[node_id] = loop.id
            until = Condition.parse(loop.until).ref
            if until.node not in loop.body:
                problems.append(
                    f"loop '{loop.id}': until references '{until}', which is not a body node"
                )
                continue
            fields = self.node_map[until.node].fields() if until.node in self.node_map else ()
            if fields and until.field not in fields:
                problems.append(
                    f"loop '{loop.id}': until references '{until}' but node '{until.node}' "
                    f"has no field '{until.field}' (fields: {', '.join(fields)})"
                )
        return problems

    def _cycle_problems(self) -> list[str]:
        graph = {stage.id: stage.deps for stage in self.stages}
        loop_ids = {loop.id for loop in self.loops}
        try:
            graphlib.TopologicalSorter(graph).prepare()
        except graphlib.CycleError as error:
            cycle = [f"loop '{s}'" if s in loop_ids else f"'{s}'" for s in reversed(error.args[1])]
            return [f"cycle outside a declared loop: {' depends on '.join(cycle)}"]
        return []

    def _reference_problems(self) -> list[str]:
        problems: list[str] = []
        for node in self.nodes:
            readable = self.readable(node.id)
            for where, ref in node.refs():
                problem = self._ref_problem(ref, readable, llm=isinstance(node, LlmNode))
                if problem:
                    problems.append(f"node '{node.id}': {where} {problem}")
        for name, text in self.outputs.items():
            try:
                ref = Ref.parse(text)
            except ValueError as error:
                problems.append(f"output '{name}': {error}")
                continue
            problem = self._ref_problem(ref, frozenset(self.node_map), llm=False)
            if problem:
                problems.append(f"output '{name}': {problem}")
        return problems

    def _ref_problem(self, ref: Ref, readable: frozenset[str], llm: bool) -> str | None:
        if ref.node is None:
            if ref.field in self.inputs or (llm and ref.field == FORMAT_INSTRUCTIONS):
                return None
            return (
                f"uses unbound variable '{ref.field}' (inputs: {', '.join(self.inputs)}; "
                "node fields are written node.field)"
            )
        if ref.node not in self.node_map:
            return f"references unknown node '{ref.node}' in '{ref}'"
        fields = self.node_map[ref.node].fields()
        if ref.field not in fields:
            return (
                f"references '{ref}' but node '{ref.node}' has no field '{ref.field}' "
                f"(fields: {', '.join(fields)})"
            )
        if ref.node not in readable:
            return f"references '{ref}' but '{ref.node}' is not upstream (add it to depends_on)"
        return None

    def validate_against(self, model_keys: set[str]) -> None:
        """Check every LLM node names a model key of the deployment; ConfigError otherwise."""
        problems = [
            f"node '{node.id}': unknown model '{node.model}' "
            f"(deployment models: {', '.join(sorted(model_keys)) or 'none'})"
            for node in self.nodes
            if isinstance(node, LlmNode) and node.model not in model_keys
        ]
        if problems:
            raise ConfigError(f"app '{self.name}': " + "; ".join(problems))

    # ---- analysis --------------------------------------------------------------------------

    def critical_path(self, costs: Mapping[str, float] | None = None) -> list[str]:
        """Node ids on the most expensive dependency chain, in execution order.

        A node costs costs[id] (default 1, so by default the longest chain by node count); a
        loop costs max_rounds times its body's most expensive chain, whose nodes it
        contributes once. Ties go to the node declared first.
        """
        chains = self._longest_chains(costs or {})
        return _best(chains[stage.id] for stage in self.stages)[1]

    def deadline_shares(self) -> dict[str, float]:
        """Each node's share of the request's end-to-end budget by which it should finish.

        The budget is split along the critical path: a node's share is the cost of the
        longest chain ending with it over the cost of the critical path (the same chains as
        critical_path), counting an llm or api node as 1, a code node as CODE_NODE_COST = 0.1
        (it runs on the CPU in microseconds) and a loop as max_rounds times its body's longest
        chain (its nodes get the loop's end). So shares lie in (0, 1], the first of three
        sequential calls should be done within a third of the SLA, the last node of the
        critical path gets the whole budget (1.0), and parallel branches share the same
        intermediate deadline.
        """
        chains = self._longest_chains(
            {node.id: CODE_NODE_COST for node in self.nodes if node.kind == "code"}
        )
        total = _best(chains[stage.id] for stage in self.stages)[0]
        return {
            node_id: chains[stage.id][0] / total
            for stage in self.stages
            for node_id in stage.node_ids
        }

    def rest_of_path(self) -> dict[str, float]:
        """Each node's critical path still to run once it has ended, in calls: the critical
        path's cost minus that of the longest chain ending with it (the costs and chains of
        deadline_shares, so ``rest = total * (1 - share)``). The first of three sequential
        calls has 2 left, the last 0; a loop's nodes count from the loop's end, as their
        shares do. SLA-aware admission judges a call by its request's deadline less the rest
        (runtime.engine.client.CallBudget).
        """
        chains = self._longest_chains(
            {node.id: CODE_NODE_COST for node in self.nodes if node.kind == "code"}
        )
        total = _best(chains[stage.id] for stage in self.stages)[0]
        return {
            node_id: max(total - chains[stage.id][0], 0.0)
            for stage in self.stages
            for node_id in stage.node_ids
        }

    def _longest_chains(self, costs: Mapping[str, float]) -> dict[str, tuple[float, list[str]]]:
        """For each stage, the most expensive chain of nodes ending with it: (cost, node ids).

        The one longest-chain computation behind critical_path and deadline_shares. A node
        costs costs[id] (default 1); a loop stage costs max_rounds times its body's most
        expensive chain, whose nodes it contributes once. Ties go to the node declared first.
        """

        def cost(node_id: str) -> float:
            value = float(costs.get(node_id, 1.0))
            if value < 0:
                raise ValueError(f"costs['{node_id}'] must be >= 0, got {value}")
            return value

        chains: dict[str, tuple[float, list[str]]] = {}
        for stage in self._ordered_stages():
            if stage.loop is None:
                own_cost, own_chain = cost(stage.id), [stage.id]
            else:
                inner: dict[str, tuple[float, list[str]]] = {}
                for node_id in _topological(stage.loop.body, stage.inner_deps):
                    before = _best(inner[d] for d in stage.inner_deps[node_id])
                    inner[node_id] = (before[0] + cost(node_id), [*before[1], node_id])
                body_cost, own_chain = _best(inner[n] for n in stage.loop.body)
                own_cost = body_cost * stage.loop.max_rounds
            before = _best(chains[d] for d in stage.deps)
            chains[stage.id] = (before[0] + own_cost, [*before[1], *own_chain])
        return chains

    def _ordered_stages(self) -> list[Stage]:
        by_id = {stage.id: stage for stage in self.stages}
        order = _topological([s.id for s in self.stages], {s.id: s.deps for s in self.stages})
        return [by_id[stage_id] for stage_id in order]

    # ---- files -----------------------------------------------------------------------------

    def to_yaml(self) -> str:
        """The app as YAML that load_app reads back to an equal App."""
        data = self.model_dump(mode="json", exclude_defaults=True)
        data["nodes"] = [
            {"id": node.id, "kind": node.kind, **dumped}
            for node, dumped in zip(self.nodes, data["nodes"], strict=True)
        ]
        data["format"] = self.format.value
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _raise(problems: list[str]) -> None:
    if problems:
        raise ValueError("; ".join(problems))


def _best(candidates: Iterable[tuple[float, list[str]]]) -> tuple[float, list[str]]:
    """The costliest (cost, chain); the first among equals; (0, []) for none."""
    best: tuple[float, list[str]] | None = None
    for candidate in candidates:
        if best is None or candidate[0] > best[0]:
            best = candidate
    return best or (0.0, [])


def _topological(ids: Iterable[str], deps: Mapping[str, Iterable[str]]) -> list[str]:
    """A topological order that keeps declaration order where the edges allow it."""
    remaining = list(ids)
    done: set[str] = set()
    order: list[str] = []
    while remaining:
        for node_id in remaining:
            if all(d in done for d in deps[node_id]):
                order.append(node_id)
                done.add(node_id)
                remaining.remove(node_id)
                break
        else:
            raise ValueError(f"cycle among {remaining}")
    return order


@dataclass(frozen=True)
class RenderedCall:
    """The chat call one llm node of a request would make (see render_calls)."""

    node_id: str
    model: str
    """The model key it calls."""
    messages: tuple[dict[str, str], ...]
    max_tokens: int


def render_calls(app: App, inputs: Mapping[str, Any]) -> list[RenderedCall]:
    """The chat messages every llm node of one request would send, without running anything
    (a dry run: what `fmtune apps check` shows). Request inputs are filled in,
    {format_instructions} is the instruction of the node's format, and a field of another
    node stands as '<node.field>' (its value is only known once that node has run). Nodes
    come in an order their dependencies allow; each loop body's first round only."""
    order = _topological(
        [node.id for node in app.nodes],
        {
            node.id: [d for d in node.depends_on if not app.is_feedback(node.id, d)]
            for node in app.nodes
        },
    )
    calls: list[RenderedCall] = []
    for node_id in order:
        node = app.node_map[node_id]
        if not isinstance(node, LlmNode):
            continue
        fmt = OutputFormat.JSON if node.structured_output else app.format

        def lookup(ref: Ref, node: LlmNode = node, fmt: OutputFormat = fmt) -> Any:
            if ref.node is None and ref.field == FORMAT_INSTRUCTIONS:
                return format_instructions(fmt, node.output_fields)
            if ref.node is None:
                return inputs[ref.field]
            return f"<{ref}>"

        messages = (
            [{"role": "system", "content": render(node.system, lookup)}] if node.system else []
        )
        messages.append({"role": "user", "content": render(node.prompt, lookup)})
        calls.append(RenderedCall(node.id, node.model, tuple(messages), node.sampling.max_tokens))
    return calls


def app_from_dict(data: Any, source: str | None = None) -> App:
    """Validate a mapping (parsed YAML) as an App; ConfigError with one-line reasons."""
    if not isinstance(data, Mapping):
        where = f"{source}: " if source else ""
        raise ConfigError(f"{where}an app must be a mapping, got {type(data).__name__}")
    try:
        return App.model_validate(dict(data))
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, source)) from None


def load_app(path: str | Path) -> App:
    """Read and validate an app YAML file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"cannot read app file '{path}': {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from None
    app = app_from_dict(data, str(path))
    logger.debug("loaded app '%s' from %s (%d nodes)", app.name, path, len(app.nodes))
    return app
