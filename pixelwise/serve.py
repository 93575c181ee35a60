"""``pixelwise serve``: a local web page to try a trained model on your own images.

Usage::

    pixelwise serve --checkpoint runs/demo/run/best.pt          # -> http://127.0.0.1:8000/
    pixelwise serve --checkpoint best.pt --port 0               # any free port; the URL is printed
    pixelwise serve --checkpoint best.pt --max-upload-mb 50 --device cuda
    pixelwise serve --checkpoint best.pt --host 0.0.0.0         # reachable from other machines (no login!)

Open the printed URL and choose or drop an image: the page shows the input and, next to it,
the segmentation as a colour layer over the input (an opacity slider blends it in the
browser), with a legend of the classes and their pixel shares. Instance checkpoints (Mask
R-CNN) draw each detected instance in its own colour and list its class and score; panoptic
checkpoints (Panoptic FPN) draw every segment, thing or stuff, in its own colour.
The input shown is the pixel grid the model saw (decoded by the server, EXIF orientation not
applied), so the layer always lines up with it.

The server is the standard library's ``ThreadingHTTPServer``; the page is one
self-contained HTML file (inline CSS and JavaScript, nothing fetched from elsewhere). The
model is loaded once; predictions run one at a time. It binds 127.0.0.1 unless ``--host``
says otherwise and has no authentication: do not expose it to networks you do not trust.

HTTP API (JSON answers):

``GET /``
    the page.
``GET /api/info``
    ``{"model", "task", "classes": [{"id", "name", "color", "isthing"}], "max_upload_bytes",
    "max_megapixels", ...}`` (panoptic: ``classes`` are the COCO panoptic categories).
``POST /api/predict``
    body: the bytes of an image file (any format PIL reads); optional header ``X-Filename``
    (URL-encoded) names it in messages. Answers ``200`` with ``{"task", "width", "height",
    "image", "layer", "labels", "legend", "seconds", ...}``: ``image`` the decoded input,
    ``layer`` the RGBA colour layer (transparent where there is no instance / segment),
    ``labels`` the class ids (semantic), instance ids (instance; 0 = none, highest score on
    top) or segment ids (panoptic; 0 = void) as a grayscale PNG (16-bit above 255 ids) - all
    three PNG data URLs; ``legend`` one row per class (``id``, ``name``, ``color``, ``pixels``,
    ``share``), per instance (plus ``class_id``, ``score``, ``box``) or per segment (plus
    ``category_id``, ``isthing``, ``score`` for things), the last two after a row ``id`` 0 for
    the pixels of no instance / void; shares sum to 1.
    The body may be sent with ``Content-Length`` or ``Transfer-Encoding: chunked``.
    ``400`` for an empty, non-image or corrupt upload; ``411`` with neither;
    ``413`` above ``--max-upload-mb`` (default 20) or ``--max-megapixels`` (default 40);
    ``500`` for anything unexpected. Every error is ``{"error": "<one clear line>"}`` and the
    server keeps serving.

From Python: ``serve(checkpoint, port=0)`` blocks; ``make_server(Predictor(checkpoint), port=0)``
returns the server to run in a thread (``server.url``, ``server.serve_forever()``,
``server.shutdown()``).
"""
from __future__ import annotations

import base64
import io
import json
import os
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pixelwise.engine.checkpoint import load_checkpoint, model_from_checkpoint
from pixelwise.engine.common import resolve_device
from pixelwise.errors import DataError, PixelwiseError

__all__ = ["Predictor", "UploadError", "decode_upload", "make_server", "serve", "PAGE"]

DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_MAX_MEGAPIXELS = 40.0
_DRAIN_LIMIT = 1 << 30  # read (and drop) at most this much of a refused upload so the browser sees the answer


class UploadError(PixelwiseError):
    """An upload the server refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        self.status = int(status)
        super().__init__(message)


# ---------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------


class Predictor:
    """A checkpoint loaded once; :meth:`predict` segments one decoded image (thread-safe:
    calls run one at a time) through its task (:meth:`pixelwise.tasks.base.Task.predict` and
    :meth:`~pixelwise.tasks.base.Task.serve_layer`); ``score_threshold`` applies to instance
    checkpoints, panoptic models merge with their own threshold."""

    def __init__(self, checkpoint: str | os.PathLike, device: str = "auto", *, score_threshold: float = 0.5,
                 fast: bool = False, tile: int | None = None, overlap: int | None = None, flip: bool = False,
                 scales: tuple[float, ...] | None = None):
        from pixelwise.tasks import task_of_checkpoint

        ckpt = load_checkpoint(checkpoint)
        self.ckpt = ckpt
        self.checkpoint = str(checkpoint)
        self._task = task_of_checkpoint(ckpt)
        self.task = self._task.name
        self.model_name = ckpt["model"]["name"]
        self.classes = self._task.classes_of(ckpt)
        self.normalization = ckpt["normalization"]
        self.image_mode = self.normalization.get("image_mode", "RGB")
        self.device = resolve_device(device)
        self.inference = {"tile": tile, "overlap": overlap, "flip": flip, "scales": scales}
        self._task.check_eval_options({k: v for k, v in self.inference.items() if v})
        model = model_from_checkpoint(ckpt, checkpoint).eval().to(self.device)
        if fast and self._task.supports_optimize:
            from pixelwise.optimize import optimize

            model = optimize(model, inplace=True)
        self.model = model
        self.score_threshold = float(score_threshold)
        self._lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        return {"model": self.model_name, "task": self.task, "classes": self.classes, "image_mode": self.image_mode,
                "checkpoint": Path(self.checkpoint).name, "device": str(self.device)}

    @torch.inference_mode()
    def predict(self, image: np.ndarray) -> dict[str, Any]:
        """uint8 (H, W, C) image -> ``{"labels": (H, W) int ids, "layer": (H, W, 4) uint8 RGBA,
        "legend": [row, ...]}`` (rows as in the module docstring; shares sum to 1)."""
        with self._lock:
            result = self._task.predict(self.model, image, self.ckpt, self.device,
                                        score_threshold=self.score_threshold, **self.inference)
            return self._task.serve_layer(result, self.ckpt)


# ---------------------------------------------------------------------------------------
# uploads and answers
# ---------------------------------------------------------------------------------------


def decode_upload(data: bytes, filename: str = "upload", image_mode: str = "RGB",
                  max_megapixels: float = DEFAULT_MAX_MEGAPIXELS) -> np.ndarray:
    """The bytes of an uploaded image file -> uint8 (H, W, C) as :func:`~pixelwise.data.io.read_image`
    reads files. Raises :class:`UploadError` (400: empty, not an image, corrupt, truncated;
    413: more than ``max_megapixels`` million pixels)."""
    from pixelwise.data.io import read_image

    if not data:
        raise UploadError(400, f"{filename}: the upload is empty (choose an image file)")
    try:
        with Image.open(io.BytesIO(data)) as im:  # the header only: refuse huge images before decoding
            w, h = im.size
    except Image.DecompressionBombError as e:
        raise UploadError(413, f"{filename}: the image has too many pixels to decode safely ({e})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        w = h = 0  # read_image below says what is wrong
    if w * h > max_megapixels * 1e6:
        raise UploadError(413, f"{filename}: the image is {w}x{h} = {w * h / 1e6:.1f} megapixels; this server "
                               f"takes at most {max_megapixels:g} (pixelwise serve --max-megapixels)")
    with tempfile.TemporaryDirectory(prefix="pixelwise-serve-") as tmp:  # read_image reads files
        path = Path(tmp) / "upload"
        path.write_bytes(data)
        try:
            return read_image(path, mode=image_mode)
        except DataError as e:
            msg = f"{filename}: {e.problem.replace('image file', 'the upload')}"
            raise UploadError(400, msg + (f" ({e.fix})" if e.fix else "")) from None


def _png_data_url(a: np.ndarray) -> str:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.dtype != np.uint8:  # label ids: 8-bit when they fit, else 16-bit grayscale
        a = a.astype(np.uint8) if a.max(initial=0) < 256 else a.astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def predict_response(predictor: Predictor, image: np.ndarray, filename: str = "upload") -> dict[str, Any]:
    """The JSON answer of ``POST /api/predict`` for a decoded image."""
    t0 = time.perf_counter()
    out = predictor.predict(image)
    seconds = time.perf_counter() - t0
    return {"task": predictor.task, "model": predictor.model_name, "filename": filename,
            "width": int(image.shape[1]), "height": int(image.shape[0]), "seconds": round(seconds, 4),
            "image": _png_data_url(image), "layer": _png_data_url(out["layer"]),
            "labels": _png_data_url(out["labels"]), "legend": out["legend"]}


# ---------------------------------------------------------------------------------------
# the HTTP server
# ---------------------------------------------------------------------------------------


class PixelwiseServer(ThreadingHTTPServer):
    """ThreadingHTTPServer holding the :class:`Predictor` and the upload limits."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], predictor: Predictor, max_upload_bytes: int,
                 max_megapixels: float, log_requests: bool):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.predictor = predictor
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_megapixels = float(max_megapixels)
        self.log_requests = log_requests
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = "127.0.0.1" if host == "0.0.0.0" else ("::1" if host == "::" else host)
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


class _Handler(BaseHTTPRequestHandler):
    server: PixelwiseServer
    server_version = "pixelwise-serve"
    timeout = 120  # seconds a client may stall while sending

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        if self.server.log_requests:
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, content_type: str, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, close: bool = False) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json; charset=utf-8", close)

    def _error(self, status: int, message: str, close: bool = False) -> None:
        self._json(status, {"error": message, "status": status}, close)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = urllib.parse.urlsplit(self.path).path
        if path in ("/", "/index.html"):
            self._send(200, PAGE.encode(), "text/html; charset=utf-8")
        elif path == "/api/info":
            self._json(200, {**self.server.predictor.info(), "max_upload_bytes": self.server.max_upload_bytes,
                             "max_megapixels": self.server.max_megapixels})
        elif path == "/favicon.ico":
            self._send(204, b"", "image/x-icon")
        else:
            self._error(404, f"{path}: not found (the page is /, the API /api/info and POST /api/predict)")

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802
        path = urllib.parse.urlsplit(self.path).path
        filename = urllib.parse.unquote(self.headers.get("X-Filename", "") or "upload")[:200] or "upload"
        try:
            if path != "/api/predict":
                raise UploadError(404, f"{path}: not found (POST the image to /api/predict)")
            data = self._read_body(filename)
            image = decode_upload(data, filename, self.server.predictor.image_mode, self.server.max_megapixels)
            answer = predict_response(self.server.predictor, image, filename)
        except UploadError as e:
            self._error(e.status, str(e), close=True)  # the body may be partly unread
            return
        except PixelwiseError as e:
            self._error(400, f"{filename}: {e}")
            return
        except (ConnectionError, socket.timeout):
            self.close_connection = True
            return
        except Exception as e:  # noqa: BLE001 - never let one request take the server down
            self.log_error("prediction failed: %r", e)
            self._error(500, f"{filename}: prediction failed ({type(e).__name__}: {e})")
            return
        self._json(200, answer)

    def _read_body(self, filename: str) -> bytes:
        limit = self.server.max_upload_bytes
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            data, total = self._read_chunked(limit)
            if data is None:
                raise UploadError(413, f"{filename}: the upload is {_mb(total)}; this server takes at most "
                                       f"{_mb(limit)} (pixelwise serve --max-upload-mb)")
            return data
        if self.headers.get("Content-Length") is None:
            raise UploadError(411, "the upload needs a Content-Length header (send the file as the request body)")
        try:
            length = int(self.headers["Content-Length"])
        except ValueError:
            raise UploadError(400, f"bad Content-Length {self.headers['Content-Length']!r}") from None
        if length > limit:
            left = min(length, _DRAIN_LIMIT)  # read it away, so the browser gets the answer, not a reset
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)
            raise UploadError(413, f"{filename}: the upload is {_mb(length)}; this server takes at most "
                                   f"{_mb(limit)} (pixelwise serve --max-upload-mb)")
        data = self.rfile.read(length)
        if len(data) < length:
            raise ConnectionError("the client closed the connection before sending the whole file")
        return data

    def _read_chunked(self, limit: int) -> tuple[bytes | None, int]:
        """A ``Transfer-Encoding: chunked`` body; ``(None, n)`` when it passes ``limit`` (the rest
        is read away, up to the drain limit)."""
        parts, total = [], 0
        while True:
            line = self.rfile.readline(1024)
            if not line:
                raise ConnectionError("the client closed the connection in the middle of a chunked upload")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise UploadError(400, "malformed chunked upload") from None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return (b"".join(parts) if total <= limit else None), total
            total += size
            if total > _DRAIN_LIMIT:
                raise UploadError(413, f"the upload is more than {_mb(_DRAIN_LIMIT)}; this server takes at most "
                                       f"{_mb(limit)} (pixelwise serve --max-upload-mb)")
            chunk = self.rfile.read(size)
            if len(chunk) < size:
                raise ConnectionError("the client closed the connection in the middle of a chunked upload")
            if total <= limit:
                parts.append(chunk)
            else:
                parts.clear()
            self.rfile.readline(16)  # the CRLF after the chunk


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1_000_000 else f"{n / 1e3:.1f} kB"


def make_server(predictor: Predictor, host: str = "127.0.0.1", port: int = 8000, *,
                max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
                log_requests: bool = False) -> PixelwiseServer:
    """A bound (not yet serving) server; ``port=0`` picks a free port (see ``server.url``)."""
    if max_upload_mb <= 0 or max_megapixels <= 0:
        raise PixelwiseError("--max-upload-mb and --max-megapixels must be positive")
    try:
        return PixelwiseServer((host, int(port)), predictor, int(max_upload_mb * 1e6), max_megapixels, log_requests)
    except OSError as e:
        raise PixelwiseError(f"cannot listen on {host}:{port}: {e.strerror or e} "
                             "(choose another --port, or --port 0 for a free one)") from None


def serve(checkpoint: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, *, device: str = "auto",
          max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
          score_threshold: float = 0.5, fast: bool = False, log_requests: bool = True,
          ready: Callable[[PixelwiseServer], None] | None = None, **inference: Any) -> None:
    """Load ``checkpoint`` and serve the page until interrupted (Ctrl-C). Prints the URL;
    ``ready(server)`` is called once it listens. ``inference``: tile, overlap, flip, scales."""
    predictor = Predictor(checkpoint, device, score_threshold=score_threshold, fast=fast, **inference)
    server = make_server(predictor, host, port, max_upload_mb=max_upload_mb, max_megapixels=max_megapixels,
                         log_requests=log_requests)
    print(f"serving {predictor.model_name} ({predictor.task}, {len(predictor.classes)} classes, "
          f"{predictor.device}) from {checkpoint}", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host}: anyone who can reach this machine can use the page "
              "(there is no authentication)", file=sys.stderr, flush=True)
    print(f"open {server.url}  (Ctrl-C stops)", flush=True)
    if ready is not None:
        ready(server)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()


# ---------------------------------------------------------------------------------------
# the page: one self-contained file (no external resources: the CSP forbids them)
# ---------------------------------------------------------------------------------------

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; img-src data: blob:; style-src 'unsafe-inline'; script-src 'unsafe-inline';
               connect-src 'self'">
<title>pixelwise</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
  header { padding: 10px 20px; background: #263238; color: #fff; display: flex; gap: 16px; align-items: baseline; }
  header h1 { font-size: 20px; margin: 0; }
  #info { opacity: .8; font-size: 13px; }
  #drop { margin: 16px 20px; padding: 22px; border: 2px dashed #90a4ae; border-radius: 8px; text-align: center;
          background: #fff; cursor: pointer; }
  #drop.over { border-color: #1e88e5; background: #e3f2fd; }
  #status { margin: 0 20px; min-height: 1.4em; color: #555; }
  #error { margin: 8px 20px; padding: 10px 14px; border-radius: 6px; background: #ffebee; color: #b71c1c;
           border: 1px solid #ef9a9a; }
  #result { display: flex; flex-wrap: wrap; gap: 20px; margin: 12px 20px 30px; align-items: flex-start; }
  figure { margin: 0; background: #fff; padding: 8px; border: 1px solid #ddd; border-radius: 6px; }
  figcaption { font-size: 13px; color: #555; margin-bottom: 4px; }
  .pic { width: 448px; max-width: 42vw; height: auto; image-rendering: pixelated; display: block; }
  .stack { position: relative; display: inline-block; }
  .stack img#overlay { position: absolute; left: 0; top: 0; width: 100%; height: 100%; image-rendering: pixelated; }
  aside { min-width: 240px; }
  table { border-collapse: collapse; font-size: 14px; }
  td, th { padding: 3px 8px; text-align: left; border-bottom: 1px solid #eee; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; }
  .sw { display: inline-block; width: 14px; height: 14px; border: 1px solid #999; vertical-align: middle; }
  [hidden] { display: none !important; }
</style>
</head>
<body>
<header><h1>pixelwise</h1><span id="info">loading the model...</span></header>
<div id="drop" tabindex="0">Drop an image here, or
  <label><u>choose a file</u> <input type="file" id="file" accept="image/*,.tif,.tiff"></label></div>
<div id="status" role="status"></div>
<div id="error" role="alert" hidden></div>
<main id="result" hidden>
  <figure><figcaption>input <span id="size"></span></figcaption><img id="input" class="pic" alt="input image"></figure>
  <figure><figcaption>segmentation</figcaption>
    <div class="stack"><img id="base" class="pic" alt=""><img id="overlay" alt="segmentation overlay"></div></figure>
  <aside>
    <label>opacity <input type="range" id="opacity" min="0" max="100" value="60"> <span id="opv">60%</span></label>
    <table id="legend"><thead><tr id="legend-head"></tr></thead><tbody></tbody></table>
    <p id="note"></p>
  </aside>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const fmtBytes = (n) => n >= 1e6 ? `${(n / 1e6).toFixed(1)} MB` : `${(n / 1e3).toFixed(1)} kB`;

fetch("/api/info").then((r) => r.json()).then((info) => {
  $("info").textContent = `${info.model} (${info.task}, ${info.classes.length} classes) from ${info.checkpoint}` +
    ` on ${info.device} - uploads up to ${fmtBytes(info.max_upload_bytes)}`;
  document.title = `pixelwise - ${info.model}`;
}).catch(() => { $("info").textContent = "the server does not answer"; });

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("result").hidden = true;
  $("status").textContent = "";
}

function swatch(color) {
  const s = document.createElement("span");
  s.className = "sw";
  if (color) s.style.background = `rgb(${color[0]},${color[1]},${color[2]})`;
  else s.style.background = "repeating-linear-gradient(45deg,#fff 0 3px,#ccc 3px 6px)";
  return s;
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  if (text instanceof Node) td.appendChild(text); else td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function render(res) {
  $("input").src = res.image;
  $("base").src = res.image;
  $("overlay").src = res.layer;
  $("size").textContent = `${res.filename}, ${res.width}x${res.height} px`;
  const instance = res.task !== "semantic";
  const head = $("legend-head");
  head.replaceChildren();
  for (const h of instance ? ["", "#", "class", "score", "share"] : ["", "class", "share"]) {
    const th = document.createElement("th"); th.textContent = h; head.appendChild(th);
  }
  const body = $("legend").tBodies[0];
  body.replaceChildren();
  let rows = res.legend;
  if (!instance) rows = rows.filter((r) => r.pixels > 0).sort((a, b) => b.share - a.share);
  for (const r of rows) {
    const tr = document.createElement("tr");
    tr.className = "legend-row";
    tr.dataset.id = r.id;
    tr.dataset.share = r.share;
    cell(tr, swatch(r.color));
    if (instance) {
      cell(tr, r.id === 0 ? "" : String(r.id), "num");
      cell(tr, r.name);
      cell(tr, r.score === undefined ? "" : r.score.toFixed(2), "num");
    } else {
      cell(tr, r.name);
    }
    cell(tr, (100 * r.share).toFixed(1) + " %", "num");
    body.appendChild(tr);
  }
  const absent = res.legend.length - rows.length;
  const kind = res.task === "panoptic" ? "segments" : "instances";
  $("note").textContent = (instance ? `${res.legend.length - 1} ${kind}. ` : "") +
    (absent > 0 && !instance ? `${absent} classes not present. ` : "") + `${res.seconds.toFixed(2)} s on the server.`;
  $("error").hidden = true;
  $("result").hidden = false;
  $("status").textContent = "";
}

async function upload(file) {
  if (!file) return;
  $("status").textContent = `segmenting ${file.name} (${fmtBytes(file.size)})...`;
  $("error").hidden = true;
  let r;
  try {
    r = await fetch("/api/predict", { method: "POST", body: file, headers: {
      "Content-Type": file.type || "application/octet-stream", "X-Filename": encodeURIComponent(file.name) } });
  } catch (e) {
    showError(`could not reach the server (${e.message})`);
    return;
  }
  let res;
  try {
    res = await r.json();
  } catch (e) {
    showError(`the server answered HTTP ${r.status} without a message`);
    return;
  }
  if (!r.ok) { showError(`HTTP ${r.status}: ${res.error}`); return; }
  render(res);
}

const setOpacity = () => {
  $("overlay").style.opacity = $("opacity").value / 100;
  $("opv").textContent = `${$("opacity").value}%`;
};
$("opacity").addEventListener("input", setOpacity);
setOpacity();
$("file").addEventListener("change", (e) => { upload(e.target.files[0]); e.target.value = ""; });
const drop = $("drop");
drop.addEventListener("click", (e) => { if (e.target === drop) $("file").click(); });
drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
for (const ev of ["dragenter", "dragover"]) {
  drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
}
for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, () => drop.classList.remove("over"));
// a file dropped anywhere on the page (the drop zone included: the event bubbles up) is segmented
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => { e.preventDefault(); upload(e.dataTransfer.files[0]); });
</script>
</body>
</html>
"""
