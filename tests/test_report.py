"""`snakemake --report`: a tiny grid, then a self-contained HTML report with the tables, figures and captions."""
import json
import re
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

try:
    from test_workflow import TINY, snakemake
except ImportError:  # --import-mode=importlib leaves tests/ off sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_workflow import TINY, snakemake

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_report_has_tables_figures_captions_and_runtimes(tmp_path):
    # TINY plus a second r_reject on the multi scenario, so that an r_reject figure is drawn (and declared).
    # And LfD on the multi scenario: a teacher loss figure.
    cfg = {**TINY, "defenses": {**TINY["defenses"], "badloss_r20": {"detector": "badloss", "remedy": "remove",
                                                                     "r_reject": 0.2, "scenarios": ["multi"]},
                                "lfd": {"detector": "lfd", "remedy": "reweight", "alpha": 0.2, "scenarios": ["multi"]}},
           "defender_models": {"pretrain": {"r_epoch": 0.3, "augment": "none", "record": "eval"},
                               "teacher": {"model": "resnet_s", "epochs": 3, "optimizer": "adam", "lr": 0.01,
                                           "weight_decay": 0}},
           "detectors": {**TINY["detectors"], "lfd": {"type": "teacher_loss"}}}
    cfgfile = tmp_path / "tiny.yaml"
    cfgfile.write_text(yaml.safe_dump(cfg))
    snakemake(tmp_path, "all", "--configfile", str(cfgfile))
    res = tmp_path / "results"
    figures = ["fig_asr_digits_multi.png", "fig_asr_digits_single-patch.png", "fig_rreject_digits_multi.png",
               "fig_trajectories_digits_multi_seed0_pretrain.png", "fig_trajectories_digits_single-patch_seed0_pretrain.png",
               "fig_teacher_digits_multi_seed0_teacher.png", "fig_singlemulti_digits_all.png", "fig_headline_digits_multi.png"]
    # Every figure aggregate draws is a declared output, and nothing it draws is left undeclared.
    assert sorted(p.name for p in (res / "figures").iterdir()) == sorted(figures)
    tables = (res / "tables.html").read_text(encoding="utf-8")
    assert tables.startswith("<!DOCTYPE html>") and "<h3>digits — multi</h3>" in tables
    # multi (Table 2 shape), single attack (Table 1 shape), single-patch, single vs multi (Fig. 10),
    # plain-trigger ASR, the cost of each defense, rejection by class size (multi, single-patch).
    # The answer first: the headline table (every defense, the best marked) and its figure, embedded.
    assert tables.index("<h3>digits — the answer: all attacks at once (multi)</h3>") < tables.index("<h3>digits — multi</h3>")
    assert tables.count("data:image/png;base64,") == 1
    assert tables.count("<table>") == 9 and "<td>badloss_r20</td>" in tables and "<td>lfd</td>" in tables
    for h in ("single attack (Table 1 shape)", "single vs multi-attack ASR", "cost of each defense",
              "multi: rejection by class size", "single-patch: rejection by class size"):
        assert f"<h3>digits — {h}</h3>" in tables, h
    # One seed: values without a fake ± 0, and n=1 said.
    assert "n=1 seed" in tables and "±" not in tables.split("<tbody>")[1].split("</tbody>")[0]
    assert "Avg. ASR plain" in tables and "Avg. ASR boosted†" in tables
    sections = {k: (res / f"tables_{k}.html").read_text(encoding="utf-8")
                for k in ("headline", "multi", "single", "singlemulti", "cost", "rejection")}
    assert sections["headline"].count("<table>") == 1 and "data:image/png;base64," in sections["headline"]
    assert sections["rejection"].count("<table>") == 2
    assert sections["multi"].count("<table>") == 1 and "<h3>digits — multi</h3>" in sections["multi"]
    assert "<h3>digits — single attack (Table 1 shape)</h3>" in sections["single"]
    assert sections["singlemulti"].count("<table>") == 1 and sections["cost"].count("<table>") == 1
    per_seed = (res / "tables_per_seed.md").read_text()
    assert "### digits — multi, per seed" in per_seed and "| none | 0 |" in per_seed
    assert set(pd.read_csv(res / "summary_stats.csv")["n"]) == {1}

    out = snakemake(tmp_path, "--configfile", str(cfgfile), "--report", "report.html")
    report = tmp_path / "report.html"
    assert report.is_file(), out.stdout[-2000:] + out.stderr[-2000:]
    size = report.stat().st_size
    assert 300_000 < size < 30_000_000, size
    html = report.read_text(encoding="utf-8")
    assert html.lstrip().lower().startswith("<!doctype html")
    # Self-contained: no script, stylesheet or image is fetched from elsewhere; results are embedded as data URIs.
    assert not re.search(r"<(?:script|img|iframe)[^>]*\ssrc=[\"']?(?:https?:)?//", html, re.I)
    assert not re.search(r"<link[^>]*\shref=[\"']?(?:https?:)?//", html, re.I)
    assert html.count("data:image/png") >= len(figures) and "data:text/html" in html

    for name in [*figures, "tables.html", "summary.csv", "summary_stats.csv", "tables_per_seed.md",
                 *[f"tables_{k}.html" for k in ("headline", "multi", "single", "singlemulti", "cost", "rejection")]]:
        assert f'"{name}"' in html, name
    categories = re.search(r"var categories = (\{.*?\});", html).group(1)
    cats = list(json.loads(categories))
    # A section per analysis; the report lists them sorted, so their numbers give the order: tables first.
    assert sorted(cats) == ["0 The answer", "1 Multi-attack (Table 2)", "2 Single-attack (Table 1)", "3 Single vs multi-attack",
                            "4 r_reject", "6 Trajectories", "7 LfD teacher losses", "8 Cost",
                            "9 All tables and downloads"], cats
    # The front page (shown first) opens on the answer: the headline table and its figure.
    front = json.loads(re.search(r"var workflow_desc = (.*?);\n", html).group(1))
    assert "<h3>digits — the answer: all attacks at once (multi)</h3>" in front and front.count("<table>") == 1
    assert "data:image/png;base64," in front
    check_in_browser([(report, "the answer"), (res / "tables.html", "the answer")])
    # Captions from workflow/report/*.rst (rendered to HTML, so compare their first words).
    for rst in ("workflow", "headline", "tables_headline", "asr", "rreject", "tables", "trajectories", "teacher",
                "singlemulti", "tables_multi",
                "tables_single", "tables_singlemulti", "tables_cost", "tables_rejection"):
        words = (ROOT / "workflow/report" / f"{rst}.rst").read_text().split()[:6]
        assert " ".join(words) in html, rst
    # Snakemake's own per-rule runtimes.
    runtimes = re.search(r"var runtimes_spec = (\{.*?\});\s*</script>", html, re.S).group(1)
    for rule in ("poison", "pretrain", "train", "evaluate", "aggregate"):
        assert f'"rule": "{rule}"' in runtimes, rule


CHROMIUM = "/usr/bin/chromium"
WIDTHS = (1280, 1440, 1920)


def check_in_browser(pages: list[tuple[Path, str]], column: str = "Mean ASR, boosted") -> None:
    """Each page in a real browser (headless Chromium) at each width: the headline table's first
    column and its figure lie inside the viewport, not under the navigation or off to the left.
    Skipped without Chromium, unless POISONGRID_BROWSER_TESTS=required (CI installs it and sets it)."""
    import os

    required = os.environ.get("POISONGRID_BROWSER_TESTS") == "required"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            raise
        pytest.skip("playwright is not installed")
    if not Path(CHROMIUM).exists():
        if required:
            raise AssertionError(f"{CHROMIUM} missing (apt-get install chromium)")
        pytest.skip("no Chromium at /usr/bin/chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            for path, heading in pages:
                for width in WIDTHS:
                    page = browser.new_page(viewport={"width": width, "height": 900})
                    page.goto(path.resolve().as_uri())
                    h3 = page.locator("h3", has_text=heading).first
                    h3.wait_for(state="visible", timeout=30_000)
                    table = page.locator("table").filter(has=page.locator("th", has_text=column)).first
                    first = table.locator("tr").nth(1).locator("td").first  # the first defense's name
                    first.scroll_into_view_if_needed()
                    box = first.bounding_box()
                    assert box is not None, (path.name, width)
                    # Inside the viewport, and not covered by anything (the report's navigation panel).
                    assert 0 <= box["x"] and box["x"] + box["width"] <= width, (path.name, width, box)
                    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
                    on_top = page.evaluate("([x, y]) => document.elementFromPoint(x, y)?.closest('td')?.textContent", [cx, cy])
                    assert on_top is not None and on_top.strip() == first.text_content().strip(), (path.name, width, on_top)
                    img = page.locator("img[alt*='mean ASR against clean accuracy']")
                    if column == "Mean ASR, boosted":
                        img.first.scroll_into_view_if_needed()
                        ib = img.first.bounding_box()
                        assert ib is not None and ib["width"] > 200 and 0 <= ib["x"] and ib["x"] + ib["width"] <= width, \
                            (path.name, width, ib)
                    page.close()
        finally:
            browser.close()
