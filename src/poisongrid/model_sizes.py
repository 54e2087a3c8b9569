"""Parameter counts of registered models, remembered on disk so a config check (LfD's teacher
smaller than its student) imports torch only the first time."""
from __future__ import annotations

from .zoo import MODELS


def parameter_count(name: str, num_classes: int = 10, image_size: int = 32, cache_dir=None) -> int:
    """models.parameter_count, remembered in `cache_dir`/model-sizes.json under the code that defines
    the models (models.py's contents, the torch and torchvision versions): the config check of LfD
    teachers then imports torch only the first time. Without cache_dir, or for a model registered
    elsewhere, it is computed."""
    if cache_dir is None or MODELS.module_of(name) != "poisongrid.models":
        from .models import parameter_count as count

        return count(name, num_classes, image_size)
    import json
    from pathlib import Path

    from .io import atomic_path

    path = Path(cache_dir) / "model-sizes.json"
    key = f"{_models_code()}/{name}/{num_classes}/{image_size}"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict) or not isinstance(known.get(key), int):
        from .models import parameter_count as count

        known = known if isinstance(known, dict) else {}
        known[key] = count(name, num_classes, image_size)
        try:
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(known, indent=1, sort_keys=True) + "\n")
        except OSError:  # a read-only data folder only means no cache
            pass
    return known[key]


def _models_code() -> str:
    import hashlib
    from importlib.metadata import version
    from pathlib import Path

    h = hashlib.sha256(Path(__file__).with_name("models.py").read_bytes())
    h.update(f"torch {version('torch')} torchvision {version('torchvision')}".encode())
    return h.hexdigest()[:16]
