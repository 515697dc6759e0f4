"""The commands about applications: `apps list`, `apps check`, `apps schema`, and `init`.

They read app folders through the runtime's app registry and format (runtime.app.registry,
runtime.app.appfile) and start no engine: `apps check` validates a folder and shows the
chat calls one request of every variant would make, rendered without a model.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tuner.cli.common import fail, user_errors
from tuner.cli.display import console

if TYPE_CHECKING:
    from runtime.app.application import Application

logger = logging.getLogger(__name__)

apps_app = typer.Typer(help="Applications: the shipped ones, checking an app folder, its schema.")

#: What `fmtune init` writes, from tuner/cli/init_template.
TEMPLATE = Path(__file__).resolve().parent / "init_template"
TEMPLATE_FILES = ("app.yaml", "data.jsonl", "score.py", "experiment.yaml", "search_space.yaml")


def register(app: typer.Typer) -> None:
    """Add the application commands to the app."""
    app.add_typer(apps_app, name="apps")
    app.command("init")(init)


def _application(source: str) -> Application:
    """An app by folder or app.yaml path (when it exists) or by registered name."""
    from runtime.app.registry import get_application

    path = Path(source)
    return get_application(str(path.resolve()) if path.exists() else source)


@apps_app.command("list")
def apps_list() -> None:
    """Show the installed applications: name, variants, inputs and answer, folder."""
    from rich.table import Table

    from runtime.app.datasets import shown_path
    from runtime.app.registry import application_names, get_application

    table = Table(title="fmtune apps")
    for column in ("name", "variants", "inputs -> answer", "description", "folder"):
        table.add_column(column)
    with user_errors():
        for name in application_names():
            application = get_application(name)
            table.add_row(
                name,
                ", ".join(application.architectures),
                f"{', '.join(application.inputs)} -> {', '.join(application.answer)}",
                application.description,
                shown_path(application.folder) if application.folder else "(Python)",
            )
    console.print(table)
    console.print("Your own app: `fmtune init DIR` writes a working app folder to start from.")


@apps_app.command("check")
def apps_check(
    source: Annotated[str, typer.Argument(help="An app folder, its app.yaml, or an app's name.")],
    prompt: Annotated[
        str, typer.Option(help="Prompt variant to render (default: the app's first).")
    ] = "",
    few_shot: Annotated[
        bool, typer.Option("--few-shot/--no-few-shot", help="Render the few-shot examples.")
    ] = False,
    fmt: Annotated[
        str, typer.Option("--format", help="Output format: json, yaml, xml, text, tag.")
    ] = "json",
) -> None:
    """Validate an app folder (app.yaml, its variants, dataset and scorer) and show the chat
    calls of one request of every variant, rendered without any engine."""
    from pydantic import ValidationError

    from runtime.app.application import AppKnobs
    from runtime.errors import describe_validation_error

    with user_errors():
        application = _application(source)
        try:
            base = AppKnobs(prompt=prompt, few_shot=few_shot, format=fmt)
        except ValidationError as error:
            fail(describe_validation_error(error, "options"))
        try:
            application.check_knobs(base)
        except ValueError as error:
            fail(f"options: {error}")
        example = application.examples(1, 0)[0]
        rows = len(application.examples(10**6, 0))
        console.print(f"{application.name}: {application.description}", markup=False)
        console.print(
            f"  inputs: {', '.join(application.inputs)}; answer: {', '.join(application.answer)}"
            f"; variants: {', '.join(application.architectures)}"
            f"; prompts: {', '.join(application.prompts) or '-'}"
            f"; few-shot: {'yes' if application.few_shot else 'no'}"
            f"; {rows} evaluated rows; scorer: {application.scorer.description}",
            markup=False,
            soft_wrap=True,
        )
        where = f"row {example.row}" if example.row is not None else "the first example"
        for architecture in application.architectures:
            knobs = base.model_copy(update={"architecture": architecture})
            calls = application.dry_run(knobs, example)
            console.print(
                f"\nvariant {architecture}: {len(calls)} llm call(s), {where}",
                style="bold",
                markup=False,
            )
            for call in calls:
                console.print(
                    f"-- {call.node_id} -> model key '{call.model}', max_tokens {call.max_tokens}",
                    markup=False,
                )
                for message in call.messages:
                    console.print(
                        f"[{message['role']}] {message['content']}",
                        markup=False,
                        highlight=False,
                        soft_wrap=True,
                    )
    console.print(f"\nok: {source} is a valid app", markup=False)


@apps_app.command("schema")
def apps_schema() -> None:
    """Print the JSON schema of app.yaml (for editors; fmtune ships it as apps/app.schema.json)."""
    from runtime.app.appfile import app_file_schema

    console.print_json(json.dumps(app_file_schema()))


def init(
    directory: Annotated[Path, typer.Argument(help="Folder to write (created if missing).")],
    force: Annotated[bool, typer.Option(help="Overwrite files that already exist.")] = False,
) -> None:
    """Write a working app folder to start from: app.yaml with two variants, a 20-row dataset,
    a Python scorer, an experiment and a small search space, with comments saying what to
    change. `fmtune run DIR/experiment.yaml` runs it as it is."""
    from runtime.app.appfile import load_app_folder

    existing = [name for name in TEMPLATE_FILES if (directory / name).exists()]
    if existing and not force:
        fail(f"{directory / existing[0]} already exists; use --force to overwrite it")
    if directory.exists() and not directory.is_dir():
        fail(f"{directory}: not a folder")
    directory.mkdir(parents=True, exist_ok=True)
    for name in TEMPLATE_FILES:
        shutil.copyfile(TEMPLATE / name, directory / name)
    with user_errors():
        load_app_folder(directory)  # what was written is a valid app
    console.print(f"wrote {directory}: {', '.join(TEMPLATE_FILES)}", markup=False)
    console.print(
        f"next: fmtune apps check {directory}; fmtune run {directory / 'experiment.yaml'}; "
        f"fmtune tune {directory / 'experiment.yaml'}",
        markup=False,
        soft_wrap=True,
    )
