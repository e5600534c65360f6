"""The front door works: the README's Python quickstart runs and prints what the README shows, and every
link in the README and the docs resolves (files, and the headings anchors name)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "tests" / "README.md", REPO / "cluster" / "README.md",
         *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# what the quickstart prints: the plan, one block plan per forward block; then its timing and error
PLAN_LINE = re.compile(r"(\d+:(sequential|(jacobi|gs_jacobi/L\d+|sliding/W\d+)/(z|zeros)/tol[0-9.e-]+\S*)(, |$)){4}")
TIMING_LINE = re.compile(r"sequential (\d+\.\d\d)s, plan (\d+\.\d\d)s: (\d+\.\d)x, max \|error\| (\d\.\de[-+]\d\d)")


def _section(text: str, heading: str) -> str:
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    targets = LINK.findall(text)
    broken = []
    for target in targets:
        if re.match(r"[a-z]+:", target):  # https:, mailto: (no network here)
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(f"{target}: no {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)
    if page.name == "README.md" and page.parent == REPO:
        assert len(targets) >= 10, "the front door links to the docs"


def test_the_readme_is_a_front_door():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 190
    for heading in ("Headline figures", "Install and the two commands", "Python quickstart", "Documentation"):
        assert f"\n## {heading}\n" in text


@pytest.mark.slow
def test_the_quickstart_runs_and_prints_what_the_readme_shows():
    section = _section((REPO / "README.md").read_text(), "Python quickstart")
    code, shown = re.findall(r"```(?:python|text)\n(.*?)```", section, flags=re.S)
    shown = shown.strip().splitlines()
    assert len(shown) == 2 and PLAN_LINE.fullmatch(shown[0]) and TIMING_LINE.fullmatch(shown[1]), \
        "the README shows the output this test checks for"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", "import torch; torch.set_num_threads(1)\n" + code], env=env,
                          capture_output=True, text=True, timeout=1200, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout.strip().splitlines()
    assert len(printed) == 2 and PLAN_LINE.fullmatch(printed[0]), printed
    timing = TIMING_LINE.fullmatch(printed[1])
    assert timing, printed
    assert float(timing.group(4)) <= 1e-3, "the auto plan keeps every image within its tol of sequential"
