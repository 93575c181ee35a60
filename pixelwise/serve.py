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
model is loaded once (through :func:`pixelwise.load`); predictions run one at a time. It binds
127.0.0.1 unless ``--host`` says otherwise and has no authentication: do not expose it to
networks you do not trust.

HTTP API (JSON answers):

``GET /``
    the page.
``GET /api/info``
    ``{"model", "task", "classes": [{"id", "name", "color", "isthing"}], "max_upload_bytes",
    "max_megapixels", ...}`` (panoptic: ``classes`` are the COCO panoptic categories).
``POST /api/predict``
    body: the bytes of an image file (any format PIL reads; optional header ``X-Filename``,
    URL-encoded, names it in messages), or a ``multipart/form-data`` form (what a browser
    form and ``curl -F file=@img.png URL`` send) whose field ``file`` (else the first file
    field) holds it. Answers ``200`` with ``{"task", "width", "height",
    "image", "layer", "labels", "legend", "seconds", ...}``: ``image`` the decoded input,
    ``layer`` the RGBA colour layer (transparent where there is no instance / segment),
    ``labels`` the class ids (semantic), instance ids (instance; 0 = none, highest score on
    top) or segment ids (panoptic; 0 = void) as a grayscale PNG (16-bit above 255 ids) - all
    three PNG data URLs; ``legend`` one row per class (``id``, ``name``, ``color``, ``pixels``,
    ``share``), per instance (plus ``class_id``, ``score``, ``box``) or per segment (plus
    ``category_id``, ``isthing``, ``score`` for things), the last two after a row ``id`` 0 for
    the pixels of no instance / void; shares sum to 1.
    The body may be sent with ``Content-Length`` or ``Transfer-Encoding: chunked``.
    ``400`` for an empty, non-image or corrupt upload, a form without a file or a malformed
    ``Content-Length``; ``411`` with neither; ``413`` above ``--max-upload-mb`` (default 20)
    or above the pixel budget; ``403`` when the ``Host`` header names another host;
    ``500`` for anything unexpected (the details go to the server's log, not the answer).
    Every error is ``{"error": "<one clear line>"}`` and the server keeps serving.

Memory: ``--max-memory`` (default 2 GB) is a budget for the server's peak resident memory.
At start-up one whole request on a noise image is measured (:func:`memory_budget`); the
largest accepted image is the one whose request, at 1.5 times the measured bytes per pixel,
keeps the peak under the budget; ``--max-megapixels`` caps it further. Requests are decoded,
predicted and answered one at a time (at most two bodies are read at once), so the bound holds
with many clients. The listen backlog holds 128 waiting connections.

Safety: it binds 127.0.0.1 unless ``--host`` says otherwise (any other address prints a
warning: there is no authentication); requests whose ``Host`` header is not a loopback name,
the bound address or an ``--allow-host`` name get 403, so a web page whose DNS name is
rebound to 127.0.0.1 cannot use the server (bound to all interfaces, IP addresses pass too).

From Python: ``serve(source, port=0)`` blocks; ``make_server(Predictor(source), port=0)``
returns the server to run in a thread (``server.url``, ``server.serve_forever()``,
``server.shutdown()``).
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
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
from PIL import Image, UnidentifiedImageError

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
    """The served model: a thin wrapper over :class:`pixelwise.api.Segmenter` (loaded once;
    calls run one at a time). ``source`` is anything :func:`pixelwise.load` takes (a
    checkpoint, a run folder, a pretrained folder, a cached hub id). :meth:`predict` turns
    the task's typed result into the page's layer (:meth:`~pixelwise.tasks.base.Task.serve_layer`);
    ``score_threshold`` applies to instance models, panoptic models merge with their own."""

    def __init__(self, checkpoint: str | os.PathLike, device: str = "auto", *, score_threshold: float = 0.5,
                 fast: bool = False, tile: int | None = None, overlap: int | None = None, flip: bool = False,
                 scales: tuple[float, ...] | None = None):
        from pixelwise.api import load

        seg = load(checkpoint, None if device == "auto" else device, optimize=fast, tile=tile, overlap=overlap,
                   flip=flip, scales=scales, score_threshold=score_threshold)
        self.segmenter = seg
        self.ckpt = seg.info
        self.checkpoint = str(checkpoint)
        self.task = seg.task.name
        self.model_name = seg.model_name
        self.classes = seg.classes
        self.normalization = seg.normalization
        self.image_mode = seg.image_mode
        self.device = seg.device
        self.inference = dict(seg.inference)
        self.score_threshold = seg.score_threshold

    def info(self) -> dict[str, Any]:
        return {"model": self.model_name, "task": self.task, "classes": self.classes, "image_mode": self.image_mode,
                "checkpoint": Path(self.checkpoint).name, "device": str(self.device)}

    def predict(self, image: np.ndarray) -> dict[str, Any]:
        """uint8 (H, W, C) image -> ``{"labels": (H, W) int ids, "layer": (H, W, 4) uint8 RGBA,
        "legend": [row, ...]}`` (rows as in the module docstring; shares sum to 1)."""
        result = self.segmenter.predict(image)
        return self.segmenter.task.serve_layer(result, self.segmenter.info)


# ---------------------------------------------------------------------------------------
# uploads and answers
# ---------------------------------------------------------------------------------------


def decode_upload(data: bytes, filename: str = "upload", image_mode: str = "RGB",
                  max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
                  limit_flag: str = "--max-megapixels") -> np.ndarray:
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
                               f"takes at most {max_megapixels:g} (pixelwise serve {limit_flag})")
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


#: addresses that only this machine reaches; any other ``--host`` gets a warning
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
#: ``--max-memory`` default in GB: the peak resident memory the server is sized to stay under
DEFAULT_MAX_MEMORY_GB = 2.0
#: connections the kernel queues while the server is busy (20 simultaneous clients, no reset)
LISTEN_BACKLOG = 128
#: uploads read at the same time (each at most --max-upload-mb); the rest wait their turn
_READING_SLOTS = 2
#: the pixel budget assumes this multiple of the probe's measured bytes per pixel
_SAFETY = 1.5
#: side of the calibration image (pixels); its peak memory sets the bytes per pixel
_PROBE_SIDE = 384
#: bytes of memory an upload costs besides its pixels, in multiples of its size: the bodies
#: being read (``_READING_SLOTS``) and the copies the multipart parser makes of the one processed
_UPLOAD_COPIES = _READING_SLOTS + 6


def _rss() -> int:
    """This process's resident memory now (bytes)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: the peak so far is an upper bound
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) * (1 if sys.platform == "darwin" else 1024)


def _release_free_memory() -> None:
    """Give freed heap pages back to the system (glibc), so RSS measures what is in use."""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _PeakRSS:
    """Samples the resident memory every millisecond in a thread; ``peak`` is the highest seen."""

    def __enter__(self) -> "_PeakRSS":
        self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def memory_budget(predictor: Predictor, max_memory_bytes: int, max_upload_bytes: int,
                  probe_side: int = _PROBE_SIDE) -> dict[str, Any]:
    """The largest image (pixels) whose request keeps this process's peak RSS under
    ``max_memory_bytes``, measured, not guessed: after a warm-up request, one whole request (decode a noise PNG of
    ``probe_side``^2 pixels, predict, encode the JSON answer) runs while a thread samples
    the RSS; its peak above the RSS before it, per pixel, times a safety factor of 1.5, is the
    cost of a pixel (linear in the pixels: the models are convolutional, and the detection
    models resize to their own size, which makes the estimate pessimistic for them). The
    upload bodies (``_UPLOAD_COPIES`` x ``max_upload_bytes``) come off the budget first.
    Returns ``{"max_pixels", "baseline_bytes", "bytes_per_pixel", "fixed_bytes"}``; raises
    :class:`PixelwiseError` when the model alone leaves no room."""
    c = 1 if predictor.image_mode == "L" else 3
    noise = np.random.default_rng(0).integers(0, 256, (probe_side, probe_side, c), dtype=np.uint8)
    data = _encode_png(noise[..., 0] if c == 1 else noise)
    del noise
    # a first request warms the model up (thread pools, kernel caches): a one-off cost that
    # stays in the baseline instead of being charged to every pixel
    _answer_bytes(predictor, decode_upload(_encode_png(np.zeros((64, 64, c), np.uint8).squeeze()), "warm-up",
                                           predictor.image_mode, 1e9), "warm-up")
    _release_free_memory()
    base = _rss()
    with _PeakRSS() as peak:
        body = _answer_bytes(predictor, decode_upload(data, "probe", predictor.image_mode, 1e9), "probe")
        del body
    per_pixel = max(1.0, (peak.peak - base) / probe_side ** 2) * _SAFETY
    fixed = _UPLOAD_COPIES * int(max_upload_bytes)
    room = int(max_memory_bytes) - base - fixed
    pixels = int(room / per_pixel) if room > 0 else 0
    if pixels < 64 * 64:
        raise PixelwiseError(f"--max-memory {max_memory_bytes / 1e9:g} GB leaves no room for images: the model takes "
                             f"{base / 1e9:.2f} GB before any request and the uploads up to {fixed / 1e9:.2f} GB; "
                             f"raise --max-memory (or lower --max-upload-mb)")
    return {"max_pixels": pixels, "baseline_bytes": int(base), "bytes_per_pixel": round(per_pixel, 1),
            "fixed_bytes": fixed}


def _encode_png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _answer_bytes(predictor: Predictor, image: np.ndarray, filename: str) -> bytes:
    return json.dumps(predict_response(predictor, image, filename)).encode()


def _file_of_form(data: bytes, content_type: str, filename: str) -> tuple[bytes, str]:
    """The uploaded file of a ``multipart/form-data`` body (what browsers' forms and ``curl -F
    file=@img.png`` send), parsed by the standard library's ``email`` package: the field named
    ``file``, else the first field with a file name, else the only field. Returns ``(bytes,
    file name)``; raises :class:`UploadError` (400) for a form without a file."""
    from email import policy
    from email.parser import BytesParser

    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    msg = BytesParser(policy=policy.HTTP).parsebytes(head + data)
    parts = list(msg.iter_parts()) if msg.is_multipart() else []
    if not parts:
        raise UploadError(400, f"{filename}: malformed multipart/form-data upload (no part found: is the boundary "
                               "right?); send the image as a form field named file, or as the raw body")
    named = [p for p in parts if p.get_param("name", header="content-disposition") == "file"]
    with_name = [p for p in parts if p.get_filename()]
    part = (named or with_name or (parts if len(parts) == 1 else [None]))[0]
    if part is None:
        fields = ", ".join(str(p.get_param("name", header="content-disposition")) for p in parts)
        raise UploadError(400, f"{filename}: the form has no file (fields: {fields}); send the image as a field "
                               "named file")
    payload = part.get_payload(decode=True)
    return (payload if isinstance(payload, bytes) else b""), (part.get_filename() or filename)[:200]


class PixelwiseServer(ThreadingHTTPServer):
    """ThreadingHTTPServer holding the :class:`Predictor` and the upload limits.

    ``max_pixels``: the largest image accepted (the smaller of ``--max-megapixels`` and the
    memory budget); ``allowed_hosts``: the names a request's ``Host`` header may carry (DNS
    rebinding protection: a web page of another site that resolves its name to this machine
    is refused)."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], predictor: Predictor, max_upload_bytes: int,
                 max_megapixels: float | None, log_requests: bool, *, allowed_hosts: tuple[str, ...] = ()):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.predictor = predictor
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_megapixels = None if max_megapixels is None else float(max_megapixels)
        self.max_memory_bytes: int | None = None
        self.memory: dict[str, Any] | None = None
        self.max_pixels, self.limit_flag = (10 ** 12, "--max-megapixels") if self.max_megapixels is None else \
            (int(self.max_megapixels * 1e6), "--max-megapixels")
        self.log_requests = log_requests
        host = address[0].strip("[]").lower()
        self.wildcard = host in ("", "0.0.0.0", "::")
        self.allowed_hosts = frozenset({*LOOPBACK_HOSTS, host, *(h.lower() for h in allowed_hosts)})
        self.work_lock = threading.Lock()  # one request decodes, predicts and answers at a time
        self.reading = threading.BoundedSemaphore(_READING_SLOTS)
        super().__init__(address, _Handler)

    def budget_memory(self, max_memory_bytes: int) -> None:
        """Lower :attr:`max_pixels` to what ``max_memory_bytes`` of peak RSS allows (:func:`memory_budget`)."""
        self.max_memory_bytes = int(max_memory_bytes)
        self.memory = memory_budget(self.predictor, self.max_memory_bytes, self.max_upload_bytes)
        if self.memory["max_pixels"] < self.max_pixels:
            self.max_pixels, self.limit_flag = self.memory["max_pixels"], "--max-memory"

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = "127.0.0.1" if host == "0.0.0.0" else ("::1" if host == "::" else host)
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    def host_allowed(self, header: str | None) -> bool:
        """Whether a ``Host`` header names this server: a loopback name, the bound address,
        an ``--allow-host`` name, or (bound to all interfaces) any IP address - an address
        cannot be rebound, only a name can. No header (HTTP/1.0) passes."""
        import ipaddress

        if header is None:
            return True
        name = header.strip().lower()
        if name.startswith("["):
            name = name[1:name.find("]")] if "]" in name else name[1:]
        elif name.count(":") == 1:
            name = name.rsplit(":", 1)[0]
        if name.rstrip(".") in self.allowed_hosts:
            return True
        if self.wildcard:
            try:
                ipaddress.ip_address(name)
                return True
            except ValueError:
                return False
        return False


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

    def _host_ok(self) -> bool:
        if self.server.host_allowed(self.headers.get("Host")):
            return True
        self._error(403, f"Host {self.headers.get('Host')!r} is not this server (DNS rebinding protection); open "
                         f"{self.server.url} or start the server with --allow-host NAME", close=True)
        return False

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if not self._host_ok():
            return
        path = urllib.parse.urlsplit(self.path).path
        if path in ("/", "/index.html"):
            self._send(200, PAGE.encode(), "text/html; charset=utf-8")
        elif path == "/api/info":
            s = self.server
            self._json(200, {**s.predictor.info(), "max_upload_bytes": s.max_upload_bytes,
                             "max_megapixels": s.max_pixels / 1e6, "max_pixels": s.max_pixels,
                             "max_memory_bytes": s.max_memory_bytes, "memory": s.memory})
        elif path == "/favicon.ico":
            self._send(204, b"", "image/x-icon")
        else:
            self._error(404, f"{path}: not found (the page is /, the API /api/info and POST /api/predict)")

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802
        if not self._host_ok():
            return
        path = urllib.parse.urlsplit(self.path).path
        filename = urllib.parse.unquote(self.headers.get("X-Filename", "") or "upload")[:200] or "upload"
        try:
            if path != "/api/predict":
                raise UploadError(404, f"{path}: not found (POST the image to /api/predict)")
            with self.server.reading:
                data = self._read_body(filename)
                with self.server.work_lock:  # the memory budget holds for one request at a time
                    ctype = self.headers.get("Content-Type", "")
                    if ctype.lower().startswith("multipart/form-data"):
                        data, filename = _file_of_form(data, ctype, filename)
                    image = decode_upload(data, filename, self.server.predictor.image_mode,
                                          self.server.max_pixels / 1e6, self.server.limit_flag)
                    del data
                    body = _answer_bytes(self.server.predictor, image, filename)
                    del image
                    self._send(200, body, "application/json; charset=utf-8")
        except UploadError as e:
            self._error(e.status, str(e), close=True)  # the body may be partly unread
        except PixelwiseError as e:
            self._error(400, f"{filename}: {e}")
        except (ConnectionError, socket.timeout):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - never let one request take the server down
            self.log_error("prediction of %s failed: %r", filename, e)  # the details stay in the server's log
            self._error(500, f"{filename}: prediction failed (an internal error; the server log has the details)")

    def _read_body(self, filename: str) -> bytes:
        limit = self.server.max_upload_bytes
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            data, total = self._read_chunked(limit)
            if data is None:
                raise UploadError(413, f"{filename}: the upload is {_mb(total)}; this server takes at most "
                                       f"{_mb(limit)} (pixelwise serve --max-upload-mb)")
            return data
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise UploadError(411, "the upload needs a Content-Length header (send the file as the request body)")
        if not re.fullmatch(r"[0-9]{1,19}", raw.strip()):
            raise UploadError(400, f"bad Content-Length {raw!r} (a number of bytes, 0 or more)")
        length = int(raw)
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
                max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS,
                max_memory_gb: float | None = None, allowed_hosts: tuple[str, ...] = (),
                log_requests: bool = False) -> PixelwiseServer:
    """A bound (not yet serving) server; ``port=0`` picks a free port (see ``server.url``).
    ``max_memory_gb``: size the largest accepted image so that one request keeps the peak
    resident memory under it (:func:`memory_budget`; measured once here); ``max_megapixels``
    (None: no cap of its own): a cap besides. ``allowed_hosts``: host names besides the
    loopback ones and ``host`` that requests may address (``Host`` header)."""
    if max_upload_mb <= 0 or (max_megapixels is not None and max_megapixels <= 0) or \
            (max_memory_gb is not None and max_memory_gb <= 0):
        raise PixelwiseError("--max-upload-mb, --max-megapixels and --max-memory must be positive")
    try:
        server = PixelwiseServer((host, int(port)), predictor, int(max_upload_mb * 1e6), max_megapixels,
                                 log_requests, allowed_hosts=tuple(allowed_hosts))
    except OSError as e:
        raise PixelwiseError(f"cannot listen on {host}:{port}: {e.strerror or e} "
                             "(choose another --port, or --port 0 for a free one)") from None
    if max_memory_gb is not None:
        try:
            server.budget_memory(int(max_memory_gb * 1e9))
        except BaseException:
            server.server_close()
            raise
    return server


def serve(checkpoint: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, *, device: str = "auto",
          max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, max_megapixels: float | None = None,
          max_memory_gb: float | None = DEFAULT_MAX_MEMORY_GB, allowed_hosts: tuple[str, ...] = (),
          score_threshold: float = 0.5, fast: bool = False, log_requests: bool = True,
          ready: Callable[[PixelwiseServer], None] | None = None, **inference: Any) -> None:
    """Load ``checkpoint`` (anything :func:`pixelwise.load` takes) and serve the page until
    interrupted (Ctrl-C). Prints the URL and the largest image it accepts; ``ready(server)``
    is called once it listens. ``inference``: tile, overlap, flip, scales."""
    predictor = Predictor(checkpoint, device, score_threshold=score_threshold, fast=fast, **inference)
    if host not in LOOPBACK_HOSTS:
        print(f"warning: listening on {host}: anyone who can reach this machine can use the page "
              "(there is no authentication)", file=sys.stderr, flush=True)
    server = make_server(predictor, host, port, max_upload_mb=max_upload_mb, max_megapixels=max_megapixels,
                         max_memory_gb=max_memory_gb, allowed_hosts=allowed_hosts, log_requests=log_requests)
    print(f"serving {predictor.model_name} ({predictor.task}, {len(predictor.classes)} classes, "
          f"{predictor.device}) from {checkpoint}", flush=True)
    limit = f"images up to {server.max_pixels / 1e6:.1f} megapixels"
    if server.memory is not None:
        limit += (f" (--max-memory {max_memory_gb:g} GB: {server.memory['baseline_bytes'] / 1e9:.2f} GB for the "
                  f"model, {server.memory['bytes_per_pixel']:.0f} bytes per pixel measured x{_SAFETY:g})")
    print(limit, flush=True)
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
