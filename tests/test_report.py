"""Run reports (pixelwise.report): report.html with inlined PNGs, the confusion matrix, per-class
plots and val grids for semantic / instance / panoptic runs; `pixelwise report`; `--set`
overrides into config.json and the checkpoint; `pixelwise evaluate --out` plots."""
from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pixelwise.cli import main
from pixelwise.data.synthetic import generate_shapes

pytest.importorskip("matplotlib")

TINY_FCN = ["--model", "fcn8s", "--model-arg", "width=0.125", "--model-arg", "backbone=vgg16_bn"]
TINY_DET = dict(preset="cpu", fpn_channels=16, mask_head_channels=8, box_head_dim=32, min_size=64, max_size=64,
                rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=50,
                rpn_post_nms_top_n_test=20, box_batch_size_per_image=32, rpn_batch_size_per_image=32,
                anchor_sizes=[8, 16, 32, 64, 128])
SIZE, NUM_VAL = 48, 3
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("rep") / "shapes", num_train=4, num_val=NUM_VAL, size=SIZE, seed=1)


@pytest.fixture(scope="module")
def sem_run(data, tmp_path_factory) -> Path:
    """Two epochs of a tiny FCN-8s through the CLI, with a config file, flags and --set (the
    precedence chain) and --tensorboard; the report is written at the end by default."""
    tmp = tmp_path_factory.mktemp("rep")
    conf = tmp / "conf.yaml"
    conf.write_text("model: fcn8s\nepochs: 5\nbatch_size: 2\nlr: 0.5\noptimizer: adamw\nseed: 7\n")
    out = tmp / "run"
    assert main(["train", "--config", conf, *TINY_FCN, "--data", data, "--out", out, "--epochs", "2",
                 "--lr", "0.1", "--num-workers", "0", "--quiet", "--tensorboard",
                 "--set", "lr=2e-3", "--set", "model_kwargs.width=0.125", "--set", "weight_map.w0=5",
                 "--set", "loss=ce"]) == 0
    return out


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def _cells(page: str, table_id: str) -> list[dict]:
    table = re.search(rf'<table id="{table_id}">(.*?)</table>', page, re.S).group(1)
    return [{"key": html.unescape(k), "epoch": e, "value": json.loads(html.unescape(v))}
            for k, e, v in re.findall(r'<td data-key="([^"]*)"(?: data-epoch="([^"]*)")? data-value="([^"]*)"', table)]


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _check_page(run: Path, figures: list[str]) -> str:
    """report.html is self-contained, inlines exactly ``figures`` (valid PNGs, plausible sizes)
    and its per-epoch table holds exactly the numbers of metrics.jsonl."""
    page = (run / "report.html").read_text()
    assert not re.search(r'(src|href)="(?!data:)', page), "report.html must not load anything from outside"
    inlined = _images(page)
    assert len(inlined) == len(figures)
    for raw, name in zip(inlined, figures):
        assert raw.startswith(PNG) and raw == (run / name).read_bytes(), name
        w, h = Image.open(io.BytesIO(raw)).size
        assert 100 <= w <= 4000 and 100 <= h <= 4000, (name, w, h)
    history = _history(run)
    cells = _cells(page, "history")
    for rec in history:
        row = {c["key"]: c["value"] for c in cells if c["epoch"] == str(rec["epoch"])}
        scalars = {k: v for k, v in rec.items() if not isinstance(v, (list, dict))}
        assert {k: row[k] for k in scalars} == scalars
    return page


def test_semantic_report(sem_run, data):
    from pixelwise.data.classes import load_classes
    from pixelwise.data.io import read_label
    from pixelwise.engine.checkpoint import load_checkpoint, model_from_checkpoint
    from pixelwise.engine.evaluate import predict_labels
    from pixelwise.engine.common import open_dataset
    from pixelwise.data.transforms import build_transforms
    from pixelwise.viz import colorize

    page = _check_page(sem_run, ["curves.png", "confusion_matrix.png", "per_class_iou.png", "val_grid.png"])
    # the final metrics are those of best.pt on val: the same numbers as its epoch in metrics.jsonl
    best = [h for h in _history(sem_run) if h.get("best")][-1]
    final = {c["key"]: c["value"] for c in _cells(page, "final-metrics")}
    for k in ("miou", "pixel_accuracy", "mean_accuracy", "fwiou"):
        assert final[k] == pytest.approx(best[k], abs=1e-12), k
    # the confusion matrix counts every non-ignored val pixel once
    m = json.loads((sem_run / "report_metrics.json").read_text())
    ids = (data / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    labels = [read_label(data / "SegmentationClass" / f"{i}.png") for i in ids]
    assert np.asarray(m["confusion"]).sum() == sum(int((lab != 255).sum()) for lab in labels)
    assert m["miou"] == pytest.approx(best["miou"], abs=1e-12)
    # class names on the page; the resolved config printed is config.json
    for name in ("sky", "grass", "water", "circle", "rectangle", "triangle"):
        assert name in page
    conf = yaml.safe_load(html.unescape(re.search(r'<pre id="config">(.*?)</pre>', page, re.S).group(1)))
    assert conf == json.loads((sem_run / "config.json").read_text())

    # val_grid.png: a title band, then per val image: image | ground truth | prediction (x5 enlarged)
    grid = np.asarray(Image.open(sem_run / "val_grid.png").convert("RGB"))
    k, gap, band = 5, 4, 14
    side = SIZE * k
    assert grid.shape == (band + NUM_VAL * side + (NUM_VAL - 1) * gap, 3 * side + 2 * gap, 3)
    colors = [c.color for c in load_classes(data / "classes.json")]
    ckpt = load_checkpoint(sem_run / "best.pt")
    model = model_from_checkpoint(ckpt).eval()
    ds = open_dataset(data, "val", build_transforms(train=False, mean=ckpt["normalization"]["mean"],
                                                    std=ckpt["normalization"]["std"]))
    for row, i in enumerate(ids):
        top = band + row * (side + gap)
        gt = grid[top:top + side:k, side + gap:2 * side + gap:k]
        assert (gt == colorize(labels[row], colors)).all()
        pred = predict_labels(model, ds[row]["image"][None])[0].numpy()
        assert (grid[top:top + side:k, 2 * (side + gap):3 * side + 2 * gap:k] == colorize(pred, colors)).all()


def test_set_overrides_reach_config_json_and_checkpoint(sem_run):
    """defaults < config file < flags < --set: epochs from the flag (file says 5), lr from --set
    (file 0.5, flag 0.1), seed from the file; dotted keys create and fill mappings."""
    saved = json.loads((sem_run / "config.json").read_text())
    ckpt = torch.load(sem_run / "last.pt", weights_only=False)
    for conf in (saved, ckpt["config"]):
        assert conf["lr"] == 0.002 and conf["epochs"] == 2 and conf["seed"] == 7 and conf["batch_size"] == 2
        assert conf["model_kwargs"] == {"width": 0.125, "backbone": "vgg16_bn"}
        assert conf["weight_map"] == {"w0": 5} and conf["loss"] == "ce"
        assert conf["tensorboard"] is True
    assert ckpt["model"]["kwargs"] == {"width": 0.125, "backbone": "vgg16_bn"}
    assert ckpt["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(0.002)


def test_set_parsing_and_errors(capsys):
    from pixelwise.engine.config import TrainConfig, apply_overrides, parse_set
    from pixelwise.errors import PixelwiseError

    assert parse_set("lr=1e-3") == (["lr"], 0.001)  # YAML 1.1 would leave "1e-3" a string
    assert parse_set("model_kwargs.atrous_rates=[2, 4, 6]") == (["model_kwargs", "atrous_rates"], [2, 4, 6])
    assert parse_set("elastic={sigma: 8, grid: 3}") == (["elastic"], {"sigma": 8, "grid": 3})
    assert parse_set("crop_size=") == (["crop_size"], None)
    assert parse_set("data=a=b") == (["data"], "a=b")
    cfg = apply_overrides(TrainConfig(model_kwargs={"width": 0.5}),
                          ["model_kwargs.backbone=resnet18", "epochs=3", "lr=1", "flip=false", "device=0",
                           "class_weights=[1, 2]", "model_kwargs.width=0.25"])
    assert cfg.model_kwargs == {"width": 0.25, "backbone": "resnet18"} and cfg.epochs == 3
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.flip is False and cfg.device == "0"
    assert cfg.class_weights == [1, 2]
    for bad, msg in (("nope=1", "unknown config key 'nope'; valid keys: amp, aux_weight"),
                     ("epochs=ten", "epochs takes a whole number"), ("flip=1", "flip takes true or false"),
                     ("lr.x=1", "lr is 0.01, not a mapping"), ("lr", "expected KEY=VALUE"),
                     ("mean=[1,", "not valid YAML"), ("model_kwargs=3", "model_kwargs takes a mapping")):
        with pytest.raises(PixelwiseError, match=re.escape(msg)):
            apply_overrides(TrainConfig(), [bad])
    # on the command line: one line, exit code 2, before any training
    assert main(["train", "--data", "x", "--set", "epochz=3"]) == 2
    assert "unknown config key 'epochz'" in capsys.readouterr().err


def test_report_command_and_evaluate_plots(sem_run, data, tmp_path, capsys):
    (sem_run / "report.html").unlink()
    assert main(["report", sem_run, "--data", data, "--max-images", 2]) == 0
    assert f"report: {sem_run / 'report.html'}" in capsys.readouterr().out
    grid = Image.open(sem_run / "val_grid.png")
    assert grid.size[1] == 14 + 2 * SIZE * 5 + 4  # two rows now
    assert main(["report", tmp_path / "nothing"]) == 2
    assert "run folder not found" in capsys.readouterr().err

    out = tmp_path / "ev" / "metrics.json"
    assert main(["evaluate", "--checkpoint", sem_run / "best.pt", "--data", data, "--out", out, "--quiet"]) == 0
    cm, bars = out.with_name("metrics_confusion_matrix.png"), out.with_name("metrics_per_class_iou.png")
    for p in (cm, bars):
        assert p.read_bytes().startswith(PNG) and min(Image.open(p).size) >= 100
    assert f"plots: {cm}, {bars}" in capsys.readouterr().out


def test_no_report_flag(data, tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY_FCN, "--data", data, "--out", out, "--epochs", "1", "--batch-size", "4",
                 "--num-workers", "0", "--quiet", "--no-report"]) == 0
    assert (out / "best.pt").is_file() and not (out / "report.html").exists()


def test_write_eval_plots_draws_the_row_normalised_matrix(tmp_path):
    """The confusion-matrix picture shows rows normalised to 1: a cell of a rare class at 100 %
    is as dark as one of a frequent class at 100 %."""
    from pixelwise.report import write_eval_plots

    def dark_area(confusion) -> int:
        m = {"confusion": confusion, "iou": [1.0, None], "miou": 1.0, "class_names": ["bg", "thing"]}
        cm, bars = write_eval_plots(m, tmp_path / "e.json")
        assert cm.name == "e_confusion_matrix.png" and Image.open(bars).size[0] >= 300
        rgb = np.asarray(Image.open(cm).convert("RGB")).astype(int)
        return int((np.abs(rgb - [8, 48, 107]).max(axis=2) < 12).sum())  # the darkest blue of "Blues" (1.0)

    one_row, both_rows = dark_area([[1000, 0], [0, 0]]), dark_area([[1000, 0], [0, 3]])
    assert one_row > 1000 and 1.7 * one_row < both_rows < 2.3 * one_row  # two full cells, not one
    assert write_eval_plots({"segm": {}}, tmp_path / "i.json") == []  # instance results: nothing to draw


def test_per_class_mask_ap():
    pytest.importorskip("pycocotools")
    from pixelwise.data.formats.coco import encode_rle
    from pixelwise.report import per_class_mask_ap

    masks = np.zeros((3, 32, 32), np.uint8)
    masks[0, 2:10, 2:10] = 1
    masks[1, 15:30, 15:30] = 1
    masks[2, 2:12, 20:30] = 1
    anns = [{"id": k + 1, "image_id": 1, "category_id": c, "segmentation": encode_rle(m.astype(bool)),
             "area": float(m.sum()), "bbox": [0, 0, 1, 1], "iscrowd": 0}
            for k, (m, c) in enumerate(zip(masks, (1, 1, 2)))]
    gt = {"images": [{"id": 1, "height": 32, "width": 32}], "annotations": anns,
          "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]}
    # class 1 found exactly, class 2's detection on the wrong place, class 3 without ground truth
    dets = [{"image_id": 1, "category_id": 1, "score": 0.9, "segmentation": anns[0]["segmentation"]},
            {"image_id": 1, "category_id": 1, "score": 0.8, "segmentation": anns[1]["segmentation"]},
            {"image_id": 1, "category_id": 2, "score": 0.9, "segmentation": anns[0]["segmentation"]}]
    assert per_class_mask_ap(gt, dets, [1, 2, 3], [1]) == [pytest.approx(1.0), pytest.approx(0.0), None]


def _train_detection(model: str, data: Path, out: Path, extra: dict | None = None) -> None:
    args = ["train", "--model", model, "--data", data, "--out", out, "--epochs", "1", "--batch-size", "2",
            "--lr", "0.005", "--num-workers", "0", "--quiet"]
    for k, v in {**TINY_DET, **(extra or {})}.items():
        args += ["--model-arg", f"{k}={v}"]
    assert main(args) == 0


def test_instance_report(data, tmp_path):
    pytest.importorskip("pycocotools")
    run = tmp_path / "run"
    _train_detection("maskrcnn", data, run)  # the CLI writes the report after training
    page = _check_page(run, ["curves.png", "per_class_ap.png", "val_grid.png"])
    best = [h for h in _history(run) if h.get("best")] or _history(run)
    final = {c["key"]: c["value"] for c in _cells(page, "final-metrics")}
    for k in ("mask_AP", "mask_AP50", "box_AP"):
        assert final[k] == pytest.approx(best[-1][k], abs=1e-12), k
    m = json.loads((run / "report_metrics.json").read_text())
    assert set(m["per_class_mask_AP"]) == {"circle", "rectangle", "triangle"}
    assert m["num_images"] == NUM_VAL and (run / "coco_results_val.json").is_file()
    grid = np.asarray(Image.open(run / "val_grid.png").convert("RGB"))
    side, top = SIZE * 5, 14
    image, truth = grid[top:top + side, :side], grid[top:top + side, side + 4:2 * side + 4]
    assert (image != truth).any(axis=2).mean() > 0.02  # ground-truth instances painted over the image


def test_panoptic_report(data, tmp_path):
    pytest.importorskip("pycocotools")  # mask AP at each evaluation, as in test_instance_report
    run = tmp_path / "run"
    _train_detection("panoptic_fpn", data, run, {"semantic_channels": 32})
    page = _check_page(run, ["curves.png", "per_class_pq.png", "val_grid.png"])
    best = [h for h in _history(run) if h.get("best")] or _history(run)
    final = {c["key"]: c["value"] for c in _cells(page, "final-metrics")}
    for k in ("pq", "pq_th", "pq_st", "sq", "rq"):
        assert final[k] == pytest.approx(best[-1][k], abs=1e-12), k
    assert "circle" in page and "sky" in page
