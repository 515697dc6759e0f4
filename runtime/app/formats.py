"""Output formats between LLM steps, their prompt instructions, parsers and CPU-side repair.

The format an LLM step answers in is a knob: small models follow some formats better than
others, and a cheap CPU-side correction step can rescue near-misses (code fences, prose around
the answer, truncated output, wrong key case) instead of paying for another LLM call. Every
parse reports whether it was clean, repaired (and by which repairs) or unparseable, so the
tuner can weigh formats by how often they need rescuing.

Parsing is strict first. When the strict parse does not yield every field, repair steps are
applied one after another, retrying the parse after each, and the attempt that yields the most
fields wins; the repairs listed are the ones applied up to that attempt.
"""

from __future__ import annotations

import ast
import contextlib
import html
import json
import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)

ParseStatus = Literal["clean", "repaired", "unparseable"]
PARSE_STATUSES: tuple[ParseStatus, ...] = ("clean", "repaired", "unparseable")

Values = dict[str, str | None]


class OutputFormat(StrEnum):
    """How an LLM step writes its structured answer."""

    JSON = "json"
    YAML = "yaml"
    XML = "xml"
    TEXT = "text"
    TAG = "tag"


class ParsedOutput(BaseModel):
    """What a parser recovered from one LLM answer, and how hard it had to work for it."""

    model_config = ConfigDict(frozen=True)

    values: dict[str, str | None] = Field(
        description="One entry per requested field; None where the answer did not give it."
    )
    status: ParseStatus = Field(
        description="clean: the strict parser read it; repaired: it read only after repairs; "
        "unparseable: no field could be recovered."
    )
    repairs: list[str] = Field(
        default_factory=list,
        description="Names of the repairs applied before the parse that was kept, in order.",
    )


# --------------------------------------------------------------------------------------------
# Instructions and schema
# --------------------------------------------------------------------------------------------


def _check_fields(fields: Sequence[str]) -> None:
    if not fields:
        raise ValueError("fields must not be empty, got []")
    for name in fields:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"field names must be identifiers, got {name!r}")
    if len(set(fields)) != len(fields):
        raise ValueError(f"field names must be unique, got {list(fields)}")


def format_instructions(fmt: OutputFormat | str, fields: Sequence[str]) -> str:
    """The prompt fragment that tells a small LLM exactly how to write its answer.

    Each instruction shows a complete template with the exact field names, because small
    models copy a template far more reliably than they follow a description.
    """
    fmt = OutputFormat(fmt)
    _check_fields(fields)
    names = ", ".join(fields)
    if fmt is OutputFormat.JSON:
        body = ", ".join(f'"{name}": "..."' for name in fields)
        return (
            f"Answer with a single JSON object and nothing else. It has exactly these keys: "
            f"{names}. Every value is a string. Write it like this:\n{{{body}}}"
        )
    if fmt is OutputFormat.YAML:
        body = "\n".join(f'{name}: "..."' for name in fields)
        return (
            f"Answer in YAML and nothing else: one line per key, keys {names}, each value a "
            f"double-quoted string. Write it like this:\n{body}"
        )
    if fmt is OutputFormat.XML:
        body = "".join(f"<{name}>...</{name}>" for name in fields)
        return (
            f"Answer with a single XML element <answer> and nothing else. It holds one child "
            f"element per field: {names}. Write it like this:\n<answer>{body}</answer>"
        )
    if fmt is OutputFormat.TEXT:
        body = "\n".join(f"{name}: ..." for name in fields)
        return (
            f"Answer with exactly {len(fields)} lines and nothing else, one per field, each "
            f"written as the field name, a colon and the value, without quotes:\n{body}"
        )
    body = "\n".join(f'<{name.upper()}="...">' for name in fields)
    return (
        f"Answer with exactly {len(fields)} lines and nothing else, one tag per field, the "
        f"field name in capitals and the value in double quotes:\n{body}"
    )


def json_schema(fields: Sequence[str]) -> dict[str, Any]:
    """A JSON schema for guided decoding: an object whose fields are all required strings."""
    _check_fields(fields)
    return {
        "type": "object",
        "properties": {name: {"type": "string"} for name in fields},
        "required": list(fields),
        "additionalProperties": False,
    }


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _key(name: str) -> str:
    """Key normal form for case-insensitive matching: casefolded, spaces/hyphens as '_'."""
    return re.sub(r"[\s\-]+", "_", name.strip()).casefold()


def _count(values: Mapping[str, str | None]) -> int:
    return sum(value is not None for value in values.values())


_PLACEHOLDER = re.compile(r"^[\s.\u2026]*$")


def _clean_value(value: str) -> str | None:
    """A field value, or None when empty or only the template's placeholder ('...')."""
    value = value.strip()
    if _PLACEHOLDER.match(value):
        return None
    return value


_QUOTED = re.compile(r'"([^"\n]{2,})"')
_AFTER_IS = re.compile(r"\b(?:is|are|:)\s+(.+?)\s*(?:[.;]\s*$|[.;]\s+[A-Z]|$)", re.MULTILINE)


def _prose_answer(text: str, fields: Sequence[str]) -> tuple[Values, list[str]] | None:
    """A one-field answer written as a sentence ('The email address is "a@b.org"' or
    'The address is 1 Main St, Leeds.'): the first quoted value, else what follows 'is'."""
    if len(fields) != 1 or text.lstrip().startswith(("{", "<", "[")):
        return None  # structured output that simply left the field out is not prose
    keys = {_key(name) for name in fields}
    first_line = next((line for line in text.strip().splitlines() if line.strip()), "")
    for match in _QUOTED.finditer(text):
        value = _clean_value(match.group(1))
        if value is not None and _key(value) not in keys:
            return {fields[0]: value}, ["prose_answer"]
    match = _AFTER_IS.search(first_line)
    if match:
        value = _clean_value(match.group(1).strip().strip('"'))
        if value is not None:
            return {fields[0]: value}, ["prose_answer"]
    return None


_FENCE = re.compile(r"```[\w+-]*[ \t]*\n?(.*?)```", re.DOTALL)
_OPEN_FENCE = re.compile(r"^\s*```[\w+-]*[ \t]*\n?")


def _strip_fences(text: str) -> tuple[str, list[str]]:
    """Keep only the inside of the first markdown code fence (closed or not)."""
    match = _FENCE.search(text)
    if match:
        return match.group(1), ["strip_fences"]
    if _OPEN_FENCE.match(text):
        return _OPEN_FENCE.sub("", text, count=1), ["strip_fences"]
    return text, []


def _coerce(value: Any) -> tuple[str | None, list[str]]:
    """A JSON/YAML value as a string: strings as they are, scalars and containers flattened."""
    if value is None:
        return None, []
    if isinstance(value, str):
        return _clean_value(value), []
    if isinstance(value, bool | int | float):
        return str(value), ["coerce_value"]
    if isinstance(value, Mapping):
        parts = [_coerce(item)[0] for item in value.values()]
    elif isinstance(value, list | tuple):
        parts = [_coerce(item)[0] for item in value]
    else:
        return str(value), ["coerce_value"]
    joined = ", ".join(part for part in parts if part)
    return (joined or None), ["flatten_value"]


def _pick_fields(mapping: Mapping[Any, Any], fields: Sequence[str]) -> tuple[Values, list[str]]:
    """Read fields from a decoded mapping leniently: any key case, non-string values coerced."""
    repairs: list[str] = []
    by_key: dict[str, Any] = {}
    for key, value in mapping.items():
        by_key.setdefault(_key(str(key)), value)
    values: Values = {}
    for name in fields:
        if name in mapping:
            raw = mapping[name]
        elif _key(name) in by_key:
            raw = by_key[_key(name)]
            repairs.append("casefold_keys")
        else:
            values[name] = None
            continue
        values[name], extra = _coerce(raw)
        repairs.extend(extra)
    return values, _dedupe(repairs)


def _as_mapping(decoded: Any, fields: Sequence[str]) -> tuple[Mapping[Any, Any], list[str]] | None:
    """Find the mapping holding the fields: the value itself, a list of small maps, or a
    single wrapper key around it (e.g. {"answer": {...}})."""
    if isinstance(decoded, list) and decoded and all(isinstance(x, Mapping) for x in decoded):
        merged: dict[Any, Any] = {}
        for item in decoded:
            for key, value in item.items():
                merged.setdefault(key, value)
        return merged, ["merge_list"]
    if not isinstance(decoded, Mapping):
        return None
    wanted = {_key(name) for name in fields}
    if not wanted & {_key(str(key)) for key in decoded}:
        inner = [value for value in decoded.values() if isinstance(value, Mapping)]
        if len(decoded) == 1 and len(inner) == 1:
            return inner[0], ["unwrap_nested"]
    return decoded, []


def _dedupe(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


_Step = Callable[[str], tuple[str, list[str]]]
_Lenient = Callable[[str, Sequence[str]], tuple[Values, list[str]] | None]
_Strict = Callable[[str, Sequence[str]], Values | None]


@dataclass(frozen=True)
class _Parser:
    """The pieces of one format's parser: strict read, lenient read, and the text repair
    steps tried in order after code fences are stripped (which every format gets first)."""

    strict: _Strict
    lenient: _Lenient
    steps: tuple[_Step, ...]


# --------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------


def _strict_json(text: str, fields: Sequence[str]) -> Values | None:
    try:
        decoded = json.loads(text.strip())
    except ValueError:
        return None
    if not isinstance(decoded, dict):
        return None
    return {
        name: _clean_value(value) if isinstance(value, str) else None
        for name, value in ((name, decoded.get(name)) for name in fields)
    }


def _lenient_json(text: str, fields: Sequence[str]) -> tuple[Values, list[str]] | None:
    try:
        decoded = json.loads(text.strip())
    except ValueError:
        return None
    found = _as_mapping(decoded, fields)
    if found is None:
        return None
    mapping, unwrap = found
    values, picked = _pick_fields(mapping, fields)
    return values, unwrap + picked


def _python_literal(text: str) -> tuple[str, list[str]]:
    """Rewrite a Python dict literal (single quotes, None, True) as JSON."""
    try:
        decoded = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text, []
    if not isinstance(decoded, dict | list):
        return text, []
    return json.dumps(decoded, default=str), ["python_literal"]


def _outermost(text: str, opener: str, closer: str) -> tuple[str, list[str]]:
    """The outermost balanced opener..closer span (string-aware); unclosed: to the end."""
    start = text.find(opener)
    if start < 0:
        return text, []
    depth, in_string, escaped, end = 0, False, False, len(text)
    for index in range(start, len(text)):
        char = text[index]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char == opener:
            depth += 1
        elif char == closer:
            depth -= 1
            if depth == 0:
                end = index + 1
                break
    span = text[start:end]
    return span, (["drop_prose"] if span.strip() != text.strip() else [])


def _drop_json_prose(text: str) -> tuple[str, list[str]]:
    return _outermost(text, "{", "}")


def _fix_json(text: str) -> tuple[str, list[str]]:
    """Remove trailing commas and close an unfinished string and open brackets/braces."""
    out: list[str] = []
    closers: list[str] = []
    repairs: list[str] = []
    in_string = escaped = False
    string_start = 0

    def drop_trailing_comma() -> None:
        index = len(out) - 1
        while index >= 0 and out[index].isspace():
            index -= 1
        if index >= 0 and out[index] == ",":
            del out[index]
            repairs.append("remove_trailing_commas")

    for char in text:
        if in_string:
            out.append(char)
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
            continue
        if char == '"':
            in_string, string_start = True, len(out)
            out.append(char)
        elif char in "{[":
            closers.append("}" if char == "{" else "]")
            out.append(char)
        elif char in "}]":
            drop_trailing_comma()
            if closers and closers[-1] == char:
                closers.pop()
            out.append(char)
        else:
            out.append(char)
    if in_string:
        # A truncated string often swallowed the closers that followed it: give them back.
        while len(out) > string_start + 1 and (out[-1] in "}]" or out[-1].isspace()):
            out.pop()
        if escaped and out[-1] == "\\":
            out.pop()
        out.append('"')
        repairs.append("close_quotes")
    if closers:
        while out and out[-1].isspace():
            out.pop()
        if out and out[-1] == ":":
            out.append(" null")
        drop_trailing_comma()
        out.extend(reversed(closers))
        repairs.append("close_brackets")
    return "".join(out), _dedupe(repairs)


_JSON_PAIR = re.compile(
    r"""["']?(?P<key>[A-Za-z_][\w \-]*?)["']?\s*:\s*"""
    r"""(?:"(?P<dq>(?:[^"\\\n]|\\.)*)"?|'(?P<sq>[^'\n]*)'?|(?P<bare>[^,}\n]+))"""
)


def _salvage_json(text: str, fields: Sequence[str]) -> tuple[Values, list[str]] | None:
    """Last resort: pick "key": "value" pairs out of text that no longer parses as JSON."""
    wanted = {_key(name): name for name in fields}
    values: Values = dict.fromkeys(fields)
    for match in _JSON_PAIR.finditer(text):
        name = wanted.get(_key(match.group("key")))
        if name is None or values[name] is not None:
            continue
        raw = match.group("dq")
        if raw is not None:
            with contextlib.suppress(ValueError):
                raw = json.loads(f'"{raw}"')  # undo escapes such as \" and \u00e9
        else:
            raw = match.group("sq") if match.group("sq") is not None else match.group("bare")
        if raw is not None and raw.strip() not in ("null", "None"):
            values[name] = _clean_value(raw)
    return (values, ["salvage_fields"]) if _count(values) else None


# --------------------------------------------------------------------------------------------
# Line-oriented "key: value" (text, and YAML's fallback)
# --------------------------------------------------------------------------------------------

_BULLET = re.compile(r"^\s*(?:[-*•]\s+|\d+[.)]\s+)")
_LINE = re.compile(r"^\s*[\"']?(?P<key>[A-Za-z_][\w \-]{0,40}?)[\"']?\s*[:=]\s*(?P<value>.*)$")
_QUOTES = "\"'`“”‘’"


def _unquote(value: str) -> tuple[str, list[str]]:
    """Strip one layer of matching quotes; stray (unbalanced) quotes count as a repair."""
    value = value.strip()
    if not value:
        return value, []
    if not value.strip(_QUOTES):
        return "", ["strip_quotes"]
    before_comma = value[:-1].rstrip()
    if value.endswith(",") and before_comma and before_comma[-1] in _QUOTES:
        value = before_comma  # a JSON habit: name: "Ann",
    if len(value) >= 2 and value[0] == value[-1] and value[0] in _QUOTES:
        return value[1:-1].strip(), []
    if (value[0] in _QUOTES) != (value[-1] in _QUOTES) or value[0] in "“‘":
        return value.strip(_QUOTES).strip(), ["strip_quotes"]
    return value, []


def _parse_lines(
    text: str, fields: Sequence[str], *, unquote_always: bool
) -> tuple[Values, list[str]] | None:
    """Read `key: value` lines: keys in any case, markup and bullets ignored, prose skipped.

    unquote_always: strip balanced quotes silently (YAML semantics); for plain text, where
    the instruction asks for no quotes, any quote removed counts as the strip_quotes repair.
    """
    wanted = {_key(name): name for name in fields}
    values: Values = dict.fromkeys(fields)
    repairs: list[str] = []
    for raw_line in text.splitlines():
        if not raw_line.strip():
            continue
        line = raw_line.replace("**", "")
        bare = _BULLET.sub("", line, count=1)
        if bare != raw_line:
            repairs.append("strip_markup")
        match = _LINE.match(bare)
        name = wanted.get(_key(match.group("key"))) if match else None
        if match is None or name is None:
            repairs.append("drop_prose")
            continue
        if match.group("key").strip() != name:
            repairs.append("casefold_keys")
        if values[name] is not None:
            continue
        value, quote_repairs = _unquote(match.group("value"))
        if not quote_repairs and not unquote_always and value != match.group("value").strip():
            quote_repairs = ["strip_quotes"]
        repairs.extend(quote_repairs)
        values[name] = _clean_value(value)
    if not _count(values):
        return None
    return values, _dedupe(repairs)


# --------------------------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------------------------


def _load_yaml(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None


def _strict_yaml(text: str, fields: Sequence[str]) -> Values | None:
    decoded = _load_yaml(text)
    if not isinstance(decoded, dict):
        return None
    return {
        name: _clean_value(value) if isinstance(value, str) else None
        for name, value in ((name, decoded.get(name)) for name in fields)
    }


def _lenient_yaml(text: str, fields: Sequence[str]) -> tuple[Values, list[str]] | None:
    found = _as_mapping(_load_yaml(text), fields)
    if found is not None:
        mapping, unwrap = found
        values, picked = _pick_fields(mapping, fields)
        if _count(values):
            return values, unwrap + picked
    lines = _parse_lines(text, fields, unquote_always=True)
    if lines is None:
        return None
    values, repairs = lines
    return values, ["key_value_lines", *repairs]


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def _strict_text(text: str, fields: Sequence[str]) -> Values | None:
    values: Values = dict.fromkeys(fields)
    for line in text.splitlines():
        if not line.strip():
            continue
        match = re.fullmatch(r"(\w+):(.*)", line.strip())
        if match is None or match.group(1) not in values:
            return None
        value = match.group(2).strip()
        if value and (value[0] in _QUOTES or value[-1] in _QUOTES):
            return None
        if values[match.group(1)] is None:
            values[match.group(1)] = _clean_value(value)
    return values


def _lenient_text(text: str, fields: Sequence[str]) -> tuple[Values, list[str]] | None:
    return _parse_lines(text, fields, unquote_always=False)


# --------------------------------------------------------------------------------------------
# XML
# --------------------------------------------------------------------------------------------


def _element_text(element: ET.Element) -> str | None:
    """An element's text; nested parts (an address split into street, city) joined by ", "."""
    if len(element):
        return _clean_value(", ".join(t.strip() for t in element.itertext() if t.strip()))
    return _clean_value("".join(element.itertext()))


def _strict_xml(text: str, fields: Sequence[str]) -> Values | None:
    try:
        root = ET.fromstring(text.strip())
    except ET.ParseError:
        return None
    if root.tag != "answer":
        return None
    values: Values = {}
    for name in fields:
        child = root.find(name)
        values[name] = _element_text(child) if child is not None else None
    return values


def _lenient_xml(text: str, fields: Sequence[str]) -> tuple[Values, list[str]] | None:
    try:
        root = ET.fromstring(text.strip())
    except ET.ParseError:
        return None
    wanted = {_key(name): name for name in fields}
    values: Values = dict.fromkeys(fields)
    repairs: list[str] = []
    for element in root.iter():
        name = wanted.get(_key(element.tag))
        if name is None or values[name] is not None:
            continue
        if element.tag != name:
            repairs.append("casefold_keys")
        values[name] = _element_text(element)
    return values, _dedupe(repairs)


def _drop_xml_prose(text: str) -> tuple[str, list[str]]:
    """Crop to <answer>...</answer>; without that root, crop to the field elements."""
    start = re.search(r"<answer\b", text, re.IGNORECASE)
    if start:
        ends = list(re.finditer(r"</answer\s*>", text, re.IGNORECASE))
        end = ends[-1].end() if ends and ends[-1].start() > start.start() else len(text)
        span = text[start.start() : end]
        return span, (["drop_prose"] if span.strip() != text.strip() else [])
    tags = list(re.finditer(r"</?[A-Za-z_][\w.-]*\s*>", text))
    if not tags:
        return text, []
    span = text[tags[0].start() : tags[-1].end()]
    repairs = ["drop_prose"] if span.strip() != text.strip() else []
    return f"<answer>{span}</answer>", [*repairs, "wrap_root"]


def _escape_ampersands(text: str) -> tuple[str, list[str]]:
    fixed = re.sub(r"&(?!(?:[A-Za-z]+|#\d+|#x[0-9A-Fa-f]+);)", "&amp;", text)
    return fixed, (["escape_entities"] if fixed != text else [])


_XML_TAG = re.compile(r"<(/?)([A-Za-z_][\w.-]*)\s*(/?)>")


def _close_xml_tags(text: str) -> tuple[str, list[str]]:
    """Balance tags: close an element left open before its sibling or parent closes, fix the
    case of closing tags, drop stray closers, close whatever is still open at the end."""
    out: list[str] = []
    stack: list[str] = []
    repairs: list[str] = []
    position = 0
    for match in _XML_TAG.finditer(text):
        out.append(text[position : match.start()])
        position = match.end()
        closing, tag, self_closing = match.group(1), match.group(2), match.group(3)
        if self_closing:
            out.append(match.group(0))
        elif not closing:
            if stack and stack[-1].casefold() != "answer" and tag.casefold() != "answer":
                out.append(f"</{stack.pop()}>")  # fields do not nest: close the open one
                repairs.append("close_tags")
            stack.append(tag)
            out.append(match.group(0))
        else:
            folded = [open_tag.casefold() for open_tag in stack]
            if tag.casefold() not in folded:
                repairs.append("close_tags")
                continue
            while stack and stack[-1].casefold() != tag.casefold():
                out.append(f"</{stack.pop()}>")
                repairs.append("close_tags")
            opened = stack.pop()
            if opened != tag:
                repairs.append("casefold_keys")
            out.append(f"</{opened}>")
    out.append(text[position:])
    if stack:
        tail = "".join(out).rstrip()
        out = [tail, *(f"</{tag}>" for tag in reversed(stack))]
        repairs.append("close_tags")
    return "".join(out), _dedupe(repairs)


def _salvage_xml(text: str, fields: Sequence[str]) -> tuple[Values, list[str]] | None:
    values: Values = dict.fromkeys(fields)
    for name in fields:
        pattern = rf"<\s*{re.escape(name)}\s*>(.*?)(?:<\s*/\s*{re.escape(name)}\s*>|<|$)"
        match = re.search(pattern, text, re.IGNORECASE | re.DOTALL)
        if match:
            values[name] = _clean_value(html.unescape(match.group(1)))
    return (values, ["salvage_fields"]) if _count(values) else None


# --------------------------------------------------------------------------------------------
# Tag: <NAME="value">
# --------------------------------------------------------------------------------------------

_TAG_STRICT = re.compile(r'<([A-Z][A-Z0-9_]*)="([^"]*)">')
_TAG_LENIENT = re.compile(
    r"<\s*(?P<key>[A-Za-z_][\w \-]*?)\s*[=:]\s*(?P<value>[^>\n]*?)\s*/?\s*(?P<end>>|$)",
    re.MULTILINE,
)
_TAG_XML_STYLE = re.compile(
    r"<\s*(?P<key>[A-Za-z_][\w\-]*)\s*>(?P<value>[^<\n]*)<\s*/\s*(?P=key)\s*>?"
)


def _strict_tag(text: str, fields: Sequence[str]) -> Values | None:
    by_upper = {name.upper(): name for name in fields}
    values: Values = dict.fromkeys(fields)
    for line in text.splitlines():
        if not line.strip():
            continue
        match = _TAG_STRICT.fullmatch(line.strip())
        if match is None or match.group(1) not in by_upper:
            return None
        name = by_upper[match.group(1)]
        if values[name] is None:
            values[name] = _clean_value(match.group(2))
    return values


def _lenient_tag(text: str, fields: Sequence[str]) -> tuple[Values, list[str]] | None:
    wanted = {_key(name): name for name in fields}
    values: Values = dict.fromkeys(fields)
    repairs: list[str] = []
    used: list[tuple[int, int]] = []
    matches = [(m, False) for m in _TAG_LENIENT.finditer(text)]
    matches += [(m, True) for m in _TAG_XML_STYLE.finditer(text)]
    for match, xml_style in matches:
        name = wanted.get(_key(match.group("key")))
        if name is None or values[name] is not None:
            continue
        used.append(match.span())
        if match.group("key").strip() != name.upper():
            repairs.append("casefold_keys")
        if xml_style:
            repairs.append("xml_style")
            value, quote_repairs = match.group("value"), []
        else:
            if not match.group("end"):
                repairs.append("close_tags")
            value, quote_repairs = _unquote(match.group("value"))
        repairs.extend(quote_repairs)
        values[name] = _clean_value(html.unescape(value))
    if not _count(values):
        return None
    leftover = text
    for start, end in sorted(used, reverse=True):
        leftover = leftover[:start] + leftover[end:]
    if leftover.strip():
        repairs.append("drop_prose")
    return values, _dedupe(repairs)


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------

_PARSERS: dict[OutputFormat, _Parser] = {
    OutputFormat.JSON: _Parser(
        _strict_json, _lenient_json, (_drop_json_prose, _fix_json, _python_literal)
    ),
    OutputFormat.YAML: _Parser(_strict_yaml, _lenient_yaml, ()),
    OutputFormat.XML: _Parser(
        _strict_xml,
        _lenient_xml,
        (_drop_xml_prose, _escape_ampersands, _close_xml_tags),
    ),
    OutputFormat.TEXT: _Parser(_strict_text, _lenient_text, ()),
    OutputFormat.TAG: _Parser(_strict_tag, _lenient_tag, ()),
}

_SALVAGE: dict[OutputFormat, _Lenient] = {
    OutputFormat.JSON: _salvage_json,
    OutputFormat.XML: _salvage_xml,
}


def parse_output(fmt: OutputFormat | str, text: str, fields: Sequence[str]) -> ParsedOutput:
    """Read the fields out of one LLM answer written (more or less) in the given format.

    Strict first; if that misses fields, repair the text step by step and retry after each
    step, keeping the attempt that recovers the most fields (the earliest among equals).
    """
    fmt = OutputFormat(fmt)
    _check_fields(fields)
    parser = _PARSERS[fmt]
    strict = parser.strict(text, fields)
    if strict is not None and _count(strict) == len(fields):
        return ParsedOutput(values=strict, status="clean", repairs=[])

    best: tuple[Values, list[str], ParseStatus] | None = None
    if strict is not None and _count(strict):
        best = (strict, [], "clean")

    def consider(values: Values, repairs: list[str]) -> None:
        nonlocal best
        if _count(values) > (_count(best[0]) if best else 0):
            best = (values, _dedupe(repairs), "repaired")

    current, applied = _strip_fences(text)
    for step in (None, *parser.steps):
        if step is not None:
            repaired, names = step(current)
            if repaired == current and not names:
                continue
            current, applied = repaired, [*applied, *names]
        attempt = parser.lenient(current, fields)
        if attempt is not None:
            consider(attempt[0], [*applied, *attempt[1]])
        if best is not None and _count(best[0]) == len(fields):
            break
    salvage = _SALVAGE.get(fmt)
    if salvage is not None and (best is None or _count(best[0]) < len(fields)):
        attempt = salvage(_strip_fences(text)[0], fields)
        if attempt is not None:
            consider(attempt[0], attempt[1])
    if best is None:
        prose = _prose_answer(_strip_fences(text)[0], fields)
        if prose is not None:
            consider(*prose)

    if best is None:
        logger.debug("unparseable %s output: %.200r", fmt.value, text)
        return ParsedOutput(values=dict.fromkeys(fields), status="unparseable", repairs=[])
    values, repairs, status = best
    return ParsedOutput(values=values, status=status, repairs=repairs)


# --------------------------------------------------------------------------------------------
# Tally
# --------------------------------------------------------------------------------------------


@dataclass
class FormatTally:
    """Counts of parse outcomes over many answers (mutable: a run adds to it as it goes)."""

    clean: int = 0
    repaired: int = 0
    unparseable: int = 0

    def add(self, status: str) -> None:
        """Count one parse outcome."""
        if status not in PARSE_STATUSES:
            raise ValueError(f"status must be one of {list(PARSE_STATUSES)}, got {status!r}")
        setattr(self, status, getattr(self, status) + 1)

    @property
    def total(self) -> int:
        """All outcomes counted."""
        return self.clean + self.repaired + self.unparseable

    def rates(self) -> dict[str, float]:
        """Share of each outcome; all 0.0 while nothing has been counted."""
        total = self.total
        return {
            status: (getattr(self, status) / total if total else 0.0) for status in PARSE_STATUSES
        }
