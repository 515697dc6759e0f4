"""Knob search spaces, loaded from ``search_spaces/*.yaml``.

A search space says which knobs of a deployment the tuner may change and over which values.
It is the only place the tuner learns knob names; the study samples it through optuna's
``trial.suggest_*`` so that any optuna sampler (random, TPE, NSGA-II, grid) can drive it.

File shape (every key optional except the knob specs themselves; unknown keys are errors)::

    description: CPU search over the bundled model
    app:                                   # knob name: app.<key>
      architecture: [single, parallel]     # a list is a categorical knob
      structured_output: [true, false]
      nodes.judge.model: [llm, big]        # which model key llm node `judge` calls
    engine:                                # knob name: engine.<key>; every model's engine
      block_size: {choices: [32, 64, 128]}
      max_num_seqs: {type: int, low: 1, high: 32, log: true}
      gpu_memory_utilization: {type: float, low: 0.5, high: 0.95}
      speculative_method: [none, ngram]
      num_speculative_tokens: {type: int, low: 1, high: 5, when: {speculative_method: ngram}}
    models:                                # per model key of the application
      llm:
        model: [Qwen/Qwen2.5-1.5B-Instruct]   # knob name: models.llm.model
        replicas: {type: int, low: 1, high: 4}  # knob name: models.llm.replicas
        engine: {block_size: [16]}          # models.llm.engine.block_size, overrides engine.*
    deployment:                            # knob name: deployment.<dotted key>
      replicas: {type: int, low: 1, high: 2}   # every model's replica count
      router.policy: [round_robin, sla_aware]
    constraints:                           # all must hold; full knob names
      - engine.max_num_batched_tokens >= engine.max_num_seqs

Knob specs: ``categorical`` (``choices``: str/int/float/bool values; ``type`` may be left
out), ``int`` (``low``, ``high``, optional ``step``, ``log``), ``float`` (``low``, ``high``,
optional ``step``, ``log``). Each may carry a ``description`` and a ``when`` condition:
``{other: value}`` or ``{other: [v1, v2]}``; the knob is sampled only when every named knob is
active and takes one of the listed values, otherwise it is absent from the sampled dict. A
``when`` name is looked up in the knob's own section first (``models.<k>.engine`` then
``engine`` for per-model engine knobs), then as a full knob name.

Constraints are one comparison (``<``, ``<=``, ``>``, ``>=``, ``==``, ``!=``) between two
arithmetic sides (``+ - * /`` over full knob names and numbers, or a bare string/bool constant
for ``==``/``!=``). They are parsed with :mod:`ast` into a small whitelisted tree, never
evaluated as Python. A constraint naming an inactive knob is not checked.

Which experiment field each knob name sets, and which names are valid, is defined in one
place, :mod:`tuner.knobs` (e.g. ``engine.X`` sets ``deployment.models.<k>.engine.X`` for every
model key ``k``); this module knows only the names' shape.
"""

from __future__ import annotations

import ast
import graphlib
import logging
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    StringConstraints,
    Tag,
    ValidationError,
    model_validator,
)

from runtime.errors import ConfigError, Location, describe_validation_error

if TYPE_CHECKING:
    import optuna

logger = logging.getLogger(__name__)

Scalar = StrictBool | StrictInt | StrictFloat | StrictStr
"""A value a categorical knob can take; optuna stores these natively."""

Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
"""A single name segment: app keys, engine keys, model keys."""

DottedKey = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
]
"""A dotted path segment list, e.g. ``router.policy``: used by the deployment and app
sections (``nodes.judge.model``)."""

KNOB_KINDS = ("categorical", "int", "float")


class SpaceError(ConfigError):
    """A search space file or definition is invalid; the message names file, knob and field.

    A ConfigError, so the CLI reports it as one line and exits 2 like any bad input."""


def _same(a: Any, b: Any) -> bool:
    """Equality that keeps bools apart from ints (``True == 1`` in Python, not here)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return a == b


def _is_number(value: Any) -> bool:
    """True for int and float values, false for bools."""
    return isinstance(value, int | float) and not isinstance(value, bool)


class _KnobBase(BaseModel):
    """Fields every knob kind shares."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = Field("", description="What the knob changes; shown in reports.")
    when: dict[str, Scalar | list[Scalar]] = Field(
        default_factory=dict,
        description=(
            "Condition for sampling this knob: other knob name -> value or list of values. "
            "All entries must hold; otherwise the knob is left out of the sampled dict."
        ),
    )

    def allows(self, value: Any) -> bool:
        """Whether ``value`` is a value this knob can take (used to check ``when`` values)."""
        raise NotImplementedError

    def conditions(self) -> dict[str, list[Any]]:
        """The ``when`` condition with every right-hand side as a list."""
        return {k: (v if isinstance(v, list) else [v]) for k, v in self.when.items()}


class CategoricalKnob(_KnobBase):
    """A knob over a finite list of values (``trial.suggest_categorical``)."""

    type: Literal["categorical"] = Field(
        "categorical", description="Knob kind; may be omitted when choices are given."
    )
    choices: list[Scalar] = Field(
        min_length=1, description="The values to choose from, in a stable order."
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        """Accept a bare YAML list as ``{choices: [...]}``."""
        if isinstance(data, list):
            return {"choices": data}
        return data

    @model_validator(mode="after")
    def _check(self) -> CategoricalKnob:
        """Choices must be distinct (bools and ints count as different values)."""
        seen: list[Any] = []
        for choice in self.choices:
            if any(_same(choice, s) for s in seen):
                raise ValueError(f"choices must be distinct, got {choice!r} twice")
            seen.append(choice)
        return self

    def allows(self, value: Any) -> bool:
        """Whether ``value`` is one of the choices."""
        return any(_same(value, c) for c in self.choices)

    def suggest(self, name: str, trial: optuna.trial.BaseTrial) -> Any:
        """Sample this knob under ``name`` from ``trial``."""
        return trial.suggest_categorical(name, self.choices)


class IntKnob(_KnobBase):
    """An integer range (``trial.suggest_int``)."""

    type: Literal["int"] = Field(description="Knob kind.")
    low: StrictInt = Field(description="Smallest value, inclusive.")
    high: StrictInt = Field(description="Largest value, inclusive.")
    step: PositiveInt | None = Field(
        None, description="Spacing of values from low; needed for grid search. Default 1."
    )
    log: bool = Field(False, description="Sample on a log scale (needs low >= 1, step 1).")

    @model_validator(mode="after")
    def _check(self) -> IntKnob:
        """low <= high; log needs low >= 1 and no step > 1; high - low divisible by step."""
        if self.low > self.high:
            raise ValueError(f"low must be <= high, got low={self.low} high={self.high}")
        if self.log and self.low < 1:
            raise ValueError(f"log needs low >= 1, got low={self.low}")
        if self.log and self.step not in (None, 1):
            raise ValueError(f"log and step are exclusive, got step={self.step}")
        if self.step is not None and (self.high - self.low) % self.step:
            raise ValueError(
                f"high - low must be a multiple of step, got low={self.low} high={self.high} "
                f"step={self.step}"
            )
        return self

    def allows(self, value: Any) -> bool:
        """Whether ``value`` is an int inside the range on the step grid."""
        if not isinstance(value, int) or isinstance(value, bool):
            return False
        return self.low <= value <= self.high and (value - self.low) % (self.step or 1) == 0

    def suggest(self, name: str, trial: optuna.trial.BaseTrial) -> int:
        """Sample this knob under ``name`` from ``trial``."""
        return trial.suggest_int(name, self.low, self.high, step=self.step or 1, log=self.log)


class FloatKnob(_KnobBase):
    """A real interval (``trial.suggest_float``)."""

    type: Literal["float"] = Field(description="Knob kind.")
    low: StrictFloat | StrictInt = Field(description="Smallest value, inclusive.")
    high: StrictFloat | StrictInt = Field(description="Largest value, inclusive.")
    step: PositiveFloat | None = Field(None, description="Discretization step, if any.")
    log: bool = Field(False, description="Sample on a log scale (needs low > 0, no step).")

    @model_validator(mode="after")
    def _check(self) -> FloatKnob:
        """low <= high; log needs low > 0 and no step."""
        if self.low > self.high:
            raise ValueError(f"low must be <= high, got low={self.low} high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"log needs low > 0, got low={self.low}")
        if self.log and self.step is not None:
            raise ValueError(f"log and step are exclusive, got step={self.step}")
        return self

    def allows(self, value: Any) -> bool:
        """Whether ``value`` is a number inside the interval."""
        return _is_number(value) and self.low <= value <= self.high

    def suggest(self, name: str, trial: optuna.trial.BaseTrial) -> float:
        """Sample this knob under ``name`` from ``trial``."""
        return trial.suggest_float(
            name, float(self.low), float(self.high), step=self.step, log=self.log
        )


def _knob_tag(data: Any) -> str | None:
    """Pick the knob kind: a list or a mapping with choices and no type is categorical."""
    if isinstance(data, list):
        return "categorical"
    if isinstance(data, BaseModel):
        return getattr(data, "type", None)
    if isinstance(data, dict):
        if "type" not in data and "choices" in data:
            return "categorical"
        kind = data.get("type")
        return kind if kind in KNOB_KINDS else None
    return None


Knob = Annotated[
    Annotated[CategoricalKnob, Tag("categorical")]
    | Annotated[IntKnob, Tag("int")]
    | Annotated[FloatKnob, Tag("float")],
    Discriminator(
        _knob_tag,
        custom_error_type="knob_kind",
        custom_error_message=(
            "a knob is a list of choices or a mapping with 'choices' or with "
            "'type' one of categorical, int, float"
        ),
    ),
]
"""Any knob spec, chosen by its ``type`` (or by having ``choices``)."""


class ModelSpace(BaseModel):
    """Knobs of one model key of the application (an LLM step's model slot)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Knob | None = Field(None, description="Which model serves this key.")
    replicas: Knob | None = Field(None, description="Replica count for this model.")
    engine: dict[Identifier, Knob] = Field(
        default_factory=dict, description="Engine knobs for this model; override engine.*."
    )


class SpaceFile(BaseModel):
    """The YAML shape of a search space file, before names are flattened."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = Field("", description="What this space is for.")
    app: dict[DottedKey, Knob] = Field(
        default_factory=dict,
        description="Application knobs (architecture, format, ..., nodes.<id>.model).",
    )
    engine: dict[Identifier, Knob] = Field(
        default_factory=dict, description="Engine knobs applied to every model."
    )
    models: dict[Identifier, ModelSpace] = Field(
        default_factory=dict, description="Per model key knobs: model, replicas, engine."
    )
    deployment: dict[DottedKey, Knob] = Field(
        default_factory=dict,
        description="Deployment knobs: 'replicas' (every model) or paths like router.policy.",
    )
    constraints: list[str] = Field(
        default_factory=list, description="Cross-knob comparisons that must all hold."
    )

    def to_space(self) -> SearchSpace:
        """Flatten sections into full knob names and resolve ``when`` names against them."""
        scoped: list[tuple[str, Any, tuple[str, ...]]] = []
        for key, knob in self.app.items():
            scoped.append((f"app.{key}", knob, ("app",)))
        for key, knob in self.engine.items():
            scoped.append((f"engine.{key}", knob, ("engine",)))
        for mkey, mspace in self.models.items():
            prefix = f"models.{mkey}"
            for field in ("model", "replicas"):
                knob = getattr(mspace, field)
                if knob is not None:
                    scoped.append((f"{prefix}.{field}", knob, (prefix,)))
            for key, knob in mspace.engine.items():
                scoped.append((f"{prefix}.engine.{key}", knob, (f"{prefix}.engine", "engine")))
        for key, knob in self.deployment.items():
            scoped.append((f"deployment.{key}", knob, ("deployment",)))

        names = {name for name, _, _ in scoped}
        knobs: dict[str, Any] = {}
        for name, knob, scopes in scoped:
            when: dict[str, Any] = {}
            for ref, values in knob.when.items():
                candidates = [f"{s}.{ref}" for s in scopes] + [ref]
                full = next((c for c in candidates if c in names), None)
                if full is None:
                    raise ValueError(f"knob {name!r}: when refers to unknown knob {ref!r}")
                when[full] = values
            knobs[name] = knob.model_copy(update={"when": when})
        return SearchSpace(knobs=knobs, constraints=self.constraints, description=self.description)


# --------------------------------------------------------------------------- constraints

_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], bool]] = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
}
_ARITH: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


def _dotted(node: ast.expr) -> str | None:
    """``a.b.c`` as written, or None when the node is not a plain dotted name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


@dataclass(frozen=True)
class _Term:
    """One node of a parsed constraint side: a knob name, a constant, or arithmetic."""

    kind: Literal["name", "const", "arith", "neg"]
    value: Any = None
    args: tuple[_Term, ...] = ()

    def names(self) -> set[str]:
        """Knob names this term reads."""
        own = {self.value} if self.kind == "name" else set()
        return own.union(*(a.names() for a in self.args))

    def evaluate(self, params: Mapping[str, Any]) -> Any:
        """Value of this term given sampled params (all names must be present)."""
        if self.kind == "name":
            return params[self.value]
        if self.kind == "const":
            return self.value
        if self.kind == "neg":
            return -self.args[0].evaluate(params)
        return self.value(self.args[0].evaluate(params), self.args[1].evaluate(params))


def _to_term(node: ast.expr, text: str, *, top: bool) -> _Term:
    """Convert a whitelisted ast node into a :class:`_Term`; anything else is an error."""
    name = _dotted(node)
    if name is not None:
        return _Term("name", name)
    if isinstance(node, ast.Constant):
        if _is_number(node.value) or (top and isinstance(node.value, str | bool)):
            return _Term("const", node.value)
        raise ValueError(f"constraint {text!r}: unsupported constant {node.value!r}")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        inner = _to_term(node.operand, text, top=False)
        return inner if isinstance(node.op, ast.UAdd) else _Term("neg", args=(inner,))
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
        return _Term(
            "arith",
            _ARITH[type(node.op)],
            (_to_term(node.left, text, top=False), _to_term(node.right, text, top=False)),
        )
    raise ValueError(
        f"constraint {text!r}: unsupported syntax {ast.unparse(node)!r}; "
        "use knob names, numbers and + - * /"
    )


@dataclass(frozen=True)
class Constraint:
    """A parsed cross-knob comparison such as ``engine.a >= engine.b * 2``."""

    text: str
    left: _Term
    op: Callable[[Any, Any], bool]
    op_text: str
    right: _Term

    @property
    def names(self) -> set[str]:
        """Knob names the constraint reads."""
        return self.left.names() | self.right.names()

    def sides(self, params: Mapping[str, Any]) -> tuple[Any, Any] | None:
        """Both evaluated sides, or None when a named knob is absent (inactive)."""
        if not self.names <= params.keys():
            return None
        try:
            return self.left.evaluate(params), self.right.evaluate(params)
        except (ArithmeticError, TypeError) as exc:
            raise ValueError(f"constraint {self.text!r}: cannot evaluate ({exc})") from None

    def holds(self, params: Mapping[str, Any]) -> bool:
        """Whether the comparison holds; True when a named knob is inactive."""
        sides = self.sides(params)
        return sides is None or bool(self.op(*sides))

    def violation(self, params: Mapping[str, Any]) -> float:
        """optuna constraint value: 0 when it holds, else how far off (at least 1)."""
        sides = self.sides(params)
        if sides is None or self.op(*sides):
            return 0.0
        lhs, rhs = sides
        if _is_number(lhs) and _is_number(rhs) and lhs != rhs:
            return float(abs(lhs - rhs))
        return 1.0


def parse_constraint(text: str, knob_names: Iterable[str]) -> Constraint:
    """Parse ``text`` safely (ast whitelist, no eval); unknown knob names are errors."""
    known = set(knob_names)
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"constraint {text!r}: malformed expression ({exc.msg})") from None
    body = tree.body
    if not isinstance(body, ast.Compare) or len(body.ops) != 1:
        raise ValueError(f"constraint {text!r}: must be one comparison 'A op B'")
    op_type = type(body.ops[0])
    if op_type not in _COMPARE:
        raise ValueError(f"constraint {text!r}: operator must be one of < <= > >= == !=")
    left = _to_term(body.left, text, top=True)
    right = _to_term(body.comparators[0], text, top=True)
    names = left.names() | right.names()
    if not names:
        raise ValueError(f"constraint {text!r}: names no knob")
    unknown = sorted(names - known)
    if unknown:
        raise ValueError(f"constraint {text!r}: unknown knob {unknown[0]!r}")
    op_text = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "=="}.get(
        op_type, "!="
    )
    return Constraint(text=text, left=left, op=_COMPARE[op_type], op_text=op_text, right=right)


# --------------------------------------------------------------------------- the space


class SearchSpace(BaseModel):
    """A flat, validated set of knobs with conditions and constraints, ready for sampling."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    knobs: dict[str, Knob] = Field(
        description="Full knob name -> spec; ``when`` keys are full knob names."
    )
    constraints: list[str] = Field(
        default_factory=list, description="Cross-knob comparisons that must all hold."
    )
    description: str = Field("", description="What this space is for.")

    _order: list[str] = PrivateAttr(default_factory=list)
    _parsed: list[Constraint] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> SearchSpace:
        """Conditions name existing knobs and allowed values, are acyclic; constraints parse."""
        graph: dict[str, list[str]] = {}
        for name, knob in self.knobs.items():
            graph[name] = []
            for ref, values in knob.conditions().items():
                if ref not in self.knobs:
                    raise ValueError(f"knob {name!r}: when refers to unknown knob {ref!r}")
                if ref == name:
                    raise ValueError(f"knob {name!r}: when refers to the knob itself")
                for value in values:
                    if not self.knobs[ref].allows(value):
                        raise ValueError(
                            f"knob {name!r}: when {ref!r} value {value!r} is not a value "
                            f"{ref!r} can take"
                        )
                graph[name].append(ref)
        try:
            order = list(graphlib.TopologicalSorter(graph).static_order())
        except graphlib.CycleError as exc:
            cycle = " -> ".join(exc.args[1])
            raise ValueError(f"knob conditions form a cycle: {cycle}") from None
        parsed = [parse_constraint(text, self.knobs) for text in self.constraints]
        self._order = order
        self._parsed = parsed
        return self

    def knob_names(self) -> list[str]:
        """All knob names in declaration order."""
        return list(self.knobs)

    def is_active(self, name: str, params: Mapping[str, Any]) -> bool:
        """Whether knob ``name``'s condition holds given the already-sampled ``params``."""
        for ref, values in self.knobs[name].conditions().items():
            if ref not in params or not any(_same(params[ref], v) for v in values):
                return False
        return True

    def suggest(self, trial: optuna.trial.BaseTrial) -> dict[str, Any]:
        """Sample every active knob from ``trial`` in dependency order; inactive ones are absent.

        The result is in declaration order. Constraints are not enforced here: report them to
        optuna through :meth:`constraint_values` so samplers learn to avoid them.
        """
        sampled: dict[str, Any] = {}
        for name in self._order:
            if self.is_active(name, sampled):
                sampled[name] = self.knobs[name].suggest(name, trial)
        return {name: sampled[name] for name in self.knobs if name in sampled}

    def violations(self, params: Mapping[str, Any]) -> list[str]:
        """Human-readable list of the constraints ``params`` break (empty when feasible)."""
        broken = []
        for constraint in self._parsed:
            if not constraint.holds(params):
                lhs, rhs = constraint.sides(params) or (None, None)
                broken.append(f"{constraint.text} (got {lhs!r} {constraint.op_text} {rhs!r})")
        return broken

    def constraint_values(self, params: Mapping[str, Any]) -> dict[str, float]:
        """Constraint text -> optuna constraint value (<= 0 feasible), one entry per constraint.

        Feed it to ``trial.set_constraint(name, value)`` or, as ``list(...values())``, to a
        sampler's ``constraints_func``.
        """
        return {c.text: c.violation(params) for c in self._parsed}

    def grid(self) -> dict[str, list[Any]]:
        """Knob name -> every value, for ``optuna.samplers.GridSampler``.

        Needs every knob categorical, or int with an explicit ``step``. Conditional knobs are
        included; the grid sampler simply does not use them when they are inactive.
        """
        grid: dict[str, list[Any]] = {}
        bad = []
        for name, knob in self.knobs.items():
            if isinstance(knob, CategoricalKnob):
                grid[name] = list(knob.choices)
            elif isinstance(knob, IntKnob) and knob.step is not None:
                grid[name] = list(range(knob.low, knob.high + 1, knob.step))
            else:
                bad.append(f"{name!r} ({knob.type}{' without step' if knob.type == 'int' else ''})")
        if bad:
            raise SpaceError(
                "grid() needs every knob categorical or int with a step; not so: " + ", ".join(bad)
            )
        return grid


# --------------------------------------------------------------------------- loading


def _knob_label(name: str, rest: Location) -> tuple[str, Location]:
    """("knob 'NAME'", path inside the knob spec), without the union tag pydantic adds."""
    if rest and rest[0] in KNOB_KINDS:
        rest = rest[1:]
    return f"knob {name!r}", rest


def _locate_in_file(loc: Location) -> tuple[str, Location]:
    """A pydantic location in :class:`SpaceFile` as the knob it belongs to and the rest."""
    parts = [str(part) for part in loc]
    if len(parts) >= 2 and parts[0] in ("app", "engine", "deployment"):
        return _knob_label(f"{parts[0]}.{parts[1]}", loc[2:])
    if len(parts) >= 4 and parts[0] == "models" and parts[2] == "engine":
        return _knob_label(f"models.{parts[1]}.engine.{parts[3]}", loc[4:])
    if len(parts) >= 3 and parts[0] == "models" and parts[2] in ("model", "replicas"):
        return _knob_label(f"models.{parts[1]}.{parts[2]}", loc[3:])
    return "", loc


def _locate_in_space(loc: Location) -> tuple[str, Location]:
    """A pydantic location in :class:`SearchSpace` (``knobs.<full name>...``) likewise."""
    if len(loc) >= 2 and loc[0] == "knobs":
        return _knob_label(str(loc[1]), loc[2:])
    return "", loc


def load_space(path: str | Path) -> SearchSpace:
    """Read, validate and flatten a search space file; errors name the file and knob."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpaceError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpaceError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    try:
        spec = SpaceFile.model_validate(raw)
    except ValidationError as exc:
        raise SpaceError(
            describe_validation_error(exc, str(path), locate=_locate_in_file)
        ) from None
    try:
        space = spec.to_space()
    except ValidationError as exc:
        raise SpaceError(
            describe_validation_error(exc, str(path), locate=_locate_in_space)
        ) from None
    except ValueError as exc:
        raise SpaceError(f"{path}: {exc}") from None
    logger.debug("loaded search space %s with %d knobs", path, len(space.knobs))
    return space
