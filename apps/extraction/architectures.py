"""The four cognitive architectures of the extraction task, as Apps.

Each reads the request input `article` and answers the fields name, email and address:

- single: one call extracts all three fields.
- parallel: three independent sub-questions (name, email, address) run at once; a code node
  gathers their answers.
- sequential: three sub-questions from easy to hard (email, name, address), each prompt
  seeing the earlier answers, so the model anchors on the email it found first.
- judge: two agents answer independently (different wording and temperature); a judge picks
  or merges their values and says `verdict: accept` or `retry`; the three re-run until the
  judge accepts or `judge_rounds` rounds have run.

Prompts are short and explicit because the bundled model is a 135M-parameter instruct model:
one question per prompt, the article set apart, and the format instruction (a template to
copy, from formats.format_instructions) last. All LLM nodes use the model key "llm".
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from apps.extraction.task import FIELDS
from runtime.app.dag import App, CodeNode, LlmNode, Loop, NodeSampling
from runtime.app.formats import OutputFormat

logger = logging.getLogger(__name__)

ARCHITECTURES: tuple[str, ...] = ("single", "parallel", "sequential", "judge")
MODEL_KEY = "llm"
"""The deployment model key every LLM node of these apps uses."""

_SYSTEM = (
    "You are a careful assistant. You copy contact details exactly as they are written in "
    "a news article, and you never invent anything."
)
_ARTICLE = "Article:\n{article}\n\n"
_CONTACT = (
    "The contact person is the one person whose email address and postal address are given "
    "in the article. "
)
_INSTRUCTIONS = "\n{format_instructions}"


def merge_answers(inputs: Mapping[str, Any]) -> dict[str, str | None]:
    """Gather the sub-answers into one record: one entry per field, trimmed, None if absent.

    The aggregation step of the parallel architecture (a code node: no LLM call).
    """
    merged: dict[str, str | None] = {}
    for name in FIELDS:
        value = inputs.get(name)
        text = str(value).strip() if value is not None else ""
        merged[name] = text or None
    return merged


def _llm(
    node_id: str,
    prompt: str,
    fields: tuple[str, ...],
    max_tokens: int,
    structured_output: bool,
    depends_on: tuple[str, ...] = (),
    temperature: float = 0.0,
) -> LlmNode:
    return LlmNode(
        id=node_id,
        model=MODEL_KEY,
        system=_SYSTEM,
        prompt=prompt,
        output_fields=fields,
        depends_on=depends_on,
        structured_output=structured_output,
        sampling=NodeSampling(max_tokens=max_tokens, temperature=temperature),
    )


def _outputs(node_id: str) -> dict[str, str]:
    return {name: f"{node_id}.{name}" for name in FIELDS}


_NAME_QUESTION = "What is the full name of the contact person? Copy it exactly."
_EMAIL_QUESTION = (
    "What is the email address of the contact person? Do not give a press, newsroom, info, "
    "tips or corrections address. Copy it exactly."
)
_ADDRESS_QUESTION = (
    "What is the postal address of the contact person? Copy all of it exactly, from the "
    "house number or street to the country."
)


def _single(fmt: OutputFormat, structured_output: bool) -> App:
    prompt = (
        _ARTICLE + _CONTACT + "Write the contact person's full name, email address and full "
        "postal address, each copied exactly from the article." + _INSTRUCTIONS
    )
    node = _llm("extract", prompt, FIELDS, 192, structured_output)
    return App(
        name="extraction-single",
        inputs=("article",),
        nodes=(node,),
        outputs=_outputs("extract"),
        format=fmt,
    )


def _parallel(fmt: OutputFormat, structured_output: bool) -> App:
    questions = {"name": _NAME_QUESTION, "email": _EMAIL_QUESTION, "address": _ADDRESS_QUESTION}
    asks = tuple(
        _llm(
            f"ask_{name}",
            _ARTICLE + _CONTACT + question + _INSTRUCTIONS,
            (name,),
            96,
            structured_output,
        )
        for name, question in questions.items()
    )
    merge = CodeNode(
        id="merge",
        callable=f"{__name__}:merge_answers",
        inputs={name: f"ask_{name}.{name}" for name in FIELDS},
        output_fields=FIELDS,
        depends_on=tuple(ask.id for ask in asks),
    )
    return App(
        name="extraction-parallel",
        inputs=("article",),
        nodes=(*asks, merge),
        outputs=_outputs("merge"),
        format=fmt,
    )


def _sequential(fmt: OutputFormat, structured_output: bool) -> App:
    ask_email = _llm(
        "ask_email",
        _ARTICLE + _CONTACT + _EMAIL_QUESTION + _INSTRUCTIONS,
        ("email",),
        96,
        structured_output,
    )
    ask_name = _llm(
        "ask_name",
        _ARTICLE + _CONTACT + "The contact person's email address is {ask_email.email}. "
        "Whose email address is this? Write that person's full name, copied exactly."
        + _INSTRUCTIONS,
        ("name",),
        96,
        structured_output,
        depends_on=("ask_email",),
    )
    ask_address = _llm(
        "ask_address",
        _ARTICLE
        + "The contact person is {ask_name.name}, email {ask_email.email}. "
        + _ADDRESS_QUESTION
        + _INSTRUCTIONS,
        ("address",),
        96,
        structured_output,
        depends_on=("ask_email", "ask_name"),
    )
    return App(
        name="extraction-sequential",
        inputs=("article",),
        nodes=(ask_email, ask_name, ask_address),
        outputs={
            "name": "ask_name.name",
            "email": "ask_email.email",
            "address": "ask_address.address",
        },
        format=fmt,
    )


def _judge(fmt: OutputFormat, structured_output: bool, rounds: int) -> App:
    agent_a = _llm(
        "agent_a",
        _ARTICLE + _CONTACT + "Write the contact person's full name, email address and full "
        "postal address, each copied exactly from the article." + _INSTRUCTIONS,
        FIELDS,
        192,
        structured_output,
        temperature=0.2,
    )
    agent_b = _llm(
        "agent_b",
        _ARTICLE + "Who should a reader write to about this article? Find that person's name, "
        "their own email address (not a press or newsroom one) and their postal address. "
        "Copy each exactly." + _INSTRUCTIONS,
        FIELDS,
        192,
        structured_output,
        temperature=0.8,
    )
    answers = "".join(
        f"Answer {label}: name: {{{node}.name}}; email: {{{node}.email}}; "
        f"address: {{{node}.address}}\n"
        for label, node in (("A", "agent_a"), ("B", "agent_b"))
    )
    judge = _llm(
        "judge",
        _ARTICLE
        + "Two assistants were asked for the contact person of this article.\n"
        + answers
        + "Check both answers against the article. Write the correct name, email and address, "
        "each copied exactly from the article. Set verdict to accept if you are sure they "
        "are correct, or to retry if you are not." + _INSTRUCTIONS,
        (*FIELDS, "verdict"),
        224,
        structured_output,
        depends_on=("agent_a", "agent_b"),
    )
    loop = Loop(
        id="review",
        body=("agent_a", "agent_b", "judge"),
        until="judge.verdict == 'accept'",
        max_rounds=rounds,
    )
    return App(
        name="extraction-judge",
        inputs=("article",),
        nodes=(agent_a, agent_b, judge),
        loops=(loop,),
        outputs=_outputs("judge"),
        format=fmt,
    )


def build_app(
    architecture: str,
    fmt: OutputFormat | str,
    judge_rounds: int = 2,
    structured_output: bool = False,
) -> App:
    """The extraction app of one architecture, answering in fmt.

    judge_rounds bounds the judge loop; structured_output constrains every LLM node to a
    JSON schema of its fields (its answers are then JSON whatever fmt is).
    """
    fmt = OutputFormat(fmt)
    if architecture == "single":
        return _single(fmt, structured_output)
    if architecture == "parallel":
        return _parallel(fmt, structured_output)
    if architecture == "sequential":
        return _sequential(fmt, structured_output)
    if architecture == "judge":
        if judge_rounds < 1:
            raise ValueError(f"judge_rounds must be >= 1, got {judge_rounds}")
        return _judge(fmt, structured_output, judge_rounds)
    raise ValueError(f"architecture must be one of {list(ARCHITECTURES)}, got '{architecture}'")
