"""`pixelwise serve` for real clients (issue 16 item 6): multipart/form-data uploads, malformed
Content-Length, DNS-rebinding Host check, 20 simultaneous clients, the non-loopback warning,
and the memory budget measured on a server subprocess serving its largest accepted image."""
from __future__ import annotations

import http.client
import io
import json
import os
import re
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pixelwise
from pixelwise.data.loading import normalization_for
from pixelwise.engine.checkpoint import save_checkpoint
from pixelwise.serve import Predictor, make_server

ROOT = Path(__file__).resolve().parent.parent
CLASSES = [{"id": i, "name": n, "isthing": False, "color": c} for i, (n, c) in
           enumerate([("background", [0, 0, 0]), ("circle", [220, 20, 60]), ("square", [30, 144, 255])])]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    m = pixelwise.build_model("unet", 3, width=0.125)
    return save_checkpoint(tmp_path_factory.mktemp("serve") / "best.pt", {
        "model": m.pixelwise_spec, "state_dict": m.state_dict(), "classes": CLASSES,
        "normalization": normalization_for("RGB", None, None), "config": {}, "epoch": 0, "step": 0, "metrics": {},
        "task": "semantic"})


@pytest.fixture(scope="module")
def server(ckpt):
    s = make_server(Predictor(ckpt, "cpu"), "127.0.0.1", 0, max_upload_mb=1)
    t = threading.Thread(target=s.serve_forever, daemon=True)
    t.start()
    yield s
    s.shutdown()
    s.server_close()
    t.join(10)


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _image(h: int = 40, w: int = 56) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.random((h, w, 3)) * 255).astype(np.uint8)


def _post(port: int, body: bytes, headers: dict[str, str], path: str = "/api/predict") -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.putrequest("POST", path, skip_host="Host" in headers)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders(body)
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def _form(fields: list[tuple[str, str | None, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body as browsers and curl -F write it."""
    boundary = "----pixelwise" + uuid.uuid4().hex
    out = b""
    for name, filename, data in fields:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        ctype = "Content-Type: image/png\r\n" if filename else ""
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n{ctype}\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_multipart_upload_equals_raw_upload(server):
    port = server.server_address[1]
    png = _png(_image())
    status, raw = _post(port, png, {"Content-Length": str(len(png))})
    assert status == 200
    body, ctype = _form([("note", None, b"hello"), ("file", "cat.png", png)])
    status, form = _post(port, body, {"Content-Type": ctype, "Content-Length": str(len(body))})
    assert status == 200, form
    assert form["labels"] == raw["labels"] and form["filename"] == "cat.png"
    body, ctype = _form([("image", "dog.png", png)])  # another field name: the file field is taken
    status, other = _post(port, body, {"Content-Type": ctype, "Content-Length": str(len(body))})
    assert status == 200 and other["labels"] == raw["labels"] and other["filename"] == "dog.png"
    body, ctype = _form([("note", None, b"hello"), ("x", None, b"y")])
    status, err = _post(port, body, {"Content-Type": ctype, "Content-Length": str(len(body))})
    assert status == 400 and "no file" in err["error"] and "note" in err["error"]
    status, err = _post(port, png, {"Content-Type": "multipart/form-data; boundary=nope",
                                    "Content-Length": str(len(png))})
    assert status == 400 and "multipart" in err["error"]


def test_curl_form_upload(server, tmp_path):
    import shutil

    if shutil.which("curl") is None:
        pytest.skip("no curl")
    (tmp_path / "im.png").write_bytes(_png(_image()))
    out = subprocess.run(["curl", "-s", "-F", f"file=@{tmp_path / 'im.png'}", server.url + "api/predict"],
                         capture_output=True, timeout=120, check=True).stdout
    answer = json.loads(out)
    assert answer["filename"] == "im.png" and answer["width"] == 56 and len(answer["legend"]) == 3


@pytest.mark.parametrize("length", ["-5", "abc", "+5", "5 5", ""])
def test_malformed_content_length_is_400(server, length):
    status, err = _post(server.server_address[1], b"12345", {"Content-Length": length})
    assert status == 400 and "Content-Length" in err["error"]


def test_host_header_is_checked_against_dns_rebinding(server):
    port = server.server_address[1]
    png = _png(_image())
    for host, want in ((f"evil.example:{port}", 403), ("attacker.test", 403), (f"localhost:{port}", 200),
                       (f"127.0.0.1:{port}", 200)):
        status, ans = _post(port, png, {"Host": host, "Content-Length": str(len(png))})
        assert status == want, (host, ans)
        if want == 403:
            assert "DNS rebinding" in ans["error"]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/api/info", headers={"Host": "evil.example"})
    assert conn.getresponse().status == 403
    conn.close()
    assert server.host_allowed("[::1]:80") and not server.host_allowed("10.0.0.1")  # bound to loopback


def test_twenty_simultaneous_clients_get_answers(server):
    port = server.server_address[1]
    png = _png(_image(24, 24))
    go = threading.Barrier(20)
    results: list = []

    def client() -> None:
        go.wait()
        try:
            results.append(_post(port, png, {"Content-Length": str(len(png))})[0])
        except Exception as e:  # a reset connection
            results.append(repr(e))

    threads = [threading.Thread(target=client) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert results == [200] * 20
    assert server.request_queue_size >= 20


def test_non_loopback_host_warns(ckpt, capsys):
    from pixelwise.serve import serve

    serve(ckpt, "0.0.0.0", 0, device="cpu", max_memory_gb=None, log_requests=False,
          ready=lambda s: threading.Thread(target=s.shutdown, daemon=True).start())
    captured = capsys.readouterr()
    assert "warning: listening on 0.0.0.0" in captured.err and "no authentication" in captured.err
    serve(ckpt, "127.0.0.1", 0, device="cpu", max_memory_gb=None, log_requests=False,
          ready=lambda s: threading.Thread(target=s.shutdown, daemon=True).start())
    assert "warning" not in capsys.readouterr().err


def _hwm(pid: int) -> int:
    """Peak resident memory (VmHWM) of a process, bytes."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_largest_accepted_image_keeps_peak_rss_under_max_memory(ckpt):
    """A server subprocess with --max-memory 1.6 GB serves the largest image it accepts; its
    peak RSS (VmHWM) stays under 1.6 GB, and one more row is refused with 413."""
    budget = 1.6e9
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "pixelwise", "serve", "--checkpoint", str(ckpt), "--port", "0",
                             "--device", "cpu", "--quiet", "--max-memory", str(budget / 1e9), "--max-upload-mb", "5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        while True:
            line = proc.stdout.readline()
            assert line, "".join(lines) + proc.stderr.read()
            lines.append(line)
            if "(Ctrl-C stops)" in line:
                break
        port = int(re.search(r"127\.0\.0\.1:(\d+)/", line).group(1))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/api/info")
        info = json.loads(conn.getresponse().read())
        conn.close()
        max_pixels = info["max_pixels"]
        assert info["max_memory_bytes"] == int(budget) and info["memory"]["baseline_bytes"] < budget
        assert max_pixels > 256 * 256, info  # a useful budget, not a trivial one
        w = int(max_pixels ** 0.5)
        h = max_pixels // w
        # a smooth image (small PNG) with noise in it, as large as accepted
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), (xx + yy) % 256], -1)
        img = img.astype(np.uint8)
        img[: h // 8, : w // 8] = np.random.default_rng(0).integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        png = _png(img)
        assert len(png) < 5e6
        status, ans = _post(port, png, {"Content-Length": str(len(png))})
        assert status == 200 and ans["width"] == w and ans["height"] == h
        peak = _hwm(proc.pid)
        print(f"max_memory {budget / 1e9:.2f} GB, largest accepted {w}x{h} = {w * h / 1e6:.2f} MP, "
              f"peak RSS {peak / 1e9:.3f} GB, memory {info['memory']}")
        assert peak <= budget
        bigger = _png(np.zeros((h + 1, w, 3), np.uint8))
        status, err = _post(port, bigger, {"Content-Length": str(len(bigger))})
        assert status == 413 and "--max-memory" in err["error"]
    finally:
        proc.terminate()
        proc.wait(30)
