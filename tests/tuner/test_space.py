"""Search spaces: shipped files, sampling, conditions, constraints, grid and file errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from tuner.space import (
    CategoricalKnob,
    FloatKnob,
    IntKnob,
    SearchSpace,
    SpaceError,
    load_space,
    parse_constraint,
)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "search_spaces").glob("*.yaml"))

optuna.logging.set_verbosity(optuna.logging.WARNING)


def sample(space: SearchSpace, n: int, seed: int = 0) -> list[dict]:
    """``n`` random samples of ``space`` through an in-memory optuna study."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [space.suggest(study.ask()) for _ in range(n)]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_shipped_files_include_the_cpu_gpu_and_quickstart_spaces() -> None:
    assert {"cpu-smollm2.yaml", "gpu-vllm.yaml", "quickstart.yaml"} <= {p.name for p in SHIPPED}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_files_load_and_sample(path: Path) -> None:
    space = load_space(path)
    for params in sample(space, 50):
        assert space.violations(params) == []
        assert set(params) <= set(space.knob_names())


def experiment_of(space: Path) -> Path:
    """The shipped experiment that tunes over this space (its app's knobs), else
    experiments/extract-cpu.yaml."""
    for experiment in sorted((ROOT / "experiments").glob("*.yaml")):
        tune = yaml.safe_load(experiment.read_text()).get("tune") or {}
        if "search_space" in tune and (experiment.parent / tune["search_space"]).resolve() == space:
            return experiment
    return ROOT / "experiments" / "extract-cpu.yaml"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_sample_of_a_shipped_space_is_a_valid_experiment(path: Path) -> None:
    """Knob names are real EngineConfig / DEPLOY.yaml paths and their values are accepted."""
    from runtime.run import load_run_spec
    from tuner.knobs import check_knob_names, trial_spec

    base = load_run_spec(experiment_of(path)).model_dump(mode="json")
    if "gpu" in path.name:
        engine = base["deployment"]["models"]["llm"]["engine"]
        engine.update(device="cuda", dtype="bfloat16", kv_cache_space_gib=None, block_size=16)
    space = load_space(path)
    check_knob_names(space, ["llm"], path)
    for params in sample(space, 40):
        spec = trial_spec(base, space, params)
        engine = spec.deployment.models["llm"].engine
        for name, value in params.items():
            if name.startswith("engine."):
                expected = None if value == "none" else value
                assert getattr(engine, name.removeprefix("engine.")) == expected


def test_cpu_space_knobs() -> None:
    space = load_space(ROOT / "search_spaces/cpu-smollm2.yaml")
    assert space.knob_names() == [
        "app.architecture",
        "app.format",
        "app.structured_output",
        "engine.dtype",
        "engine.block_size",
        "engine.max_num_seqs",
        "engine.max_num_batched_tokens",
        "engine.enable_prefix_caching",
        "engine.speculative_method",
        "engine.num_speculative_tokens",
        "engine.enforce_eager",
        "engine.kv_cache_space_gib",
        "deployment.replicas",
        "deployment.router.policy",
    ]
    seqs = space.knobs["engine.max_num_seqs"]
    assert isinstance(seqs, IntKnob) and (seqs.low, seqs.high, seqs.log) == (1, 32, True)
    assert space.knobs["app.structured_output"].choices == [True, False]
    assert space.constraints == ["engine.max_num_batched_tokens >= engine.max_num_seqs"]


def test_gpu_space_has_model_per_key() -> None:
    space = load_space(ROOT / "search_spaces/gpu-vllm.yaml")
    assert space.knobs["models.llm.model"].choices == [
        "Qwen/Qwen2.5-1.5B-Instruct",
        "meta-llama/Llama-3.1-8B-Instruct",
    ]
    util = space.knobs["engine.gpu_memory_utilization"]
    assert isinstance(util, FloatKnob) and (util.low, util.high) == (0.5, 0.95)
    # the GPU methods stay in the GPU space (each sample is validated on cuda below)
    assert space.knobs["engine.quantization"].choices == ["none", "fp8", "awq", "gptq"]


def test_conditional_knob_present_only_when_condition_holds() -> None:
    space = load_space(ROOT / "search_spaces/cpu-smollm2.yaml")
    samples = sample(space, 200)
    methods = {p["engine.speculative_method"] for p in samples}
    assert methods == {"none", "ngram"}
    for params in samples:
        active = params["engine.speculative_method"] == "ngram"
        assert ("engine.num_speculative_tokens" in params) is active
        if active:
            assert 1 <= params["engine.num_speculative_tokens"] <= 5


def test_condition_with_value_list_and_chain() -> None:
    space = SearchSpace(
        knobs={
            "app.a": CategoricalKnob(choices=["x", "y", "z"]),
            # declared before its dependency: sampling must still follow dependency order
            "app.c": CategoricalKnob(choices=[1, 2], when={"app.b": True}),
            "app.b": CategoricalKnob(choices=[True, False], when={"app.a": ["x", "y"]}),
        }
    )
    seen_c = False
    for params in sample(space, 200, seed=1):
        assert ("app.b" in params) is (params["app.a"] in ("x", "y"))
        assert ("app.c" in params) is (params.get("app.b") is True)
        seen_c |= "app.c" in params
    assert seen_c
    assert space.is_active("app.c", {"app.a": "x", "app.b": True})
    assert not space.is_active("app.c", {"app.a": "z"})


def test_when_names_resolve_in_section_then_globally(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
app:
  mode: [fast, slow]
engine:
  spec: [none, ngram]
models:
  llm:
    engine:
      depth: {type: int, low: 1, high: 3, when: {spec: ngram}}
      width: {type: int, low: 1, high: 3, when: {app.mode: fast}}
""",
    )
    space = load_space(path)
    assert space.knobs["models.llm.engine.depth"].when == {"engine.spec": "ngram"}
    assert space.knobs["models.llm.engine.width"].when == {"app.mode": "fast"}


def test_sampling_within_bounds() -> None:
    space = SearchSpace(
        knobs={
            "engine.n": IntKnob(type="int", low=1, high=1024, log=True),
            "engine.s": IntKnob(type="int", low=0, high=20, step=5),
            "engine.f": FloatKnob(type="float", low=0.5, high=0.95),
            "engine.g": FloatKnob(type="float", low=1e-3, high=1.0, log=True),
            "engine.c": CategoricalKnob(choices=["a", 2, 3.5, False]),
        }
    )
    samples = sample(space, 300)
    for p in samples:
        assert isinstance(p["engine.n"], int) and 1 <= p["engine.n"] <= 1024
        assert p["engine.s"] in (0, 5, 10, 15, 20)
        assert 0.5 <= p["engine.f"] <= 0.95
        assert 1e-3 <= p["engine.g"] <= 1.0
        assert p["engine.c"] in ("a", 2, 3.5, False)
    # log sampling: about half the mass below the geometric midpoint sqrt(1024) = 32
    below = sum(p["engine.n"] <= 32 for p in samples) / len(samples)
    assert 0.35 < below < 0.65
    assert {p["engine.c"] for p in samples} == {"a", 2, 3.5, False}


def test_suggest_with_fixed_trial() -> None:
    space = load_space(ROOT / "search_spaces/cpu-smollm2.yaml")
    params = dict.fromkeys(space.knob_names())
    params.update(
        {
            "app.architecture": "judge",
            "app.format": "json",
            "app.structured_output": True,
            "engine.dtype": "float32",
            "engine.block_size": 64,
            "engine.max_num_seqs": 8,
            "engine.max_num_batched_tokens": 2048,
            "engine.enable_prefix_caching": False,
            "engine.speculative_method": "none",
            "engine.enforce_eager": True,
            "engine.kv_cache_space_gib": 1,
            "deployment.replicas": 2,
            "deployment.router.policy": "sla_aware",
        }
    )
    del params["engine.num_speculative_tokens"]
    assert space.suggest(optuna.trial.FixedTrial(params)) == params


def test_constraint_parser_valid() -> None:
    names = ["engine.a", "engine.b", "app.mode"]
    c = parse_constraint("engine.a >= engine.b * 2 + 1", names)
    assert c.names == {"engine.a", "engine.b"}
    assert c.holds({"engine.a": 7, "engine.b": 3})
    assert not c.holds({"engine.a": 6, "engine.b": 3})
    assert c.holds({"engine.a": 1})  # engine.b inactive: not checked
    assert parse_constraint("2 * engine.a < engine.b - 1", names).holds(
        {"engine.a": 1, "engine.b": 4}
    )
    assert parse_constraint("app.mode != 'slow'", names).holds({"app.mode": "fast"})
    for op, expected in [("<", False), ("<=", True), (">", False), ("==", True), ("!=", False)]:
        assert (
            parse_constraint(f"engine.a {op} engine.b", names).holds({"engine.a": 4, "engine.b": 4})
            is expected
        )


def test_constraint_parser_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"unknown knob 'engine\.c'"):
        parse_constraint("engine.a >= engine.c", ["engine.a"])


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("engine.a >=", "malformed"),
        ("engine.a", "one comparison"),
        ("1 < engine.a < 3", "one comparison"),
        ("engine.a in engine.b", "operator"),
        ("engine.a >= __import__('os').getpid()", "unsupported syntax"),
        ("engine.a ** 2 >= 1", "unsupported syntax"),
        ("engine.a >= 'x' + 1", "unsupported constant"),
        ("1 >= 0", "names no knob"),
    ],
)
def test_constraint_parser_malformed(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_constraint(text, ["engine.a", "engine.b"])


def test_violations_and_constraint_values() -> None:
    space = SearchSpace(
        knobs={
            "engine.tokens": CategoricalKnob(choices=[16, 64, 256]),
            "engine.seqs": IntKnob(type="int", low=1, high=128),
            "engine.x": IntKnob(type="int", low=1, high=4),
        },
        constraints=["engine.tokens >= engine.seqs", "engine.x != 2"],
    )
    ok = {"engine.tokens": 64, "engine.seqs": 64, "engine.x": 1}
    assert space.violations(ok) == []
    assert space.constraint_values(ok) == {
        "engine.tokens >= engine.seqs": 0.0,
        "engine.x != 2": 0.0,
    }
    bad = {"engine.tokens": 16, "engine.seqs": 100, "engine.x": 2}
    assert space.violations(bad) == [
        "engine.tokens >= engine.seqs (got 16 >= 100)",
        "engine.x != 2 (got 2 != 2)",
    ]
    assert space.constraint_values(bad) == {
        "engine.tokens >= engine.seqs": 84.0,
        "engine.x != 2": 1.0,
    }


def test_unknown_constraint_name_in_space() -> None:
    with pytest.raises(ValueError, match=r"unknown knob 'engine\.nope'"):
        SearchSpace(
            knobs={"engine.a": IntKnob(type="int", low=1, high=2)}, constraints=["engine.nope > 1"]
        )


def test_grid() -> None:
    space = SearchSpace(
        knobs={
            "engine.block_size": CategoricalKnob(choices=[16, 32]),
            "deployment.replicas": IntKnob(type="int", low=1, high=5, step=2),
        }
    )
    grid = space.grid()
    assert grid == {"engine.block_size": [16, 32], "deployment.replicas": [1, 3, 5]}
    study = optuna.create_study(sampler=optuna.samplers.GridSampler(grid, seed=0))
    seen = {tuple(space.suggest(study.ask()).values()) for _ in range(6)}
    assert len(seen) == 6


def test_grid_rejects_continuous_knobs() -> None:
    space = load_space(ROOT / "search_spaces/cpu-smollm2.yaml")
    with pytest.raises(SpaceError, match=r"'engine\.max_num_seqs' \(int without step\)"):
        space.grid()
    gpu = load_space(ROOT / "search_spaces/gpu-vllm.yaml")
    with pytest.raises(SpaceError, match=r"'engine\.gpu_memory_utilization' \(float\)"):
        gpu.grid()


@pytest.mark.parametrize(
    ("body", "knob", "fragment"),
    [
        (
            "engine:\n  block_size: {type: int, high: 32}\n",
            "engine.block_size",
            "low: Field required",
        ),
        (
            "engine:\n  block_size: {type: int, low: 64, high: 32}\n",
            "engine.block_size",
            "low must be <= high, got low=64 high=32",
        ),
        (
            "engine:\n  block_size: {choices: []}\n",
            "engine.block_size",
            "choices: List should have at least 1",
        ),
        (
            "app:\n  format: {choices: [json], colour: red}\n",
            "app.format",
            "unknown field 'colour'",
        ),
        (
            "engine:\n  spec: [none, ngram]\n"
            "  depth: {type: int, low: 1, high: 3, when: {spek: ngram}}\n",
            "engine.depth",
            "when refers to unknown knob 'spek'",
        ),
        (
            "engine:\n  spec: [none, ngram]\n"
            "  depth: {type: int, low: 1, high: 3, when: {spec: eagle}}\n",
            "engine.depth",
            "when 'engine.spec' value 'eagle' is not a value",
        ),
        (
            "models:\n  llm:\n    engine:\n"
            "      dtype: {type: float, low: 0.0, high: 1.0, log: true}\n",
            "models.llm.engine.dtype",
            "log needs low > 0, got low=0.0",
        ),
        (
            "deployment:\n  router.policy: {low: 1}\n",
            "deployment.router.policy",
            "a knob is a list",
        ),
        ("engine:\n  block_size: [16, 16]\n", "engine.block_size", "choices must be distinct"),
        (
            "engine:\n  n: {type: int, low: 0, high: 10, step: 3}\n",
            "engine.n",
            "high - low must be a multiple of step",
        ),
    ],
)
def test_bad_files_name_file_and_knob(tmp_path: Path, body: str, knob: str, fragment: str) -> None:
    path = write(tmp_path, body)
    with pytest.raises(SpaceError) as info:
        load_space(path)
    message = str(info.value)
    assert message.startswith(f"{path}: knob '{knob}': "), message
    assert fragment in message, message


def test_bad_files_other_errors(tmp_path: Path) -> None:
    with pytest.raises(SpaceError, match=r"space\.yaml: unknown field 'engines'"):
        load_space(write(tmp_path, "engines:\n  block_size: [16]\n"))
    with pytest.raises(SpaceError, match=r"space\.yaml: constraint .*unknown knob 'engine\.b'"):
        load_space(write(tmp_path, "engine:\n  a: [1]\nconstraints: ['engine.a > engine.b']\n"))
    with pytest.raises(SpaceError, match=r"space\.yaml: knob conditions form a cycle"):
        load_space(
            write(
                tmp_path,
                "app:\n  a: {choices: [1], when: {b: 1}}\n  b: {choices: [1], when: {a: 1}}\n",
            )
        )
    with pytest.raises(SpaceError, match=r"top level must be a mapping"):
        load_space(write(tmp_path, "- 1\n"))


def test_importing_tuner_space_does_not_import_vllm() -> None:
    code = "import sys, tuner.space, tuner.pareto; assert 'vllm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
