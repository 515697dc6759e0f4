"""Output formats: instructions, schema, strict parsing and CPU-side repair of near-misses."""

from __future__ import annotations

import json

import pytest
import yaml

from runtime.app.formats import (
    FormatTally,
    OutputFormat,
    format_instructions,
    json_schema,
    parse_output,
)

FIELDS = ["name", "email", "address"]
TRUTH = {"name": "Ann Lee", "email": "ann@x.org", "address": "1 Main St, Springfield"}
NO_ADDRESS = {"name": "Ann Lee", "email": "ann@x.org", "address": None}
NOTHING = dict.fromkeys(FIELDS)

J = '{"name": "Ann Lee", "email": "ann@x.org", "address": "1 Main St, Springfield"}'
X = (
    "<answer><name>Ann Lee</name><email>ann@x.org</email>"
    "<address>1 Main St, Springfield</address></answer>"
)
T = '<NAME="Ann Lee">\n<EMAIL="ann@x.org">\n<ADDRESS="1 Main St, Springfield">'

# (format, model output, expected values, expected status, a repair that must be listed)
CORPUS: list[tuple[str, str, dict[str, str | None], str, str | None]] = [
    # JSON
    ("json", f"```json\n{J}\n```", TRUTH, "repaired", "strip_fences"),
    (
        "json",
        f"Sure! Here is the JSON:\n{J}\nLet me know if you need more.",
        TRUTH,
        "repaired",
        "drop_prose",
    ),
    (
        "json",
        J[:-3] + "}",
        TRUTH | {"address": "1 Main St, Springfiel"},
        "repaired",
        "close_quotes",
    ),
    ("json", J[:-2], TRUTH, "repaired", "close_quotes"),
    ("json", J[:-1], TRUTH, "repaired", "close_brackets"),
    ("json", J[:-1] + ",}", TRUTH, "repaired", "remove_trailing_commas"),
    (
        "json",
        J.replace('"name"', '"Name"').replace('"email"', '"EMAIL"'),
        TRUTH,
        "repaired",
        "casefold_keys",
    ),
    ("json", J.replace('"', "'"), TRUTH, "repaired", "python_literal"),
    (
        "json",
        '{"name": "Ann Lee", "email": "ann@x.org", '
        '"address": {"street": "1 Main St", "city": "Springfield"}}',
        TRUTH,
        "repaired",
        "flatten_value",
    ),
    ("json", '{"answer": ' + J + "}", TRUTH, "repaired", "unwrap_nested"),
    (
        "json",
        '{"name": "Ann Lee", "email": "ann@x.org", "addr',
        NO_ADDRESS,
        "repaired",
        "salvage_fields",
    ),
    (
        "json",
        '{"name": "Ann Lee" "email": "ann@x.org", "address": "1 Main St, Springfield"}',
        TRUTH,
        "repaired",
        "salvage_fields",
    ),
    ("json", "I'm sorry, I could not find any contact details.", NOTHING, "unparseable", None),
    # YAML
    (
        "yaml",
        'name: "Ann Lee\nemail: ann@x.org\naddress: 1 Main St, Springfield',
        TRUTH,
        "repaired",
        "strip_quotes",
    ),
    (
        "yaml",
        "Here is the answer:\nname: Ann Lee\nemail: ann@x.org\n"
        "address: Attn: 1 Main St, Springfield",
        TRUTH | {"address": "Attn: 1 Main St, Springfield"},
        "repaired",
        "drop_prose",
    ),
    (
        "yaml",
        "```yaml\nName: Ann Lee\nEmail: ann@x.org\nAddress: 1 Main St, Springfield\n```",
        TRUTH,
        "repaired",
        "casefold_keys",
    ),
    (
        "yaml",
        "- name: Ann Lee\n- email: ann@x.org\n- address: 1 Main St, Springfield",
        TRUTH,
        "repaired",
        "merge_list",
    ),
    ("yaml", "name: Ann Lee\nemail: ann@x.org", NO_ADDRESS, "clean", None),
    ("yaml", ":::: ---- ::::", NOTHING, "unparseable", None),
    # text
    (
        "text",
        "**Name:** Ann Lee\n**Email:** ann@x.org\n**Address:** 1 Main St, Springfield",
        TRUTH,
        "repaired",
        "strip_markup",
    ),
    (
        "text",
        'name: "Ann Lee"\nemail: ann@x.org\naddress: 1 Main St, Springfield',
        TRUTH,
        "repaired",
        "strip_quotes",
    ),
    (
        "text",
        "The details are below.\nname: Ann Lee\nemail: ann@x.org\n"
        "address: 1 Main St, Springfield\nThanks!",
        TRUTH,
        "repaired",
        "drop_prose",
    ),
    (
        "text",
        "```\nNAME: Ann Lee\nEMAIL: ann@x.org\nADDRESS: 1 Main St, Springfield\n```",
        TRUTH,
        "repaired",
        "strip_fences",
    ),
    ("text", "Ann Lee can be reached by email.", NOTHING, "unparseable", None),
    # XML
    ("xml", f"Sure: {X} Hope this helps.", TRUTH, "repaired", "drop_prose"),
    ("xml", X[: -len("</address></answer>")], TRUTH, "repaired", "close_tags"),
    ("xml", X.replace("Ann Lee</name>", "Ann Lee"), TRUTH, "repaired", "close_tags"),
    (
        "xml",
        X.replace("answer>", "Answer>").replace("name>", "NAME>"),
        TRUTH,
        "repaired",
        "casefold_keys",
    ),
    (
        "xml",
        X.replace("1 Main St", "Smith & Co, 1 Main St"),
        TRUTH | {"address": "Smith & Co, 1 Main St, Springfield"},
        "repaired",
        "escape_entities",
    ),
    ("xml", X.removeprefix("<answer>").removesuffix("</answer>"), TRUTH, "repaired", "wrap_root"),
    ("xml", f"```xml\n{X}\n```", TRUTH, "repaired", "strip_fences"),
    ("xml", "<<<>>> not xml at all", NOTHING, "unparseable", None),
    # tag
    (
        "tag",
        T.replace("NAME", "name").replace("EMAIL", "Email"),
        TRUTH,
        "repaired",
        "casefold_keys",
    ),
    ("tag", T.replace('Ann Lee"', "Ann Lee"), TRUTH, "repaired", "strip_quotes"),
    ("tag", "Answer:\n" + T[: -len('">')], TRUTH, "repaired", "close_tags"),
    ("tag", "<NAME>Ann Lee</NAME>\n<EMAIL>ann@x.org</EMAIL>", NO_ADDRESS, "repaired", "xml_style"),
    ("tag", f"Here you go!\n{T}", TRUTH, "repaired", "drop_prose"),
    ("tag", f"```\n{T}\n```", TRUTH, "repaired", "strip_fences"),
    ("tag", "NAME Ann Lee EMAIL ann@x.org", NOTHING, "unparseable", None),
]


@pytest.mark.parametrize(("fmt", "text", "values", "status", "repair"), CORPUS)
def test_malformed_outputs_are_repaired_or_rejected(
    fmt: str, text: str, values: dict[str, str | None], status: str, repair: str | None
) -> None:
    parsed = parse_output(fmt, text, FIELDS)
    assert parsed.values == values
    assert parsed.status == status
    if repair is None:
        assert parsed.repairs == []
    else:
        assert repair in parsed.repairs


def test_corpus_covers_every_format() -> None:
    assert {case[0] for case in CORPUS} == {fmt.value for fmt in OutputFormat}
    assert len(CORPUS) >= 25


def _render(fmt: OutputFormat, values: dict[str, str]) -> str:
    """A well-formed answer in each format, as the instructions ask for it."""
    if fmt is OutputFormat.JSON:
        return json.dumps(values)
    if fmt is OutputFormat.YAML:
        return yaml.safe_dump(values, sort_keys=False)
    if fmt is OutputFormat.XML:
        return "<answer>" + "".join(f"<{k}>{v}</{k}>" for k, v in values.items()) + "</answer>"
    if fmt is OutputFormat.TEXT:
        return "\n".join(f"{k}: {v}" for k, v in values.items())
    return "\n".join(f'<{k.upper()}="{v}">' for k, v in values.items())


@pytest.mark.parametrize("fmt", list(OutputFormat))
@pytest.mark.parametrize(
    "values",
    [
        TRUTH,
        {
            "name": "Étienne Garnier",
            "email": "e.garnier@atelier.fr",
            "address": "78 rue Pasteur, 59070 Lille, France",
        },
        {
            "name": "Haruka Sato",
            "email": "hsato@sakuragi-design.jp",
            "address": "2-14-3 Jingumae, Shibuya-ku, Tokyo 150-0001, Japan",
        },
    ],
)
def test_well_formed_rendering_parses_clean(fmt: OutputFormat, values: dict[str, str]) -> None:
    parsed = parse_output(fmt, _render(fmt, values), FIELDS)
    assert parsed.status == "clean"
    assert parsed.repairs == []
    assert parsed.values == values


@pytest.mark.parametrize("fmt", list(OutputFormat))
def test_instructions_template_parses_and_names_every_field(fmt: OutputFormat) -> None:
    text = format_instructions(fmt, FIELDS)
    template = text.split("\n", 1)[1]
    filled = template
    for value in ("Ada Lovelace", "ada@example.org", "12 Analytical Row, London"):
        filled = filled.replace("...", value, 1)
    parsed = parse_output(fmt, filled, FIELDS)
    assert parsed.status == "clean"
    assert list(parsed.values.values()) == [
        "Ada Lovelace", "ada@example.org", "12 Analytical Row, London",
    ]  # fmt: skip
    # a model that copies the template verbatim has answered nothing
    copied = parse_output(fmt, template, FIELDS)
    assert copied.values == dict.fromkeys(FIELDS)
    assert copied.status == "unparseable"


@pytest.mark.parametrize(
    ("text", "field", "expected"),
    [
        (
            'The postal address of the contact person is "167 Brunswick Road, Perth".',
            "address",
            "167 Brunswick Road, Perth",
        ),
        (
            "The contact person's address is 3-4-3 Nishiki, Naka-ku, Nagoya 438-7735, Japan.",
            "address",
            "3-4-3 Nishiki, Naka-ku, Nagoya 438-7735, Japan",
        ),
        ("The email address of the contact person is jo@x.org", "email", "jo@x.org"),
        ('{"email": "..."}', "email", None),
        ('The postal address of the contact person is: "..."', "address", None),
    ],
)
def test_one_field_prose_answers_are_salvaged(text: str, field: str, expected: str | None) -> None:
    parsed = parse_output("json", text, [field])
    assert parsed.values == {field: expected}
    assert parsed.status == ("unparseable" if expected is None else "repaired")
    if expected is not None:
        assert "prose_answer" in parsed.repairs


def test_tag_instructions_use_uppercase_names() -> None:
    text = format_instructions("tag", FIELDS)
    assert '<NAME="...">' in text and '<ADDRESS="...">' in text


def test_json_schema_requires_all_fields_as_strings() -> None:
    schema = json_schema(FIELDS)
    assert schema["required"] == FIELDS
    assert schema["properties"] == {name: {"type": "string"} for name in FIELDS}
    assert schema["additionalProperties"] is False


def test_bad_field_names_are_rejected_with_the_value() -> None:
    with pytest.raises(ValueError, match="got 'postal address'"):
        json_schema(["name", "postal address"])
    with pytest.raises(ValueError, match=r"'csv' is not a valid OutputFormat"):
        parse_output("csv", "x", FIELDS)


def test_wrong_case_key_beats_strict_partial_read() -> None:
    parsed = parse_output("json", J.replace('"address"', '"Address"'), FIELDS)
    assert parsed.values == TRUTH
    assert parsed.status == "repaired"
    assert parsed.repairs == ["casefold_keys"]


def test_tally_counts_and_rates() -> None:
    tally = FormatTally()
    assert tally.rates() == {"clean": 0.0, "repaired": 0.0, "unparseable": 0.0}
    for status in ["clean", "clean", "repaired", "unparseable"]:
        tally.add(status)
    assert (tally.clean, tally.repaired, tally.unparseable, tally.total) == (2, 1, 1, 4)
    assert tally.rates() == {"clean": 0.5, "repaired": 0.25, "unparseable": 0.25}
    with pytest.raises(ValueError, match="got 'fine'"):
        tally.add("fine")
