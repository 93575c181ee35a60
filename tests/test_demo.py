"""The demo's whole pipeline in its --quick form: data, training, evaluation, pictures, summary."""
import json

from pixelwise.cli import main


def test_demo_quick_writes_everything(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["iou"]) == 6
    # the figures are the best checkpoint's on the val split, as `pixelwise evaluate` computes them...
    from pixelwise.engine.evaluate import evaluate_checkpoint

    again = evaluate_checkpoint(out / "run" / "best.pt", out / "data", "val", progress=False)
    assert again["miou"] == m["miou"] and again["confusion"] == m["confusion"]
    # ...and the model learned: better than painting every pixel with the most frequent class
    import numpy as np

    conf = np.asarray(m["confusion"], dtype=np.float64)
    baseline = conf.sum(1).max() / conf.sum() / len(m["iou"])  # mIoU of the constant prediction
    assert m["miou"] > 2 * baseline and m["pixel_accuracy"] > conf.sum(1).max() / conf.sum()
    for f in ("run/best.pt", "run/last.pt", "run/metrics.jsonl", "confusion_matrix.png", "curves.png",
              "val_grid.png", "SUMMARY.txt", "run/report.html"):
        assert (out / f).is_file(), f
    assert len(list((out / "predictions").glob("*_overlay.png"))) == 4
    text = capsys.readouterr().out
    assert "Look at:" in text and "val_grid.png" in text and "report.html" in text
    assert "mean IoU" in (out / "run" / "report.html").read_text()  # the report of the demo's run
