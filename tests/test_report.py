"""`snakemake --report`: a tiny grid, then a self-contained HTML report with the tables, figures and captions."""
import re
import sys
from pathlib import Path

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
               "fig_teacher_digits_multi_seed0_teacher.png", "fig_singlemulti_digits_all.png"]
    # Every figure aggregate draws is a declared output, and nothing it draws is left undeclared.
    assert sorted(p.name for p in (res / "figures").iterdir()) == sorted(figures)
    tables = (res / "tables.html").read_text(encoding="utf-8")
    assert tables.startswith("<!DOCTYPE html>") and "<h3>digits — multi</h3>" in tables
    # multi, single-patch, plain-trigger ASR, single vs multi (Fig. 10), the cost of each defense.
    assert tables.count("<table>") == 5 and "<td>badloss_r20</td>" in tables and "<td>lfd</td>" in tables
    assert "<h3>digits — single vs multi-attack ASR</h3>" in tables and "<h3>digits — cost of each defense</h3>" in tables

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

    for name in [*figures, "tables.html", "summary.csv"]:
        assert f'"{name}"' in html, name
    categories = re.search(r"var categories = (\{.*?\});", html).group(1)
    for cat in ("Tables", "ASR", "r_reject", "Trajectories", "LfD teacher losses", "Single vs multi-attack"):
        assert f'"{cat}"' in categories, (cat, categories)
    # Captions from workflow/report/*.rst (rendered to HTML, so compare their first words).
    for rst in ("workflow", "asr", "rreject", "tables", "trajectories", "teacher", "singlemulti"):
        words = (ROOT / "workflow/report" / f"{rst}.rst").read_text().split()[:6]
        assert " ".join(words) in html, rst
    # Snakemake's own per-rule runtimes.
    runtimes = re.search(r"var runtimes_spec = (\{.*?\});\s*</script>", html, re.S).group(1)
    for rule in ("poison", "pretrain", "train", "evaluate", "aggregate"):
        assert f'"rule": "{rule}"' in runtimes, rule
