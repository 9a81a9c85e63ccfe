"""``bench/device_check.sh --dry-run``: every step of the GPU check is listed with its command, the commands
name files and tests that exist, and the converter comparison's arguments are ones its parser accepts."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "device_check.sh"
#: The check's steps in order: the model is joined first, the steps that need it come after the builds and
#: the tests that need no model (so a first call without all model parts does those).
STEPS = ["model", "gpu", "install", "exllamav2-build", "kernels-build", "cuda-tests", "loader-test",
         "compare-exl2core", "compat-smollm2", "compare-exllamav2", "compare-table", "compat-tiny"]
NEEDS_MODEL = {"compare-exl2core", "compat-smollm2", "compare-exllamav2", "compare-table", "compat-tiny"}
STEP_LINE = re.compile(r"^step (?P<name>[\w-]+)(?: \((?P<how>[^)]*)\))?: (?P<command>.+)$")


def dry_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "EXL2_DEVICE_STATE": str(tmp_path / "state"), "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], capture_output=True, text=True,
                          env=env, timeout=60, check=False)


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> dict[str, tuple[str, str]]:
    tmp = tmp_path_factory.mktemp("device_check")
    done = dry_run(tmp, str(tmp / "results"))
    assert done.returncode == 0, done.stderr
    assert not (tmp / "state").exists() and not (tmp / "results").exists(), "a dry run must write nothing"
    steps = {}
    for line in done.stdout.splitlines():
        match = STEP_LINE.match(line)
        if match:
            steps[match["name"]] = (match["how"] or "", match["command"])
    return steps


def test_every_step_is_listed_with_a_command(plan):
    assert list(plan) == STEPS
    assert all(command.strip() for _, command in plan.values())
    assert {name for name, (how, _) in plan.items() if "needs the model" in how} == NEEDS_MODEL
    timeouts = {name: int(m[1]) for name, (how, _) in plan.items() if (m := re.search(r"at most (\d+) s", how))}
    assert set(timeouts) == set(STEPS) - {"model", "exllamav2-build"}
    assert all(0 < t <= 300 for t in timeouts.values())


def test_commands_name_files_and_tests_that_exist(plan):
    commands = " ".join(command for _, command in plan.values())
    for path in re.findall(r"\b(?:tests|bench)/[\w./]+\.py\b", commands):
        assert (REPO / path).is_file(), path
    compat = (REPO / "tests" / "test_exllamav2_compat.py").read_text()
    assert "def test_real_model_output_runs_alike_in_exllamav2" in compat
    assert "-k real_model" in plan["compat-smollm2"][1] and "EXL2_COMPAT_MODEL=" in plan["compat-smollm2"][1]
    # the SmolLM2 output the compatibility test loads is the one the exl2core comparison writes
    work = re.search(r"--work (\S+)", plan["compare-exl2core"][1])[1]
    model = re.search(r"EXL2_COMPAT_MODEL=(\S+)", plan["compat-smollm2"][1])[1]
    bits = re.search(r"--bits (\S+)", plan["compare-exl2core"][1])[1]
    assert model == f"{work}/exl2core/{bits}/model"
    assert "EXL2_EXLLAMAV2_WHEEL=" in plan["loader-test"][1] and "exllamav2-0.3.2" in plan["loader-test"][1]
    assert "--no-index" in plan["install"][1]  # the device has no network
    for test_file in sorted((REPO / "tests").glob("test_*.py")):  # every test that can use the GPU runs
        if test_file.name != Path(__file__).name and "torch.cuda.is_available()" in test_file.read_text():
            assert f"tests/{test_file.name}" in commands, f"no step runs {test_file.name}"


def _compare_parser():
    spec = importlib.util.spec_from_file_location("compare_exllamav2", REPO / "bench" / "compare_exllamav2.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        return module.build_parser()
    finally:
        del sys.modules[spec.name]


@pytest.mark.parametrize("step", ["compare-exl2core", "compare-exllamav2", "compare-table"])
def test_comparison_runs_reduced_settings_its_parser_accepts(plan, step):
    argv = shlex.split(plan[step][1])
    script = argv.index("bench/compare_exllamav2.py")
    args = _compare_parser().parse_args(argv[script + 1:])
    assert args.bits == [4.0] and args.full_bits is None
    assert (args.measurement_rows, args.rows) == (4, 16) and args.eval_rows == 8
    assert args.append_to == "" and args.step_timeout <= 300
    expected_tools = {"compare-exl2core": ["exl2core"], "compare-exllamav2": ["exllamav2"]}
    assert args.tools == expected_tools.get(step, ["exllamav2", "exl2core"])


def test_unknown_option_is_refused(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 2 and "unknown option --bogus" in done.stderr
