"""The layout's rules, machine-checked: the import contract (import-linter, configured in
pyproject.toml), every module of swarm/ classified as contract or not, ruff clean, and mypy clean
on the contract. Unit tests: no sockets."""

from __future__ import annotations

import pkgutil
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# swarm/'s modules that are not the contract: thin entrypoints, their shared helpers, applications, tools
NOT_CONTRACT = {"swarm.cli", "swarm.demo", "swarm.dht", "swarm.hw", "swarm.peer", "swarm.plan", "swarm.api", "swarm.dashboard", "swarm.tools"}


def _importlinter_contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def contract_modules() -> list[str]:
    (contract,) = [entry for entry in _importlinter_contracts() if entry["name"].startswith("The contract imports")]
    return contract["source_modules"]


def _tool(name: str) -> str:
    """A console script installed beside this interpreter (the project's venv), else on PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run `make install` (requirements.txt pins it)")
    return found


def _run(command: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)


def test_every_swarm_module_is_either_contract_or_entrypoint_application_or_tool():
    import swarm

    top_level = {f"swarm.{info.name}" for info in pkgutil.iter_modules(swarm.__path__)}
    contract = set(contract_modules())
    assert not contract & NOT_CONTRACT
    unclassified = top_level - contract - NOT_CONTRACT
    assert not unclassified, f"classify these in pyproject.toml's import contract or in NOT_CONTRACT: {sorted(unclassified)}"
    assert not (contract | NOT_CONTRACT) - top_level, "a listed module no longer exists"


def test_import_contract_holds():
    result = _run([_tool("lint-imports"), "--no-cache"], timeout_s=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "broken" in result.stdout and " 0 broken" in result.stdout


def test_ruff_is_clean():
    result = _run([_tool("ruff"), "check", "swarm", "peers", "client", "tests", "benchmarks"], timeout_s=120)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


@pytest.mark.timeout(600)
@pytest.mark.slow
def test_mypy_is_clean_on_the_contract():
    files = [str(Path(*module.split(".")).with_suffix(".py")) for module in contract_modules()]
    result = _run([_tool("mypy"), *files], timeout_s=540)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def test_entrypoints_that_limit_openmp_spinning_load_no_torch_before_they_do():
    """libgomp reads GOMP_SPINCOUNT when torch loads it: `swarm.cli.limit_openmp_spinning` works only if the
    entrypoint (and the config it parses first) has not imported torch yet."""
    modules = ["swarm.cli", "swarm.settings", "swarm.config", "swarm.peer", "swarm.api.app", "swarm.api.config", "swarm.demo"]
    code = f"import sys\nfor name in {modules!r}:\n    __import__(name)\nprint(sorted(m for m in ('torch', 'hivemind') if m in sys.modules))"
    result = _run([sys.executable, "-c", code], timeout_s=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr[-2000:]
