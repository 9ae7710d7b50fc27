"""The command line's contract: --version, --debug anywhere, --device where a model runs, one-line errors with exit 2
for what the user caused (also inside a cell, also through Ray's wrapping), exit 1 with the traceback and a request to
report for anything else."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import engine
from engine import cli, commands
from engine.cli import build_parser, main
from engine.errors import UserError, UserTypeError
from engine.models import build_model
from engine.models.checkpoint import save_checkpoint
from engine.runs.cells import Cell, CellOutput, Stage
from engine.runs.executor import CellFailed, LocalExecutor
from engine.runs.progress import CostModel
from engine.runs.store import ResultStore

ROOT = Path(__file__).resolve().parent.parent


def _one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def test_version_prints_the_installed_version_and_the_commit(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    version = importlib.metadata.version("hfc-engine")
    assert capsys.readouterr().out.strip() == f"hfc-engine {version} (commit {head.stdout.strip()})"


def test_outside_a_checkout_the_commit_is_the_one_recorded_at_build_time(tmp_path, monkeypatch):
    recorded = tmp_path / "site-packages" / "engine" / "BUILD_COMMIT"  # an installed layout: no .git above it
    monkeypatch.setattr(engine, "BUILD_COMMIT_FILE", recorded)
    assert engine.git_commit() is None and engine.build_commit() is None and "commit" not in cli.version()
    recorded.parent.mkdir(parents=True)
    recorded.write_text("0123abcd\n")
    assert engine.git_commit() == engine.build_commit() == "0123abcd" and cli.version().endswith("(commit 0123abcd)")


@pytest.mark.parametrize("argv", [["--version"], ["--help"]])
def test_version_and_help_import_neither_torch_nor_the_engine(argv):
    code = f"import sys\nfrom engine.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
    code += "print(sorted(m for m in ('torch', 'engine.commands', 'engine.runs') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "[]"


def test_every_command_has_its_arguments():
    assert list(cli.COMMANDS) == list(commands.ARGUMENTS)


@pytest.mark.parametrize(
    ("argv", "debug"),
    [
        (["--debug", "runs", "show", "r"], True),
        (["runs", "--debug", "show", "r"], True),
        (["runs", "show", "r", "--debug"], True),
        (["--debug", "bench", "--quick"], True),
        (["bench", "--quick", "--debug"], True),
        (["bench", "--quick"], False),
    ],
)
def test_debug_is_accepted_before_and_after_the_subcommand(argv, debug):
    assert build_parser().parse_args(argv).debug is debug


def test_debug_lets_a_user_error_through(monkeypatch):
    monkeypatch.setattr(commands, "cmd_bench", _raiser(UserError("ops: nothing to do")))
    with pytest.raises(UserError, match="nothing to do"):
        main(["--debug", "bench"])


@pytest.mark.parametrize("command", [["score", "--model", "m", "--detectors", "d", "--data", "x"],
                                     ["train", "--data", "x"], ["layers", "--model", "m"], ["run"]])  # fmt: skip
def test_device_option_where_a_model_runs(command):
    parser = build_parser()
    assert parser.parse_args([*command, "--device", "cpu"]).device == "cpu"
    default = parser.parse_args(command).device
    assert default == (None if command == ["run"] else "cpu")  # run: the config's device


@pytest.mark.parametrize("value", ["gpu", "cuda:x"])
def test_a_bad_device_is_one_line_exit_2(value, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["layers", "--model", "m.pt", "--device", value])
    assert exit_.value.code == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("hfc-engine layers: error: argument --device: ") and f"{value!r} is not a torch" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_an_unavailable_device_is_refused_before_any_work(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--data", "fundus-synth:binary", "--device", "cuda"])
    assert exit_.value.code == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("hfc-engine train: error: argument --device: 'cuda'") and "sees no cuda device" in line


def test_run_device_overrides_the_config(monkeypatch):
    seen = {}

    def fake_audit(config, progress):
        seen.update(config)
        raise UserError("stop here")

    monkeypatch.setattr(commands, "run_audit", fake_audit)
    assert main(["run", "--device", "cpu", "--no-progress"]) == 2
    assert seen["device"] == "cpu"


def test_run_merges_presets_and_configs_left_to_right_then_overrides(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_audit(config, progress):
        seen.update(config)
        raise UserError("stop here")

    monkeypatch.setattr(commands, "run_audit", fake_audit)
    mine = tmp_path / "my.yaml"
    mine.write_text("name: vendor\nattack: {pool: 28}\nhfc: {adaptive: true}\n")
    assert main(["run", "clinical", str(mine), "attack.steps=5", "--no-progress"]) == 2
    assert seen["name"] == "vendor" and seen["attacks"] == ["pgd"] and seen["hfc"]["fixed_weights"] == []
    assert seen["hfc"]["adaptive"] is True and seen["attack"]["pool"] == 28 and seen["attack"]["steps"] == 5
    assert seen["hfc"]["calibration"]["max_cost"] == 1.0
    capsys.readouterr()
    assert main(["run", "attack.steps=5", "clinical"]) == 2
    assert "config 'clinical' comes after an override" in _one_line(capsys.readouterr().err)


def test_layers_runs_on_the_given_device(tmp_path, capsys):
    model = build_model("resnet18", 2, width=0.125, small_stem=True, input_size=16)
    path = save_checkpoint(tmp_path / "m.pt", model, {"input_size": [3, 16, 16]})
    assert main(["layers", "--model", str(path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{out.count(chr(10)) - 1} layers of {path} for (C, H, W) = (3, 16, 16) inputs")


def test_missing_argument_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train"])
    assert exit_.value.code == 2
    line = _one_line(capsys.readouterr().err)
    assert line == (
        "hfc-engine train: error: the following arguments are required: --data "
        "(hfc-engine train --help shows the usage)"
    )


def _raiser(exc: BaseException):
    def command(args):
        raise exc

    return command


@pytest.mark.parametrize("bug", [KeyError("missing"), ValueError("bad internal value"), TypeError("wrong arg")])
def test_a_bug_exits_1_with_traceback_and_a_request_to_report(bug, monkeypatch, capsys):
    monkeypatch.setattr(commands, "cmd_bench", _raiser(bug))
    assert main(["bench"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and f"{type(bug).__name__}: " in err
    assert err.strip().splitlines()[-1] == cli.REPORT_LINE and "hfc-engine issue tracker" in cli.REPORT_LINE


@pytest.mark.parametrize("error", [UserError("detector.k must be an int >= 1, got 0"),
                                   UserTypeError("detector.k must be an int >= 1, got 0")])  # fmt: skip
def test_a_user_error_is_one_line_exit_2(error, monkeypatch, capsys):
    monkeypatch.setattr(commands, "cmd_bench", _raiser(error))
    assert main(["bench"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line == "hfc-engine: error: detector.k must be an int >= 1, got 0 (--debug shows the traceback)"


def test_a_file_the_system_refuses_is_a_user_error(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "nothing" / "scores.csv"
    monkeypatch.setattr(commands, "cmd_bench", lambda args: missing.open())
    assert main(["bench"]) == 2
    assert str(missing) in _one_line(capsys.readouterr().err)


def _failing_cell(tmp_path, error: BaseException) -> None:
    """Run one cell that raises ``error`` through the local executor, as a run does."""

    def run(context, inputs, deps) -> CellOutput:
        raise error

    cell = Cell("detect", {"detector": "lid"}, label="fundus-synth/pgd/lid")
    stage = Stage("detect", run, cost=lambda c, machine: ("detect", 1.0))
    store = ResultStore(tmp_path / "run")
    LocalExecutor(progress=False).run([cell], store, None, {"detect": stage}, CostModel({cell.key: ("detect", 1.0)}))


def test_a_user_error_inside_a_cell_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    error = UserError("LID needs more than k+1=21 clean examples,\ngot 19")
    monkeypatch.setattr(commands, "cmd_bench", lambda args: _failing_cell(tmp_path, error))
    assert main(["bench"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line == ("hfc-engine: error: fundus-synth/pgd/lid: LID needs more than k+1=21 clean examples, got 19 "
                    "(--debug shows the traceback)")  # fmt: skip


def test_a_bug_inside_a_cell_exits_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(commands, "cmd_bench", lambda args: _failing_cell(tmp_path, ValueError("shapes (3,) and (4,)")))
    assert main(["bench"]) == 1
    err = capsys.readouterr().err
    assert "ValueError: shapes (3,) and (4,)" in err and err.strip().endswith(cli.REPORT_LINE)


def test_ray_wrapping_is_unwrapped_to_the_cells_own_error():
    ray = pytest.importorskip("ray")
    from engine.runs.cluster import _result

    cause = UserError("config key 'hfc.lam' must be >= 0")
    wrapped = ray.exceptions.RayTaskError("detect", "traceback", cause)
    twice = ray.exceptions.RayTaskError("next", "traceback", wrapped)  # a dependant of the failed task

    class FakeRay:
        exceptions = ray.exceptions

        @staticmethod
        def get(ref):
            raise ref

    for raised in (wrapped, wrapped.as_instanceof_cause(), twice):
        with pytest.raises(CellFailed) as failed:
            _result(FakeRay, Cell("detect", {}, label="cell"), raised, None)
        assert failed.value.error is cause and failed.value.label == "cell"
