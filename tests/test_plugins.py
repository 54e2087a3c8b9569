"""Plug-ins kept outside the package: an installed distribution's entry points (one group per
registry) make its detectors, remedies, attacks, models and datasets usable by name, imported only
when a config names them; a broken one is refused in one line naming its entry point."""
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from test_defenses import CELL, score_planted
from poisongrid.detectors import DETECTORS, read_scores
from poisongrid.errors import ConfigError

DOCS = Path(__file__).parents[1] / "docs" / "extending.md"


def _python_blocks(path) -> list[str]:
    """The ```python blocks of a Markdown page, in order."""
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


# The worked example of docs/extending.md, exactly as printed there.
PLUGIN = _python_blocks(DOCS)[0]


def _install(root, entry_points: str, module: str = PLUGIN):
    """A distribution as pip leaves it in site-packages: its module and a dist-info with entry points."""
    (root / "lab_plugins.py").write_text(module)
    info = root / "lab_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lab-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    return root


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    (tmp_path / "site").mkdir()
    root = _install(tmp_path / "site", "[poisongrid.detectors]\nlab_last_loss = lab_plugins:LastLoss\n"
                    "lab_broken = lab_plugins_missing:Nothing\n")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(DETECTORS, "_plugins", None)  # found again with the new path
    yield root
    sys.modules.pop("lab_plugins", None)
    DETECTORS._items.pop("lab_last_loss", None)
    DETECTORS._plugins = None


def test_a_detector_from_an_entry_point_scores_like_a_built_in_one(plugin_path, tmp_path):
    assert "lab_last_loss" in DETECTORS and "lab_last_loss" in DETECTORS.names()
    assert "lab_plugins" not in sys.modules  # found, not imported
    _, poisoned = score_planted(tmp_path, {"detector": "lab", "type": "lab_last_loss", "model": "m"}, 4)
    df, meta = read_scores(tmp_path / "s.parquet")
    from sklearn.metrics import roc_auc_score

    assert meta["detector"] == "lab_last_loss" and meta["cell"]["dataset"] == CELL["dataset"]
    assert roc_auc_score(poisoned, df.sort_values("index")["score"].to_numpy()) > 0.95


def test_a_broken_plug_in_is_refused_naming_its_entry_point(plugin_path):
    with pytest.raises(ConfigError) as e:
        DETECTORS.get("lab_broken", "detectors.x.type")
    msg = str(e.value)
    assert "lab_broken = lab_plugins_missing:Nothing" in msg and "poisongrid.detectors" in msg and "\n" not in msg


def test_a_config_names_the_plug_in_and_validates_in_a_fresh_process(tmp_path):
    root = tmp_path / "site"
    root.mkdir()
    _install(root, "[poisongrid.detectors]\nlab_last_loss = lab_plugins:LastLoss\n")
    cfg = {"datasets": {"digits": {"model": "smallcnn", "epochs": 2, "scenarios": ["single-patch"],
                                   "attacks": {"patch": {"ratio": 0.05}}}},
           "detectors": {"mine": {"type": "lab_last_loss"}},
           "defenses": {"none": {"remedy": "none"}, "mine": {"detector": "mine", "remedy": "remove"}}}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(cfg))
    p = subprocess.run([sys.executable, "-m", "poisongrid.cli", "validate", "g.yaml"], cwd=tmp_path, capture_output=True,
                       text=True, env=_pkg_env(root))
    assert p.returncode == 0, p.stderr
    assert "valid" in p.stdout
    cfg["detectors"]["mine"]["type"] = "lab_typo"
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(cfg))
    p = subprocess.run([sys.executable, "-m", "poisongrid.cli", "validate", "g.yaml"], cwd=tmp_path, capture_output=True,
                       text=True, env=_pkg_env(root))
    assert p.returncode == 2 and "lab_last_loss" in p.stderr  # the plug-in is among the names offered


def _pkg_env(root):
    """The environment of a fresh process that has the plug-in installed beside this poisongrid."""
    import os
    from pathlib import Path

    import poisongrid

    src = str(Path(poisongrid.__file__).parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), src])}


def test_the_remedy_example_of_the_docs_weighs_as_it_says(tmp_path):
    import numpy as np
    import pyarrow as pa

    namespace: dict = {}
    exec(compile(_python_blocks(DOCS)[1], "extending.md", "exec"), namespace)
    remedy = namespace["RemoveHalfWeight"](r_reject=0.2)
    scores = np.arange(10, dtype=np.float64)  # example 9 is the most suspicious
    bona = np.zeros(10, bool)
    bona[9] = True  # never removed, whatever its score
    w = remedy.weights(scores, pa.table({"bona_fide": bona}), {})
    assert w.tolist() == [1, 1, 1, 1, 1, 0.5, 0.5, 0, 0, 1]  # 8, 7 dropped; 6, 5 halved; 9 bona fide
