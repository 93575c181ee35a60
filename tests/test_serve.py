"""`pixelwise serve`: the JSON API against the Python API, refusals, the CLI, and an
end-to-end run of the page in Debian's headless Chromium (selenium + chromium-driver).

The end-to-end test skips without chromium/chromedriver, except under ``CI`` (it fails
there: CI installs them, see .ci/run). Its screenshot goes to ``test-artifacts/serve.png``.
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pixelwise
from pixelwise.engine.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from pixelwise.engine.common import normalization_for
from pixelwise.serve import Predictor, make_server

ROOT = Path(__file__).resolve().parent.parent
CLASSES = [("background", [0, 0, 0], False), ("circle", [220, 20, 60], True), ("square", [30, 144, 255], True)]
MASKRCNN_TINY = dict(preset="cpu", fpn_channels=16, mask_head_channels=8, box_head_dim=32, min_size=64, max_size=64,
                     rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20, anchor_sizes=(8, 16, 32, 64, 128))


def _class_dicts() -> list[dict]:
    return [{"id": i, "name": n, "isthing": t, "color": c} for i, (n, c, t) in enumerate(CLASSES)]


def _save(path: Path, model: torch.nn.Module, task: str, **extra) -> Path:
    """A checkpoint in the format engine/train.py and engine/instance.py write (minus optimizer state)."""
    return save_checkpoint(path, {"model": model.pixelwise_spec, "state_dict": model.state_dict(),
                                  "classes": _class_dicts(), "normalization": normalization_for("RGB", None, None),
                                  "config": {}, "epoch": 0, "step": 0, "metrics": {}, "task": task, **extra})


@pytest.fixture(scope="module")
def semantic_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return _save(tmp_path_factory.mktemp("sem") / "best.pt", pixelwise.build_model("unet", 3, width=0.125), "semantic")


@pytest.fixture(scope="module")
def instance_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return _save(tmp_path_factory.mktemp("inst") / "best.pt", pixelwise.build_model("maskrcnn", 3, **MASKRCNN_TINY),
                 "instance", category_ids=[0, 1, 2])


def _image(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = (rng.random((h, w, 3)) * 80).astype(np.uint8)
    img[8:30, 6:28] = (220, 40, 60)
    img[20:44, 34:60] = (40, 120, 240)
    return img


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _from_data_url(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


class _Running:
    """A server on a free port, serving in a thread."""

    def __init__(self, predictor: Predictor, **kw):
        self.server = make_server(predictor, "127.0.0.1", 0, **kw)
        self.url = self.server.url
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    def request(self, path: str, data: bytes | None = None, name: str | None = None) -> tuple[int, dict | str]:
        headers = {"Content-Type": "application/octet-stream"} if data is not None else {}
        if name:
            headers["X-Filename"] = urllib.parse.quote(name)
        req = urllib.request.Request(self.url.rstrip("/") + path, data=data, headers=headers,
                                     method="POST" if data is not None else "GET")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, ctype, body = r.status, r.headers["Content-Type"], r.read()
        except urllib.error.HTTPError as e:
            status, ctype, body = e.code, e.headers["Content-Type"], e.read()
        return status, json.loads(body) if ctype.startswith("application/json") else body.decode()


@pytest.fixture(scope="module")
def semantic_server(semantic_ckpt):
    s = _Running(Predictor(semantic_ckpt, "cpu"), max_upload_mb=0.05, max_megapixels=0.02)
    yield s
    s.close()


def test_page_and_info(semantic_server):
    status, page = semantic_server.request("/")
    assert status == 200 and 'id="overlay"' in page and 'type="file"' in page and 'id="opacity"' in page
    assert "http://" not in page and "https://" not in page  # self-contained: nothing from a CDN
    status, info = semantic_server.request("/api/info")
    assert status == 200 and info["model"] == "unet" and info["task"] == "semantic"
    assert [c["name"] for c in info["classes"]] == [c[0] for c in CLASSES]
    assert info["max_upload_bytes"] == 50_000
    status, err = semantic_server.request("/nothing-here")
    assert status == 404 and "not found" in err["error"]


def test_semantic_predict_matches_predict_array(semantic_server, semantic_ckpt):
    from pixelwise.engine.predict import predict_array

    img = _image()
    status, res = semantic_server.request("/api/predict", _png(img), name="my photo.png")
    assert status == 200, res
    ckpt = load_checkpoint(semantic_ckpt)
    expected = predict_array(model_from_checkpoint(ckpt).eval(), img, ckpt["normalization"])
    labels = _from_data_url(res["labels"])
    assert res["task"] == "semantic" and (res["width"], res["height"]) == (64, 48)
    assert labels.shape == (48, 64) and np.array_equal(labels, expected)
    assert len(np.unique(expected)) >= 2  # the legend below is not a one-class special case
    np.testing.assert_array_equal(_from_data_url(res["image"]), img)  # the decoded input is sent back
    layer = _from_data_url(res["layer"])
    assert layer.shape == (48, 64, 4) and (layer[..., 3] == 255).all()
    for row in res["legend"]:  # one row per class: its colour on its pixels, its pixel count and share
        assert row["name"] == CLASSES[row["id"]][0] and row["color"] == CLASSES[row["id"]][1]
        assert row["pixels"] == int((expected == row["id"]).sum())
        assert row["share"] == pytest.approx(row["pixels"] / expected.size)
        assert (layer[expected == row["id"]][:, :3] == row["color"]).all()
    assert sum(r["share"] for r in res["legend"]) == pytest.approx(1.0)
    assert res["filename"] == "my photo.png"


def test_refusals_are_clear_and_the_server_keeps_serving(semantic_server, monkeypatch):
    too_big = np.random.default_rng(0).integers(0, 256, 60_000, dtype=np.uint8).tobytes()
    status, err = semantic_server.request("/api/predict", too_big, name="huge.png")
    assert status == 413 and "huge.png" in err["error"] and "at most 50.0 kB" in err["error"]
    status, err = semantic_server.request("/api/predict", b"%PDF-1.4 this is not an image", name="doc.pdf")
    assert status == 400 and "doc.pdf" in err["error"] and "not a readable image" in err["error"]
    png = _png(_image())
    status, err = semantic_server.request("/api/predict", png[: len(png) // 2], name="cut.png")
    assert status == 400 and "truncated" in err["error"]
    status, err = semantic_server.request("/api/predict", b"", name="empty.png")
    assert status == 400 and "empty" in err["error"]
    # many pixels in few bytes (max_megapixels=0.02 here): refused before decoding
    status, err = semantic_server.request("/api/predict", _png(np.zeros((200, 200, 3), np.uint8)), name="big.png")
    assert status == 413 and "200x200" in err["error"] and "--max-megapixels" in err["error"]
    # chunked uploads (no Content-Length) are read with the same limit; no length at all is a 411
    port = semantic_server.server.server_address[1]
    _, direct = semantic_server.request("/api/predict", png)
    for chunks, want in (([png[:1000], png[1000:]], 200), ([too_big[:30_000], too_big[30_000:]], 413)):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/api/predict", body=iter(chunks), encode_chunked=True)
        r = conn.getresponse()
        answer = json.loads(r.read())
        conn.close()
        assert r.status == want
        if want == 200:
            assert answer["labels"] == direct["labels"]
        else:
            assert "60.0 kB" in answer["error"] and "at most 50.0 kB" in answer["error"]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.putrequest("POST", "/api/predict")
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 411 and "Content-Length" in json.loads(r.read())["error"]
    conn.close()
    # an unexpected failure inside the model is a 500 with a message (no exception text: it
    # stays in the server's log), not a dead server
    predictor = semantic_server.server.predictor

    def boom(image):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(predictor, "predict", boom)
    status, err = semantic_server.request("/api/predict", png, name="x.png")
    assert status == 500 and "x.png: prediction failed" in err["error"]
    assert "RuntimeError" not in err["error"] and "simulated" not in err["error"]
    monkeypatch.undo()
    status, res = semantic_server.request("/api/predict", png)
    assert status == 200 and len(res["legend"]) == 3
    assert semantic_server.request("/")[0] == 200


def test_instance_predict_matches_predict_instance_files(instance_ckpt, tmp_path):
    from pixelwise.engine.instance import instance_colors, predict_instance_files

    img = _image(seed=1)
    (tmp_path / "im.png").write_bytes(_png(img))
    # the untrained tiny model scores its detections about 0.4: 0.3 keeps some of them
    predict_instance_files(instance_ckpt, [tmp_path / "im.png"], tmp_path / "out", "cpu", progress=False,
                           score_threshold=0.3)
    expected = np.asarray(Image.open(tmp_path / "out" / "im.png"))
    dets = json.loads((tmp_path / "out" / "im.json").read_text())
    s = _Running(Predictor(instance_ckpt, "cpu", score_threshold=0.3))
    try:
        status, res = s.request("/api/predict", _png(img), name="im.png")
    finally:
        s.close()
    assert status == 200, res
    ids = _from_data_url(res["labels"])
    assert res["task"] == "instance" and np.array_equal(ids, expected)
    legend = res["legend"]
    k = len(dets)
    assert k >= 2 and len(legend) == k + 1 and legend[0]["id"] == 0 and legend[0]["color"] is None
    assert [r["name"] for r in legend[1:]] == [d["class_name"] for d in dets]
    assert [r["score"] for r in legend[1:]] == pytest.approx([d["score"] for d in dets], abs=1e-4)  # JSON: 5 digits
    assert all(r["score"] >= 0.3 for r in legend[1:])
    assert sum(r["share"] for r in legend) == pytest.approx(1.0)
    layer = _from_data_url(res["layer"])
    assert (layer[ids == 0][:, 3] == 0).all()  # transparent where there is no instance
    for r, color in zip(legend[1:], instance_colors(k)):  # each instance in its own colour
        assert r["color"] == list(color) and r["pixels"] == int((ids == r["id"]).sum())
        assert (layer[ids == r["id"]] == [*color, 255]).all()


CATEGORIES = [{"id": 1, "name": "circle", "isthing": 1, "color": [220, 20, 60]},
              {"id": 2, "name": "square", "isthing": 1, "color": [30, 144, 255]},
              {"id": 3, "name": "sky", "isthing": 0, "color": [135, 206, 235]},
              {"id": 4, "name": "grass", "isthing": 0, "color": [34, 139, 34]}]


def test_panoptic_predict_matches_predict_panoptic_files(tmp_path):
    from pixelwise.engine.panoptic import PREDICTIONS_JSON, predict_panoptic_files, segment_colors

    torch.manual_seed(0)
    # untrained: thing scores are about 0.4, so merge from 0.3; tiny images: small stuff areas kept
    model = pixelwise.build_model("panoptic_fpn", 4, num_things=3, merge_score_threshold=0.3, stuff_area=16.0,
                                  scale_stuff_area=False, semantic_channels=32, **MASKRCNN_TINY)
    ckpt = save_checkpoint(tmp_path / "pan.pt", {
        "model": model.pixelwise_spec, "state_dict": model.state_dict(), "classes": CATEGORIES,
        "normalization": normalization_for("RGB", None, None), "config": {}, "epoch": 0, "step": 0, "metrics": {},
        "task": "panoptic", "categories": CATEGORIES, "thing_ids": [1, 2], "stuff_ids": [3, 4]})
    img = _image(seed=2)
    (tmp_path / "im.png").write_bytes(_png(img))
    predict_panoptic_files(ckpt, [tmp_path / "im.png"], tmp_path / "out", "cpu", progress=False)
    rgb = np.asarray(Image.open(tmp_path / "out" / "im.png")).astype(np.int64)
    expected = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]  # COCO panoptic PNG ids
    segs = json.loads((tmp_path / "out" / PREDICTIONS_JSON).read_text())["annotations"][0]["segments_info"]
    s = _Running(Predictor(ckpt, "cpu"))
    try:
        assert s.request("/api/info")[1]["classes"][2]["name"] == "sky"
        status, res = s.request("/api/predict", _png(img), name="im.png")
    finally:
        s.close()
    assert status == 200, res
    ids = _from_data_url(res["labels"])
    assert res["task"] == "panoptic" and np.array_equal(ids, expected)
    legend = res["legend"]
    assert legend[0]["id"] == 0 and legend[0]["name"] == "(void)" and len(legend) == len(segs) + 1
    assert {r["isthing"] for r in legend[1:]} == {True, False}  # things and stuff both present
    names = {c["id"]: c["name"] for c in CATEGORIES}
    for r, seg in zip(legend[1:], segs):
        assert (r["id"], r["category_id"], r["name"], r["pixels"]) == \
            (seg["id"], seg["category_id"], names[seg["category_id"]], seg["area"])
        assert ("score" in r) == r["isthing"] and r.get("score", 0) == pytest.approx(seg.get("score", 0), abs=1e-4)
    assert sum(r["share"] for r in legend) == pytest.approx(1.0)
    layer = _from_data_url(res["layer"])
    assert (layer[ids == 0][:, 3] == 0).all()
    for r, color in zip(legend[1:], segment_colors(segs, CATEGORIES)):  # every segment in its own colour
        assert r["color"] == list(color) and (layer[ids == r["id"]] == [*color, 255]).all()


def test_cli_serve_port_0_prints_the_url(semantic_ckpt, monkeypatch, capsys):
    """`pixelwise serve --port 0` (run in this process, in a thread: no second torch import)."""
    import pixelwise.serve as serve_mod
    from pixelwise.cli import main

    servers: list = []
    make = serve_mod.make_server
    monkeypatch.setattr(serve_mod, "make_server", lambda *a, **kw: servers.append(make(*a, **kw)) or servers[-1])
    result: list = []
    t = threading.Thread(target=lambda: result.append(main(
        ["serve", "--checkpoint", str(semantic_ckpt), "--port", "0", "--device", "cpu", "--quiet",
         "--max-upload-mb", "3", "--max-megapixels", "7", "--score-threshold", "0.25", "--tta-flip"])), daemon=True)
    t.start()
    out = ""
    try:
        while "(Ctrl-C stops)" not in out and t.is_alive():
            t.join(0.05)
            out += capsys.readouterr().out
        port = servers[0].server_address[1]
        assert port != 0 and f"open http://127.0.0.1:{port}/  (Ctrl-C stops)" in out
        assert "serving unet (semantic, 3 classes, cpu)" in out and servers[0].max_upload_bytes == 3_000_000
        predictor = servers[0].predictor  # every flag reaches the server and its predictor
        assert servers[0].max_megapixels == 7.0 and predictor.score_threshold == 0.25 and not servers[0].log_requests
        assert predictor.inference == {"tile": None, "overlap": None, "flip": True, "scales": None}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info", timeout=60) as r:
            assert json.loads(r.read())["model"] == "unet"
    finally:
        if servers:
            servers[0].shutdown()
        t.join(30)
    assert result == [0]
    # a port in use: one clear line, exit code 2
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code = main(["serve", "--checkpoint", str(semantic_ckpt), "--port", str(busy.getsockname()[1]),
                     "--device", "cpu"])
    assert code == 2 and "cannot listen on 127.0.0.1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# end to end: the page in headless Chromium
# ---------------------------------------------------------------------------------------


def _chromium() -> tuple[str, str, object]:
    """(browser, driver, selenium.webdriver) or skip (fail under CI) with the reason."""
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
    driver = shutil.which("chromedriver")
    reason = None
    if browser is None or driver is None:
        reason = "no chromium/chromedriver: apt-get install chromium chromium-driver (Debian; .ci/run does it)"
    try:
        from selenium import webdriver
    except ImportError:
        webdriver, reason = None, reason or "selenium is not installed (pip install -e .[test])"
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the end-to-end test of pixelwise serve: {reason}")
        pytest.skip(reason)
    return browser, driver, webdriver


def test_page_end_to_end_in_headless_chromium(semantic_ckpt, instance_ckpt, tmp_path):
    browser, driver_path, webdriver = _chromium()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from pixelwise.data.io import atomic_write_bytes
    from pixelwise.engine.predict import predict_array

    predictor = Predictor(semantic_ckpt, "cpu")
    calls = []
    predict = predictor.predict
    predictor.predict = lambda image: calls.append(image.shape) or predict(image)
    server = _Running(predictor, max_upload_mb=0.2)
    img = _image(72, 96, seed=3)
    good = tmp_path / "photo.png"
    good.write_bytes(_png(img))
    not_image = tmp_path / "notes.png"
    not_image.write_text("these are notes, not pixels")
    too_big = tmp_path / "big.tif"
    too_big.write_bytes(np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes())
    ckpt = load_checkpoint(semantic_ckpt)
    expected = predict_array(model_from_checkpoint(ckpt).eval(), img, ckpt["normalization"])

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,900",
                f"--user-data-dir={tmp_path / 'profile'}", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver_path))
    wait = WebDriverWait(drv, 90)
    js_result_shown = ("const o = document.getElementById('overlay'); return !document.getElementById('result').hidden"
                       " && o.complete && o.naturalWidth > 0 && o.src.startsWith('data:image/png');")
    try:
        drv.get(server.url)
        wait.until(lambda d: "unet" in d.find_element(By.ID, "info").text)  # /api/info answered
        assert "uploads up to 200.0 kB" in drv.find_element(By.ID, "info").text
        drv.find_element(By.ID, "file").send_keys(str(good))
        wait.until(lambda d: d.execute_script(js_result_shown))
        size = drv.execute_script("const o = document.getElementById('overlay');"
                                  " return [o.naturalWidth, o.naturalHeight];")
        assert size == [96, 72]
        rows = drv.find_elements(By.CSS_SELECTOR, "#legend tbody tr")
        present = sorted(np.unique(expected).tolist(), key=lambda c: -(expected == c).sum())
        assert [int(r.get_attribute("data-id")) for r in rows] == present  # present classes, largest share first
        for r in rows:
            c = int(r.get_attribute("data-id"))
            assert CLASSES[c][0] in r.text and f"{100 * (expected == c).mean():.1f} %" in r.text
        # the opacity slider blends the label layer over the input in the browser
        drv.execute_script("const s = document.getElementById('opacity'); s.value = 25;"
                           " s.dispatchEvent(new Event('input'));")
        assert drv.execute_script("return document.getElementById('overlay').style.opacity") == "0.25"
        drv.execute_script("const s = document.getElementById('opacity'); s.value = 60;"
                           " s.dispatchEvent(new Event('input'));")
        ROOT.joinpath("test-artifacts").mkdir(exist_ok=True)
        atomic_write_bytes(ROOT / "test-artifacts" / "serve.png", drv.get_screenshot_as_png())
        assert len(calls) == 1

        # a non-image and a too-large file: a clear message on the page, the result hidden
        drv.find_element(By.ID, "file").send_keys(str(not_image))
        wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
        msg = drv.find_element(By.ID, "error").text
        assert "HTTP 400" in msg and "notes.png" in msg and "not a readable image" in msg
        assert not drv.find_element(By.ID, "result").is_displayed()
        drv.find_element(By.ID, "file").send_keys(str(too_big))
        wait.until(lambda d: "413" in d.find_element(By.ID, "error").text)
        msg = drv.find_element(By.ID, "error").text
        assert "big.tif" in msg and "at most 200.0 kB" in msg and "--max-upload-mb" in msg

        # drag and drop (a synthetic drop event carrying the file): one upload, the result is back
        b64 = base64.b64encode(_png(img)).decode()
        drv.execute_script(
            "const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));"
            "const dt = new DataTransfer(); dt.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));"
            "document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true,"
            " cancelable: true}));", b64)
        wait.until(lambda d: d.execute_script(js_result_shown) and "dropped.png" in d.find_element(By.ID, "size").text)
        assert not drv.find_element(By.ID, "error").is_displayed()
        assert len(calls) == 2  # the drop was segmented once (not once per listener)
        # no script errors, no blocked resources: only the two refused uploads were logged
        errors = [e["message"] for e in drv.get_log("browser") if e["level"] == "SEVERE"]
        assert len(errors) == 2 and all("status of 400" in e or "status of 413" in e for e in errors), errors

        # an instance checkpoint: one legend row per instance (class, score) after the "no instance" row
        server.close()
        server = _Running(Predictor(instance_ckpt, "cpu", score_threshold=0.3))
        drv.get(server.url)
        wait.until(lambda d: "maskrcnn (instance" in d.find_element(By.ID, "info").text)
        drv.find_element(By.ID, "file").send_keys(str(good))
        wait.until(lambda d: d.execute_script(js_result_shown))
        _, res = server.request("/api/predict", good.read_bytes())
        rows = drv.find_elements(By.CSS_SELECTOR, "#legend tbody tr")
        assert len(res["legend"]) >= 3 and len(rows) == len(res["legend"])
        for r, want in zip(rows, res["legend"]):
            assert int(r.get_attribute("data-id")) == want["id"] and want["name"] in r.text
            if want["id"]:
                assert f"{want['score']:.2f}" in r.text
        assert f"{len(res['legend']) - 1} instances" in drv.find_element(By.ID, "note").text
    finally:
        drv.quit()
        server.close()
