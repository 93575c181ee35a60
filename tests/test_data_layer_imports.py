"""The data layer imports nothing above it: the panoptic PNG/id codec and JSON tables live
in data/formats/coco_panoptic.py, and the metrics import them from there."""
from __future__ import annotations

import ast
from pathlib import Path

import pixelwise

ABOVE_DATA = ("metrics", "models", "postprocess", "tasks", "engine", "api", "cli", "report", "serve", "export",
              "inference")


def imported_modules(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            out += [f"{node.module}.{a.name}" for a in node.names]
    return out


def test_data_imports_no_upper_layer():
    root = Path(pixelwise.__file__).parent / "data"
    files = sorted(root.rglob("*.py"))
    assert any(f.name == "coco_panoptic.py" for f in files)
    bad = [f"{f.relative_to(root.parent)}: {m}" for f in files for m in imported_modules(f)
           if m.split(".")[0] == "pixelwise" and len(m.split(".")) > 1 and m.split(".")[1] in ABOVE_DATA]
    assert not bad, "the data layer imports from above it:\n" + "\n".join(bad)


def test_metrics_reuse_the_data_codec():
    """One implementation: the names metrics.panoptic re-exports are the data layer's."""
    from pixelwise.data.formats import coco_panoptic as fmt
    from pixelwise.metrics import panoptic

    assert panoptic.rgb2id is fmt.rgb2id and panoptic.id2rgb is fmt.id2rgb
    assert panoptic._read_id_png is fmt.read_panoptic_png and panoptic._decode_png is fmt.decode_panoptic_png
    assert panoptic._Segments is fmt.SegmentsInfo
