"""Tests of application DAGs: validation messages, YAML round trip, critical path."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from runtime.app.dag import (
    ApiNode,
    App,
    CodeNode,
    Condition,
    LlmNode,
    Loop,
    Ref,
    app_from_dict,
    load_app,
    render,
    resolve_callable,
    template_refs,
)
from runtime.app.formats import OutputFormat
from runtime.errors import ConfigError


def llm(node_id: str, prompt: str = "{article}", **kw: Any) -> dict[str, Any]:
    """An LLM node as YAML would give it."""
    return {"id": node_id, "kind": "llm", "model": "llm", "prompt": prompt, **kw}


def app_dict(nodes: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    """An app mapping around nodes; outputs default to the first node's raw text."""
    return {
        "name": "t",
        "inputs": ["article"],
        "nodes": nodes,
        "outputs": kw.pop("outputs", {"answer": f"{nodes[0]['id']}.text"}),
        **kw,
    }


def build(nodes: list[dict[str, Any]], **kw: Any) -> App:
    return app_from_dict(app_dict(nodes, **kw))


def merge_fields(inputs: dict[str, Any]) -> dict[str, Any]:
    """A code-node callable for these tests."""
    return dict(inputs)


# --------------------------------------------------------------------------------------------
# Templates, references, conditions
# --------------------------------------------------------------------------------------------


def test_template_refs_find_inputs_and_node_fields() -> None:
    refs = template_refs("A {article} B {ask.email} {{literal}}")
    assert refs == [Ref(None, "article"), Ref("ask", "email")]


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{article", "not a valid template"),
        ("{article!r}", "format spec or conversion"),
        ("{article:>10}", "format spec or conversion"),
        ("{}", "positional placeholder"),
        ("{a.b.c}", "is not a reference"),
    ],
)
def test_template_refs_reject_non_names(template: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        template_refs(template)


def test_render_fills_values_and_keeps_literal_braces() -> None:
    values = {Ref(None, "article"): "text", Ref("ask", "email"): None}
    assert render("{article}|{ask.email}|{{x}}", values.__getitem__) == "text||{x}"


@pytest.mark.parametrize(
    ("text", "actual", "holds"),
    [
        ("judge.verdict == 'accept'", "accept", True),
        ("judge.verdict == 'accept'", " Accept. ", True),
        ("judge.verdict == 'accept'", "retry", False),
        ('judge.verdict != "accept"', "retry", True),
        ("judge.verdict == ''", None, True),
    ],
)
def test_condition_parses_and_compares(text: str, actual: str | None, holds: bool) -> None:
    assert Condition.parse(text).holds(actual) is holds


@pytest.mark.parametrize(
    "text", ["judge.verdict = 'accept'", "__import__('os')", "a.b == accept", "a.b == 'x' and 1"]
)
def test_condition_rejects_anything_else(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a condition"):
        Condition.parse(text)


# --------------------------------------------------------------------------------------------
# Validation errors
# --------------------------------------------------------------------------------------------


def test_valid_app_builds_in_python_and_from_a_mapping() -> None:
    in_python = App(
        name="t",
        inputs=("article",),
        nodes=(
            LlmNode(
                id="a",
                model="llm",
                prompt="{article}\n{format_instructions}",
                output_fields=("name",),
            ),
            LlmNode(id="b", model="llm", prompt="{a.name}", depends_on=("a",)),
        ),
        outputs={"name": "a.name", "summary": "b.text"},
    )
    as_mapping = build(
        [
            llm("a", "{article}\n{format_instructions}", output_fields=["name"]),
            llm("b", "{a.name}", depends_on=["a"]),
        ],
        outputs={"name": "a.name", "summary": "b.text"},
    )
    assert in_python == as_mapping
    assert in_python.format is OutputFormat.JSON


def test_duplicate_ids_are_named() -> None:
    with pytest.raises(ConfigError, match=r"duplicate node id 'a' \(2 nodes\)"):
        build([llm("a"), llm("a")])


def test_dangling_depends_on_is_named() -> None:
    with pytest.raises(ConfigError, match=r"node 'b': depends_on unknown node 'ghost'"):
        build([llm("a"), llm("b", depends_on=["ghost"])])


def test_cycle_outside_a_loop_is_named() -> None:
    with pytest.raises(ConfigError, match=r"cycle outside a declared loop: .*'a'.*'b'"):
        build([llm("a", depends_on=["b"]), llm("b", depends_on=["a"])])


def test_self_dependency_outside_a_loop_is_a_cycle() -> None:
    with pytest.raises(ConfigError, match=r"cycle outside a declared loop: 'a' depends on 'a'"):
        build([llm("a", depends_on=["a"])])


def test_cycle_through_a_loop_is_named() -> None:
    nodes = [llm("x", depends_on=["b"]), llm("a", depends_on=["x"]), llm("b", depends_on=["a"])]
    loops = [{"id": "refine", "body": ["a", "b"], "until": "b.text == 'ok'"}]
    with pytest.raises(ConfigError, match=r"cycle outside a declared loop: .*loop 'refine'"):
        build(nodes, loops=loops)


def test_cycle_inside_a_loop_is_a_feedback_edge() -> None:
    app = build(
        [
            llm("agent", "{article} previous verdict: {judge.verdict}", depends_on=["judge"]),
            llm(
                "judge",
                "{agent.text} {format_instructions}",
                depends_on=["agent"],
                output_fields=["verdict"],
            ),
        ],
        loops=[{"id": "review", "body": ["agent", "judge"], "until": "judge.verdict == 'ok'"}],
        outputs={"verdict": "judge.verdict"},
    )
    assert app.is_feedback("agent", "judge")
    assert not app.is_feedback("judge", "agent")
    (stage,) = app.stages
    assert stage.loop is not None and stage.inner_deps == {"agent": (), "judge": ("agent",)}


def test_unknown_model_key_is_named() -> None:
    app = build([llm("a"), {**llm("judge"), "model": "gpt9"}])
    app.validate_against({"llm", "gpt9"})
    with pytest.raises(ConfigError, match=r"node 'judge': unknown model 'gpt9'"):
        app.validate_against({"llm"})


def test_unbound_variable_is_named() -> None:
    with pytest.raises(ConfigError, match=r"node 'a': prompt uses unbound variable 'articel'"):
        build([llm("a", "Read {articel}")])


def test_unknown_node_and_field_in_template_are_named() -> None:
    with pytest.raises(ConfigError, match=r"node 'b': prompt references unknown node 'zz'"):
        build([llm("a"), llm("b", "{zz.name}", depends_on=["a"])])
    with pytest.raises(ConfigError, match=r"node 'a' has no field 'nme' \(fields: name, text\)"):
        build([llm("a", output_fields=["name"]), llm("b", "{a.nme}", depends_on=["a"])])


def test_reference_to_a_node_that_is_not_upstream_is_named() -> None:
    with pytest.raises(ConfigError, match=r"node 'b': prompt references 'a.text' but 'a' is not"):
        build([llm("a"), llm("b", "{a.text}")])


def test_bad_when_expression_is_named() -> None:
    with pytest.raises(ConfigError, match=r"node 'b': when 'a.text = 1' is not a condition"):
        build([llm("a"), llm("b", depends_on=["a"], when="a.text = 1")])


def test_when_must_reference_an_upstream_field() -> None:
    with pytest.raises(ConfigError, match=r"node 'b': when references 'a.kind' but node 'a' has"):
        build([llm("a"), llm("b", depends_on=["a"], when="a.kind == 'x'")])


def test_loop_body_with_unknown_node_is_named() -> None:
    loops = [{"id": "refine", "body": ["a", "ghost"], "until": "a.text == 'ok'"}]
    with pytest.raises(ConfigError, match=r"loop 'refine': body references unknown node 'ghost'"):
        build([llm("a")], loops=loops)


def test_loop_until_must_be_a_body_node_and_parse() -> None:
    loops = [{"id": "refine", "body": ["b"], "until": "a.text == 'ok'"}]
    with pytest.raises(ConfigError, match=r"loop 'refine': until references 'a.text', which is"):
        build([llm("a"), llm("b", depends_on=["a"])], loops=loops)
    loops = [{"id": "refine", "body": ["a"], "until": "a.text is ok"}]
    with pytest.raises(ConfigError, match=r"loop 'refine': until 'a.text is ok' is not"):
        build([llm("a")], loops=loops)


def test_node_in_two_loops_is_named() -> None:
    loops = [
        {"id": "one", "body": ["a"], "until": "a.text == 'ok'"},
        {"id": "two", "body": ["a"], "until": "a.text == 'ok'"},
    ]
    with pytest.raises(ConfigError, match=r"loop 'two': node 'a' is already in loop 'one'"):
        build([llm("a")], loops=loops)


def test_unknown_kind_is_rejected_by_pydantic() -> None:
    with pytest.raises(ConfigError, match=r"nodes.0.*'shell'.*does not match"):
        build([{"id": "a", "kind": "shell"}])


def test_unknown_field_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"unknown field 'nodes.0.llm.temprature'"):
        build([{**llm("a"), "temprature": 0.5}])


def test_node_rules_name_the_node() -> None:
    with pytest.raises(ConfigError, match=r"node 'a': structured_output needs output_fields"):
        build([llm("a", structured_output=True)])
    with pytest.raises(ConfigError, match=r"node 'a': \{format_instructions\} needs output"):
        build([llm("a", "{article} {format_instructions}")])
    with pytest.raises(ConfigError, match=r"node 'a': prompt is not a valid template"):
        build([llm("a", "{article")])


def test_code_callable_must_import() -> None:
    node = {"id": "c", "kind": "code", "callable": "no_such_module_xyz:f"}
    with pytest.raises(ConfigError, match=r"node 'c': callable 'no_such_module_xyz:f': cannot"):
        build([node])
    node = {"id": "c", "kind": "code", "callable": "tests.runtime.app.test_dag:nope"}
    with pytest.raises(ConfigError, match=r"has no attribute 'nope'"):
        build([node])
    node = {"id": "c", "kind": "code", "callable": "tests.runtime.app.test_dag"}
    with pytest.raises(ConfigError, match=r"must look like 'package.module:function'"):
        build([node])


def test_code_callable_may_be_a_function_of_a_python_file(tmp_path: Path) -> None:
    (tmp_path / "calc.py").write_text("def double(inputs):\n    return {'n': inputs['x'] * 2}\n")
    (tmp_path / "broken.py").write_text("raise RuntimeError('cannot load')\n")
    node = CodeNode(id="c", callable=f"{tmp_path}/calc.py:double", output_fields=("n",))
    assert resolve_callable(node.callable)({"x": 4}) == {"n": 8}
    assert resolve_callable(node.callable) is resolve_callable(f"{tmp_path}/calc.py:double")
    with pytest.raises(ValueError, match=r"calc\.py' has no attribute 'doubel' \(did you mean"):
        resolve_callable(f"{tmp_path}/calc.py:doubel")
    with pytest.raises(ValueError, match=r"no such file '.*/nope\.py'"):
        resolve_callable(f"{tmp_path}/nope.py:f")
    with pytest.raises(ValueError, match=r"loading '.*broken\.py' raised RuntimeError: cannot"):
        resolve_callable(f"{tmp_path}/broken.py:f")


def test_code_and_api_nodes_validate_their_references() -> None:
    code = CodeNode(
        id="c",
        callable="tests.runtime.app.test_dag:merge_fields",
        inputs={"x": "a.name", "doc": "article"},
        output_fields=("x",),
        depends_on=("a",),
    )
    api = ApiNode(
        id="lookup",
        url="http://example.test/find?q={c.x}",
        body={"doc": "{article}"},
        output_fields=("city",),
        depends_on=("c",),
    )
    app = App(
        name="t",
        inputs=("article",),
        nodes=(
            LlmNode(id="a", model="llm", prompt="{article}", output_fields=("name",)),
            code,
            api,
        ),
        outputs={"city": "lookup.city", "status": "lookup.status"},
    )
    assert app.upstream["lookup"] == {"a", "c"}
    with pytest.raises(ValidationError, match=r"url must start with http"):
        ApiNode(id="x", url="ftp://host")
    with pytest.raises(ConfigError, match=r"node 'c': input 'x' references 'a.name' but 'a' is"):
        build(
            [
                llm("a", output_fields=["name"]),
                {
                    "id": "c",
                    "kind": "code",
                    "callable": "tests.runtime.app.test_dag:merge_fields",
                    "inputs": {"x": "a.name"},
                },
            ]
        )


def test_outputs_must_reference_existing_fields() -> None:
    with pytest.raises(ConfigError, match=r"output 'name': references 'a.name' but node 'a'"):
        build([llm("a")], outputs={"name": "a.name"})


def test_several_problems_are_reported_together() -> None:
    with pytest.raises(ConfigError) as caught:
        build([llm("a", depends_on=["x"]), llm("b", depends_on=["y"])])
    assert "depends_on unknown node 'x'" in str(caught.value)
    assert "depends_on unknown node 'y'" in str(caught.value)


# --------------------------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------------------------

_YAML = """
name: triage
inputs: [article]
format: xml
nodes:
  - id: classify
    kind: llm
    model: small
    prompt: "Is this about sport? {article}\\n{format_instructions}"
    output_fields: [topic]
    sampling: {max_tokens: 32, temperature: 0.0}
  - id: draft
    kind: llm
    model: small
    prompt: "Summarise: {article} (previous: {review.verdict})"
    depends_on: [classify, review]
    when: "classify.topic == 'sport'"
  - id: review
    kind: llm
    model: big
    prompt: "Review {draft.text}\\n{format_instructions}"
    output_fields: [verdict]
    depends_on: [draft]
loops:
  - {id: polish, body: [draft, review], until: "review.verdict == 'accept'", max_rounds: 3}
outputs:
  summary: draft.text
"""


def test_load_app_reads_yaml(tmp_path: Path) -> None:
    path = tmp_path / "app.yaml"
    path.write_text(_YAML)
    app = load_app(path)
    assert app.format is OutputFormat.XML
    assert [node.id for node in app.nodes] == ["classify", "draft", "review"]
    assert app.loops == (
        Loop(
            id="polish", body=("draft", "review"), until="review.verdict == 'accept'", max_rounds=3
        ),
    )
    app.validate_against({"small", "big"})


def test_yaml_round_trip(tmp_path: Path) -> None:
    app = load_app(_write(tmp_path / "a.yaml", _YAML))
    again = load_app(_write(tmp_path / "b.yaml", app.to_yaml()))
    assert again == app
    assert "kind: llm" in app.to_yaml()


def test_load_app_errors_name_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.yaml", _YAML.replace("{draft.text}", "{draft.txt}"))
    with pytest.raises(
        ConfigError, match=rf"{re.escape(str(path))}: .*node 'review': prompt references"
    ):
        load_app(path)
    with pytest.raises(ConfigError, match=r"cannot read app file"):
        load_app(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"an app must be a mapping, got list"):
        load_app(_write(tmp_path / "list.yaml", "- 1\n"))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------
# Critical path
# --------------------------------------------------------------------------------------------


def _diamond() -> App:
    return build(
        [
            llm("a"),
            llm("b", depends_on=["a"]),
            llm("c", depends_on=["a"]),
            llm("c2", depends_on=["c"]),
            llm("d", depends_on=["b", "c2"]),
        ],
        outputs={"answer": "d.text"},
    )


def test_critical_path_by_node_count() -> None:
    assert _diamond().critical_path() == ["a", "c", "c2", "d"]


def test_critical_path_by_cost() -> None:
    assert _diamond().critical_path({"b": 10.0}) == ["a", "b", "d"]
    with pytest.raises(ValueError, match=r"costs\['b'\] must be >= 0"):
        _diamond().critical_path({"b": -1.0})


def test_critical_path_counts_loop_rounds() -> None:
    app = build(
        [
            llm("a"),
            llm("b", depends_on=["a"]),
            llm("c", depends_on=["b"]),
            llm("x", depends_on=["a"]),
            llm("y", depends_on=["x"]),
            llm("end", depends_on=["c", "y"]),
        ],
        loops=[{"id": "redo", "body": ["x", "y"], "until": "y.text == 'ok'", "max_rounds": 1}],
    )
    assert app.critical_path() == ["a", "b", "c", "end"]
    looped = app.model_copy(update={"loops": (app.loops[0].model_copy(update={"max_rounds": 3}),)})
    assert App.model_validate(looped.model_dump()).critical_path() == ["a", "x", "y", "end"]


def test_deadline_shares_follow_the_critical_path() -> None:
    from runtime.app.application import AppKnobs
    from runtime.app.registry import get_application

    extraction = get_application("extraction")

    def build_app(architecture: str) -> App:
        return extraction.build(AppKnobs(architecture=architecture))

    sequential = build_app("sequential").deadline_shares()
    assert sorted(sequential.values()) == pytest.approx([1 / 3, 2 / 3, 1.0])
    parallel = build_app("parallel").deadline_shares()
    assert parallel["merge"] == 1.0
    asks = {value for key, value in parallel.items() if key != "merge"}
    assert len(asks) == 1 and asks.pop() == pytest.approx(1 / 1.1)
    judge = build_app("judge").deadline_shares()
    assert set(judge.values()) == {1.0}


def test_deadline_shares_are_proportional_to_the_chain_ending_at_each_node() -> None:
    shares = _diamond().deadline_shares()
    assert shares == pytest.approx({"a": 1 / 4, "b": 2 / 4, "c": 2 / 4, "c2": 3 / 4, "d": 1.0})
    # the rest of the critical path after each node: the total less its chain (4 x (1 - share))
    assert _diamond().rest_of_path() == pytest.approx({"a": 3, "b": 2, "c": 2, "c2": 1, "d": 0})
    assert all(0.0 < share <= 1.0 for share in shares.values())
    path = _diamond().critical_path()
    assert shares[path[-1]] == 1.0  # the last node of the critical path gets the whole budget
    assert [shares[node] for node in path] == sorted(shares[node] for node in path)


def test_deadline_shares_count_a_code_node_as_a_tenth_of_a_call() -> None:
    app = build(
        [
            llm("a"),
            {
                "id": "fix",
                "kind": "code",
                "callable": "tests.runtime.app.test_dag:merge_fields",
                "depends_on": ["a"],
            },
            llm("b", depends_on=["fix"]),
        ],
        outputs={"answer": "b.text"},
    )
    shares = app.deadline_shares()
    assert shares == pytest.approx({"a": 1 / 2.1, "fix": 1.1 / 2.1, "b": 1.0})
    assert app.critical_path() == ["a", "fix", "b"]


def test_deadline_shares_give_loop_nodes_the_loop_end() -> None:
    app = build(
        [
            llm("a"),
            llm("x", depends_on=["a"]),
            llm("y", depends_on=["x"]),
            llm("end", depends_on=["y"]),
        ],
        loops=[{"id": "redo", "body": ["x", "y"], "until": "y.text == 'ok'", "max_rounds": 3}],
    )
    # a: 1; the loop: 3 rounds of a 2-call chain; end: 1 more, 8 in all
    assert app.deadline_shares() == pytest.approx({"a": 1 / 8, "x": 7 / 8, "y": 7 / 8, "end": 1.0})
