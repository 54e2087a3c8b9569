"""The documentation: the site builds with every link and anchor resolving (a broken one fails
the build), the configuration reference is what the schema generates, and the README stays a
front door."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _build(root: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(root / "mkdocs.yml"),
                           "-d", str(out)], capture_output=True, text=True, timeout=300)


def test_the_site_builds_strictly_and_a_broken_link_fails_it(tmp_path):
    pytest.importorskip("mkdocs")
    ok = _build(ROOT, tmp_path / "site")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert (tmp_path / "site" / "extending" / "index.html").exists()
    # The same docs with one broken link: the strict build must fail, naming it.
    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    page = copy / "docs" / "usage.md"
    page.write_text(page.read_text() + "\nSee [the missing page](no-such-page.md).\n")
    bad = _build(copy, tmp_path / "bad")
    assert bad.returncode != 0 and "no-such-page.md" in bad.stdout + bad.stderr


def test_the_configuration_reference_is_generated_from_the_schema():
    from poisongrid.config.reference import render

    text = render()
    assert (ROOT / "docs" / "reference" / "config.md").read_text() == text, \
        "regenerate: python -m poisongrid.config.reference > docs/reference/config.md"
    from poisongrid.config import SCHEMA

    for key in SCHEMA["properties"]:
        assert f"| `{key}` |" in text
    assert "| `cluster.max_runtime` |" in text and "| `datasets.<name>.attacks.<name>.ratio` |" in text


def test_the_readme_is_a_front_door_whose_links_resolve():
    import re

    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 120
    links = re.findall(r"\]\(([^)#]+)", text)
    assert links and all((ROOT / link).exists() for link in links if not link.startswith("http")), links
