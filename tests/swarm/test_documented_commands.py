"""The documentation stays true to the code: every `python -m <module>` command that README.md and
docs/*.md show in code answers `--help`, the README stays short, and every relative link points to
a file that exists.

Only the markdown is read here; the commands run as subprocesses (`<this python> -m <module> --help`),
in parallel threads. It does not check what a command does beyond printing its usage.
"""

from __future__ import annotations

import concurrent.futures
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOC_FILES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250
HELP_TIMEOUT_S = 120

MAIN_COMMANDS = {
    "swarm.peer", "swarm.dht", "swarm.api", "swarm.dashboard", "swarm.plan", "swarm.hw", "swarm.demo",
    "client.finetune",
}
# Commands the docs may show that take no --help, each with the reason. Empty: all of them do.
NO_HELP: dict[str, str] = {}

FENCED_BLOCK = re.compile(r"^```[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
CODE_SPAN = re.compile(r"`((?:[^`\n]|\n(?!\n))+)`")  # may wrap onto the next line, not across paragraphs
PYTHON_M = re.compile(r"\bpython3?\s+-m\s+([A-Za-z_][\w.]*)")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def code_in(markdown: str) -> list[str]:
    """The text of every fenced code block and every inline code span."""
    blocks = FENCED_BLOCK.findall(markdown)
    prose = FENCED_BLOCK.sub("", markdown)
    return blocks + CODE_SPAN.findall(prose)


def documented_modules() -> dict[str, list[str]]:
    """module -> the markdown files that show `python -m module` in code."""
    found: dict[str, list[str]] = {}
    for path in DOC_FILES:
        for code in code_in(path.read_text(encoding="utf-8")):
            for module in PYTHON_M.findall(code):
                files = found.setdefault(module.rstrip("."), [])
                if path.name not in files:
                    files.append(path.name)
    return found


def run_help(module: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=HELP_TIMEOUT_S,
    )


def test_docs_show_the_main_commands():
    modules = documented_modules()
    assert modules, "no `python -m ...` command found in README.md or docs/*.md"
    missing = MAIN_COMMANDS - set(modules)
    assert not missing, f"the docs never show these commands: {sorted(missing)}"


def test_every_documented_command_answers_help():
    modules = sorted(set(documented_modules()) - set(NO_HELP))
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(modules)) as pool:
        results = dict(zip(modules, pool.map(run_help, modules)))
    failures = []
    for module, result in results.items():
        usage = result.stdout.strip()
        if result.returncode != 0 or "usage" not in usage.lower():
            where = ", ".join(documented_modules()[module])
            failures.append(
                f"python -m {module} --help (shown in {where}): exit {result.returncode}, "
                f"stdout {usage[:200]!r}, stderr {result.stderr.strip()[-400:]!r}"
            )
    assert not failures, "\n".join(failures)


def test_readme_is_short():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/ (limit {README_MAX_LINES})"


def test_relative_links_point_to_existing_files():
    broken = []
    for path in DOC_FILES:
        prose = CODE_SPAN.sub("", FENCED_BLOCK.sub("", path.read_text(encoding="utf-8")))
        for target in LINK.findall(prose):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL (http:, mailto:) or an anchor in the same page
            if not (path.parent / target.split("#", 1)[0]).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)
