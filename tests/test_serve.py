"""``vitkit serve`` through FastAPI's test client and one real server: what the page is sent equals what the
inference and interpret code compute; bad uploads are refused with a 4xx and the server keeps serving; only its
own static files are served; a burst beyond the queue gets 503 with Retry-After."""

from __future__ import annotations

import base64
import http.client
import io
import json
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from serve_helpers import need_serve_extra, tiny_mnist_run

need_serve_extra()

from fastapi.testclient import TestClient  # noqa: E402

from vitkit.interpret import attention_to_image, capture_attention, class_activation_map, gradcat  # noqa: E402
from vitkit.interpret.explain import attention_distances  # noqa: E402
from vitkit.serve import Explorer, Limits, create_app, start_in_thread  # noqa: E402
from vitkit.train import load_run, predict  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tiny_mnist_run(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def explorer(run_dir) -> Explorer:
    return Explorer.load(str(run_dir))


@pytest.fixture(scope="module")
def client(explorer) -> TestClient:
    return TestClient(create_app(explorer))


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _decode(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


def _digit(explorer: Explorer, i: int, tmp_path: Path) -> Path:
    path = tmp_path / f"digit{i}.png"
    explorer.held_out[i][0].save(path)
    return path


def test_prediction_and_maps_are_the_inference_and_interpret_results(client, explorer, run_dir, tmp_path):
    info = client.get("/api/info").json()
    assert info["task"] == "classification" and info["classes"] == [str(i) for i in range(10)]
    assert info["input_size"] == [1, 32, 32] and info["held_out"] == 50
    assert [la["heads"] for la in info["layers"]] == [2, 2]
    assert set(info["methods"]) == {"attention", "cam", "gradcat", "distance"} and "rollout" in info["unavailable"]

    path = _digit(explorer, 7, tmp_path)
    res = client.post("/api/images", content=path.read_bytes())
    assert res.status_code == 200, res.text
    body = res.json()
    # the same top-5 as `vitkit predict` on the same file
    run = load_run(run_dir)
    expected = predict(run, [str(path)])[0]["top"]
    assert [t["index"] for t in body["prediction"]["top"]] == [t["index"] for t in expected]
    assert np.allclose([t["prob"] for t in body["prediction"]["top"]], [t["prob"] for t in expected], atol=1e-6)
    # the picture sent is the model's input with the normalisation undone
    x = run.task.eval_transform(run.data_config)(Image.open(path), None, None, None)[0][None]
    shown = _decode(body["input"]).astype(np.float32) / 255
    assert shown.shape == (32, 32)
    assert np.abs(shown - (x[0, 0].numpy() * 0.3081 + 0.1307).clip(0, 1)).max() <= 0.5 / 255 + 1e-6

    iid = body["id"]
    with torch.no_grad(), capture_attention(run.model) as records:
        run.model(x)
    for layer, (y, xq) in [(0, (3, 29)), (1, (20, 9))]:
        a = client.get(f"/api/images/{iid}/attention", params={"layer": layer, "y": y, "x": xq}).json()
        ref = attention_to_image(run.model, records[layer], (32, 32), (y, xq))[0]
        for head, sent in zip(ref, a["heads"]):
            assert sent["max"] == pytest.approx(float(head.max()), rel=1e-5)
            grey = torch.where(head > 0, (head / head.max() * 255).clamp_min(1), 0).numpy()  # 0 only where 0
            assert np.abs(_decode(sent["png"]) - grey).max() <= 0.51
        # NesT level 0 attends only inside the query's 4x4-token (16x16-pixel) block
        m = _decode(a["mean"]["png"])
        by, bx = y // 16 * 16, xq // 16 * 16
        outside = m.copy()
        outside[by : by + 16, bx : bx + 16] = 0
        assert (layer == 1) or (outside.max() == 0 and m[by : by + 16, bx : bx + 16].min() > 0)

    cam = client.get(f"/api/images/{iid}/cam").json()
    ref = class_activation_map(run.model, x)
    assert cam["kind"] == "CAM" and cam["target"] == expected[0]["index"] and cam["peak"] == ref.peaks[0].tolist()
    shown = _decode(cam["map"]["png"])  # minimum to maximum, as explain draws it
    assert shown[tuple(cam["peak"])] == 255 and shown.min() == 0
    assert cam["map"]["max"] == pytest.approx(float(ref.maps[0].max()), rel=1e-5)
    cat = client.get(f"/api/images/{iid}/gradcat", params={"target": 3}).json()
    ref = gradcat(run.model, x, 3)
    assert (
        cat["class"] == "3" and cat["boxes"] == [list(b) for b in ref.boxes[0]] and cat["peak"] == ref.peaks[0].tolist()
    )
    dist = client.get(f"/api/images/{iid}/distance").json()
    assert np.allclose(dist["pixels"], attention_distances(run.model, x, records).numpy(), atol=1e-3)

    # what does not apply is a 400 naming why; what does not exist a 4xx
    assert "ViT" in client.get(f"/api/images/{iid}/rollout").json()["error"]
    assert client.get(f"/api/images/{iid}/attention", params={"layer": 2, "y": 0, "x": 0}).status_code == 400
    assert client.get(f"/api/images/{iid}/attention", params={"layer": 0, "y": 32, "x": 0}).status_code == 400
    assert client.get(f"/api/images/{iid}/cam", params={"target": 10}).status_code == 400
    assert client.get("/api/images/0123456789abcdef/cam").status_code == 404


def test_held_out_images_are_picked_by_index_only(client, explorer):
    body = client.get("/api/held-out/7").json()
    img, label = explorer.held_out[7]
    assert body["index"] == 7 and body["label"] == str(label) and body["size"] == [32, 32]
    assert client.get("/api/held-out/50").status_code == 404
    assert client.get("/api/held-out/-1").status_code == 404
    for bad in ["..%2f..%2fconfig.yaml", "%2fetc%2fpasswd", "1.5", "x"]:
        r = client.get(f"/api/held-out/{bad}")
        assert r.status_code in (404, 422) and "root:" not in r.text


def _png_header_bomb(side: int) -> bytes:
    """A PNG whose header claims ``side x side`` pixels (a few hundred bytes on disk)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_bad_uploads_get_a_clear_4xx_and_the_server_keeps_serving(explorer, tmp_path):
    small = Explorer(explorer.model, explorer.task, explorer.dc, explorer.name, limits=Limits(max_bytes=3000))
    client = TestClient(create_app(small))
    good = _png_bytes(explorer.held_out[0][0])
    truncated = _png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8)))
    cases = [
        (b"", 400, "empty"),
        (b"this is not an image\n" * 10, 400, "not an image"),
        (truncated[: len(truncated) // 2], 400, "not an image"),
        (_png_header_bomb(60000), 413, "too large to decode"),  # 3.6e9 pixels, refused from the header
        (b"\0" * 5000, 413, "at most 3000"),
    ]
    for data, status, words in cases:
        r = client.post("/api/images", content=data)
        assert r.status_code == status and words in r.json()["error"], (status, r.text)
        assert "vitkit-serve-" not in r.json()["error"]  # no temporary file names
        ok = client.post("/api/images", content=good)  # still serving
        assert ok.status_code == 200 and ok.json()["prediction"]["top"]
    # Pillow's own decompression-bomb limit also applies when the server's is set above it
    big = Explorer(explorer.model, explorer.task, explorer.dc, explorer.name, limits=Limits(max_pixels=None))
    r = TestClient(create_app(big)).post("/api/images", content=_png_header_bomb(60000))
    assert r.status_code == 413 and "DecompressionBomb" in r.json()["error"]


def test_only_its_own_static_files_are_served(client):
    assert client.get("/").status_code == 200 and "app.js" in client.get("/").text
    assert client.get("/static/app.js").status_code == 200
    for path in ["/static/%2e%2e/app.py", "/static/..%2fexplorer.py", "/static/%2fetc%2fpasswd", "/static//etc/passwd",
                 "/static/%2e%2e/%2e%2e/%2e%2e/pyproject.toml", "/etc/passwd", "/static/../explorer.py"]:  # fmt: skip
        r = client.get(path)
        assert r.status_code == 404 and "root:" not in r.text and "def " not in r.text, path


def test_a_real_server_refuses_raw_traversal_and_answers_a_burst_with_503(explorer):
    app = create_app(Explorer(explorer.model, explorer.task, explorer.dc, explorer.name, explorer.held_out,
                              limits=Limits(max_waiting=1)))  # fmt: skip
    url, stop = start_in_thread(app)
    host, port = url.split("/")[2].split(":")
    try:
        for raw in ["/static/../explorer.py", "/static/../../../../etc/passwd", "/static/..\\explorer.py"]:
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            conn.request("GET", raw)  # sent as written: no client-side normalisation
            r = conn.getresponse()
            text = r.read().decode(errors="replace")
            assert r.status in (400, 404) and "root:" not in text and "def " not in text, raw
        gate = app.state.gate
        answers = []

        def ask():
            try:
                with urllib.request.urlopen(url + "api/held-out/1", timeout=30) as r:
                    answers.append((r.status, None))
            except urllib.error.HTTPError as e:
                answers.append((e.code, e.headers.get("Retry-After")))

        with gate.lock:  # a computation in progress
            threads = [threading.Thread(target=ask) for _ in range(2)]
            for t in threads:
                t.start()
            deadline = time.time() + 10
            while gate.admitted < 2 and time.time() < deadline:  # one computing, one waiting
                time.sleep(0.01)
            ask()  # a third: refused at once
            assert answers == [(503, "1")]
            # an upload refused while busy still hears why (its body is read first, not cut off by a reset)
            req = urllib.request.Request(url + "api/images", data=b"\0" * 2**20, method="POST")
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(req, timeout=30)
            assert refused.value.code == 503 and "busy" in json.loads(refused.value.read())["error"]
        for t in threads:
            t.join(30)
        assert sorted(answers) == [(200, None), (200, None), (503, "1")]
        assert json.loads(urllib.request.urlopen(url + "api/info", timeout=10).read())["held_out"] == 50
    finally:
        stop()


@pytest.mark.slow
@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_dense_runs_send_the_tasks_boxes_and_mask(task, tmp_path):
    """A two-step run of the shipped recipe on real MNIST canvases: the boxes the page draws are the task's
    predictions (``vitkit predict``) mapped into the model input, and the mask is its label map."""
    from conftest import MNIST, REPO
    from vitkit.data.mnist import MNIST as MnistDigits
    from vitkit.tasks.detection.data import write_mnist_detection
    from vitkit.tasks.segmentation.data import voc_palette, write_mnist_segmentation
    from vitkit.train import Trainer, load_config

    if not any(MNIST.glob("t10k-images*")):
        pytest.skip(f"the real MNIST digits are not at {MNIST}")
    digits = MnistDigits(MNIST, "test")
    write, name, recipe = {
        "detection": (write_mnist_detection, "coco", "det_ssdlite_mobilevit.yaml"),
        "segmentation": (write_mnist_segmentation, "voc", "seg_deeplabv3_mobilevit.yaml"),
    }[task]
    root = write(digits.images[:300], digits.labels[:300], tmp_path / "data", n_train=8, n_val=4, train_digits=200)
    sets = [f"data.dataset={name}", f"data.root={root}", "data.train_split=train", "data.val_split=val",
            "data.batch_size=4", "model.img_size=128", "train.max_steps=2", "train.progress=false",
            f"train.output={tmp_path / 'run'}"]  # fmt: skip
    Trainer(load_config(REPO / "configs" / recipe, sets)).fit()
    explorer = Explorer.load(str(tmp_path / "run"))
    assert explorer.info()["task"] == task and explorer.info()["held_out"] == 4
    assert "attention" in explorer.info()["methods"] and "cam" in explorer.info()["unavailable"]
    canvas = explorer.held_out[0][0].resize((200, 160))  # not the input's shape: boxes must be mapped
    path = tmp_path / "canvas.png"
    canvas.save(path)
    body = TestClient(create_app(explorer)).post("/api/images", content=path.read_bytes()).json()
    run = load_run(tmp_path / "run")
    if task == "detection":
        ref = predict(run, [str(path)], score=0.05)[0]["detections"]
        scale = min(128 / 160, 128 / 200)
        assert len(body["boxes"]) == len(ref) > 0
        for sent, d in zip(body["boxes"], ref):
            assert sent["label"] == d["label"] and sent["score"] == d["score"]
            assert sent["box"] == pytest.approx([v * scale for v in d["box"]], abs=0.06)
    else:
        labels = predict(run, [str(path)])[0]["_labels"]
        mask = _decode(body["mask"])
        assert mask.shape == (128, 128, 4) and np.array_equal(mask[..., 3] > 0, labels > 0)
        pal = np.asarray(voc_palette(), dtype=np.uint8).reshape(-1, 3)
        assert np.array_equal(mask[..., :3][labels > 0], pal[labels[labels > 0]])
