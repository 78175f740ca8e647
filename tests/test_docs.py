"""The README is a first screen, and every guide it links exists."""
from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_readme_is_one_screenful_of_guides():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    for command in ("python -m kindjax.main --config configs/default.py --workdir workdirs/default",
                    "pip install -e '.[test]' && python -m pytest -q"):
        assert command in text


def test_the_ci_runs_the_readmes_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^pip install -e '\.\[test\]' && (python -m pytest[^\n]*)$", readme, re.M).group(1)
    assert command in ci


def test_every_linked_file_exists():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name} links {target}, which does not exist"
