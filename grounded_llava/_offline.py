"""Keep ultralytics from reaching the network: it is used here only as a component (Detect head + loss).

Runs at package import, before ultralytics is imported: sets `YOLO_OFFLINE=1` and `YOLO_VERBOSE=False`
(its info lines, such as the first run's settings banner, say nothing about our model; its warnings stay)
unless the user chose otherwise, and gives ultralytics a local TTF as its `Arial.ttf` (it would otherwise download one to
draw labels) by copying matplotlib's DejaVuSans into ultralytics' config directory.
"""

import os
import shutil
import tempfile
from pathlib import Path


def prepare_ultralytics() -> None:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    config_dir = Path(
        os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(tempfile.gettempdir()) / "grounded_llava_yolo"))
    )
    font = config_dir / "Ultralytics" / "Arial.ttf"
    if font.exists():
        return
    try:
        import matplotlib

        source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        font.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, font)
    except OSError:
        pass  # plotting through ultralytics would then try to download; nothing here needs it


prepare_ultralytics()
