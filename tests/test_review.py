"""Tests for vertjax.review: the queue's reasons, the HTTP server, saving, safety.

The server runs in a thread on 127.0.0.1, port 0, over a prediction folder
written with `vertjax.predict`'s own record and CSV writers, of small
synthetic films: one clean, one with two names out of order, one with a
vertebra missing, a malformed JSON and a prediction whose image is gone.
"""

from __future__ import annotations

import contextlib
import csv
import http.client
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tfds_builder.spine_radiographs import folder
from vertjax import datasets, predict, vertebrae
from vertjax.review import catalog, server, store, suspicion

REPO = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 64, 240
# A straight spine: T4 at y = 20, one vertebra every 15 px.
STRAIGHT = np.stack([np.full(vertebrae.K, 32.0), 20.0 + 15.0 * np.arange(vertebrae.K)], axis=1)


def _film(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8)


def _prediction(image: str, xy=STRAIGHT, confidence=None, present=None) -> dict:
    confidence = np.full(vertebrae.K, 0.9) if confidence is None else np.asarray(confidence)
    present = confidence >= 0.5 if present is None else np.asarray(present)
    return predict.prediction_record(
        image=image,
        width=WIDTH,
        height=HEIGHT,
        spacing=None,
        points=np.asarray(xy),
        confidence=confidence,
        present=present,
        model={"model": "test", "checkpoint_step": 1},
    )


def make_predictions(root: Path) -> tuple[Path, Path]:
    """(prediction folder, images folder) as `vertjax predict` leaves them."""
    images, pred = root / "images", root / "pred"
    (images / "sub").mkdir(parents=True)
    pred.mkdir()
    swapped = STRAIGHT.copy()
    swapped[[4, 5]] = swapped[[5, 4]]  # T9 drawn above T8
    gap = np.full(vertebrae.K, 0.9)
    gap[3] = 0.2  # T7 below the presence threshold
    films = {
        "clean": ("clean.png", _prediction("clean.png")),
        "swapped": ("sub/swapped.png", _prediction("swapped.png", xy=swapped)),
        "gap": ("gap.png", _prediction("gap.png", confidence=gap)),
        "gone": ("gone.png", _prediction("gone.png")),
    }
    rows = []
    for seed, (stem, (rel, record)) in enumerate(films.items()):
        if stem != "gone":
            Image.fromarray(_film(seed)).save(images / rel)
        (pred / f"{stem}.json").write_text(json.dumps(record))
        rows += predict.csv_rows(record, path=str(images / rel), output=stem)
    predict.write_csv(pred / predict.CSV_FILE, rows)
    (pred / "broken.json").write_text('{"image": "x.png", "width": ')
    return pred, images


@contextlib.contextmanager
def serving(pred: Path, images: Path | None = None, *, token: str | None = None):
    """A review server in a thread; yields it, then shuts it down."""
    if token is None:
        srv = server.make_server(str(pred), images=images and str(images), port=0)
    else:  # the token rule, exercised on loopback so that nothing is exposed
        app = server.App(catalog.load(pred, images), token=token, loopback=False)
        srv = server.ReviewServer(("127.0.0.1", 0), app)
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join()


def request(srv, method: str, path: str, body=None, headers=None):
    """(status, headers, body bytes) of one request, the path sent as given."""
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=30)
    try:
        data = None if body is None else json.dumps(body).encode()
        sent = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=data, headers={**sent, **(headers or {})})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def get_json(srv, path: str, **kwargs):
    status, _, data = request(srv, "GET", path, **kwargs)
    assert status == 200, data
    return json.loads(data)


def put(srv, pid: str, version: str, points, *, participant=None, split="", headers=None):
    body = {
        "points": [{"name": n, "x": x, "y": y} for n, (x, y) in points.items()],
        "participant": participant or pid,
        "split": split,
        "edits": [{"action": "move", "time": "2026-01-01T00:00:00Z"}],
    }
    status, _, data = request(
        srv, "PUT", f"/api/radiograph/{pid}", body, {"If-Match": f'"{version}"', **(headers or {})}
    )
    return status, json.loads(data)


def _contents(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@pytest.fixture
def folders(tmp_path):
    return make_predictions(tmp_path)


# --- suspicion ----------------------------------------------------------------------------------


def test_suspicion_reasons_and_points():
    present = np.ones(vertebrae.K, bool)
    confidence = np.full(vertebrae.K, 0.9)
    clean = suspicion.assess(STRAIGHT, confidence, present)
    assert clean.score == 0 and clean.reasons == ()

    xy = STRAIGHT.copy()
    xy[[4, 5]] = xy[[5, 4]]  # T9 above T8
    found = suspicion.assess(xy, confidence, present)
    assert [r.text for r in found.reasons] == [
        "T9 lies above T8",
        "T7-T8 spacing 2.0x the usual 15 px",  # T8 drawn where T9 belongs
        "T9-T10 spacing 2.0x the usual 15 px",
    ]
    assert found.score == 3 + 2 * 1.5

    confidence[3] = 0.6  # present, but 0.1 below LOW_CONFIDENCE: 5 x 0.1
    present[7] = False  # T11 missing between T10 and T12
    xy = STRAIGHT.copy()
    xy[12, 1] = xy[11, 1] + 5  # L4 5 px below L3: under half of 15, and a short step
    found = suspicion.assess(xy, confidence, present)
    by_kind = {r.kind: r for r in found.reasons}
    assert set(by_kind) == {"confidence", "missing", "close"}
    assert by_kind["confidence"].points == pytest.approx(0.5)
    assert by_kind["missing"].text == "T11 missing between T10 and T12"
    assert by_kind["close"].text == "L3 and L4 are 5 px apart, under half the usual 15 px"
    assert found.score == pytest.approx(0.5 + 2 + 3)

    xy = STRAIGHT.copy()
    xy[8:, 1] += 20  # T12 to L1: a 35 px step where 15 are usual
    found = suspicion.assess(xy, np.full(vertebrae.K, 0.9), np.ones(vertebrae.K, bool))
    assert [r.text for r in found.reasons] == ["T11-T12 spacing 2.3x the usual 15 px"]
    nothing = suspicion.assess(STRAIGHT, np.zeros(vertebrae.K), np.zeros(vertebrae.K, bool))
    assert nothing.reasons[0].kind == "none" and nothing.score == suspicion.WEIGHTS["none"]


# --- listing and images ---------------------------------------------------------------------


def test_queue_lists_worst_first_and_serves_the_film(folders):
    pred, images = folders
    with serving(pred) as srv:  # images found through predictions.csv
        queue = get_json(srv, "/api/queue")
        status, headers, page = request(srv, "GET", "/")
        _, js_headers, script = request(srv, "GET", "/static/review.js")
        _, _, png = request(srv, "GET", "/api/image/swapped")
        detail = get_json(srv, "/api/radiograph/gap")
    ids = [item["id"] for item in queue["items"]]
    assert ids[:2] == ["swapped", "gap"] and set(ids) == {"swapped", "gap", "clean", "gone"}
    swapped = queue["items"][0]
    assert swapped["image"] == "sub/swapped.png" and not swapped["reviewed"]
    assert swapped["reasons"][0] == {"kind": "order", "text": "T9 lies above T8", "points": 3.0}
    assert swapped["score"] == 6.0
    assert queue["annotations"] == str(images / "annotations.csv")
    # Bad input is reported, and the rest still works.
    assert any("broken.json: not valid JSON" in p for p in queue["problems"])
    gone = next(item for item in queue["items"] if item["id"] == "gone")
    assert "image gone.png not found" in gone["problem"]
    # The page, its script and the film.
    assert status == 200 and b'src="/static/review.js"' in page
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert js_headers["Content-Type"].startswith("text/javascript") and b"NAMES" in script
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), _film(1))
    assert detail["width"] == WIDTH and detail["saved"] is None
    assert detail["prediction"][3] == {
        "name": "T7",
        "x": 32.0,
        "y": 65.0,
        "confidence": 0.2,
        "present": False,
    }


def test_missing_image_and_unknown_names_in_annotations_are_reported(folders):
    pred, images = folders
    with open(images / "annotations.csv", "w") as f:
        f.write("image,participant,vertebra,x,y\nclean.png,p,T13,10,10\nclean.png,p,T5,12,30\n")
    with serving(pred, images) as srv:
        (images / "gap.png").unlink()  # gone after start-up
        queue = get_json(srv, "/api/queue")
        status, _, body = request(srv, "GET", "/api/image/gap")
        clean = get_json(srv, "/api/radiograph/clean")
        version = get_json(srv, "/api/radiograph/swapped")["version"]
        saved, _ = put(srv, "swapped", version, {"T4": (30, 20)})
    assert any("row 2: unknown vertebra 'T13'" in p for p in queue["problems"])
    assert any("has no 'negative' column: the first save adds it" in p for p in queue["problems"])
    assert status == 404 and "gap.png has gone missing" in json.loads(body)["error"]
    assert clean["saved"]["points"] == [{"name": "T5", "x": 12.0, "y": 30.0}]
    assert any("unknown vertebra 'T13'" in p for p in clean["row_problems"])
    # Saving another image keeps the unreadable row as it was.
    assert saved == 200
    rows = list(csv.DictReader(open(images / "annotations.csv")))
    assert {"image": "clean.png", "vertebra": "T13"}.items() <= rows[0].items()


# --- saving -------------------------------------------------------------------------------------


def test_save_round_trip_builds_the_folder_dataset(folders, tmp_path):
    pred, images = folders
    predictions_before = _contents(pred)
    with serving(pred, images) as srv:
        before = get_json(srv, "/api/radiograph/swapped")
        # Fix the order (T8 and T9 swap back), move T4, drop L4; then a negative.
        points = {p["name"]: (p["x"], p["y"]) for p in before["prediction"] if p["present"]}
        points["T8"], points["T9"] = points["T9"], points["T8"]
        points["T4"] = (40.25, 22.5)
        del points["L4"]
        status, reply = put(
            srv, "swapped", before["version"], points, participant="p1", split="train"
        )
        assert status == 200, reply
        after = get_json(srv, "/api/radiograph/swapped")
        gap = get_json(srv, "/api/radiograph/gap")
        assert put(srv, "gap", gap["version"], {}, participant="p2", split="train")[0] == 200
        queue = get_json(srv, "/api/queue")
    assert after["version"] == reply["version"] != before["version"]
    assert after["participant"] == "p1" and after["split"] == "train"
    assert {i["id"] for i in queue["items"] if i["reviewed"]} == {"swapped", "gap"}

    # The folder reader takes exactly the reviewed films: clean.png, never
    # reviewed, is not a negative.
    found = {i.image_id: i for i in folder.read_folder(str(images))}
    assert sorted(found) == ["gap.png", "sub/swapped.png"]
    swapped = found["sub/swapped.png"]
    expected = STRAIGHT.copy()
    expected[0] = [40.25, 22.5]
    np.testing.assert_allclose(swapped.centroids[:12], expected[:12])
    assert swapped.labeled.tolist() == [True] * 12 + [False]
    assert found["gap.png"].labeled.sum() == 0 and found["gap.png"].participant_id == "p2"

    builder = datasets.get_builder(
        "folder", data_dir=str(tmp_path / "tfds"), manual_dir=str(images)
    )
    records = {_text(r["image_id"]): r for r in builder.as_data_source("train")}
    assert sorted(records) == ["gap.png", "sub/swapped.png"]
    np.testing.assert_allclose(
        records["sub/swapped.png"]["centroids"][0], [40.25 / WIDTH, 22.5 / HEIGHT], rtol=1e-6
    )

    log = json.loads((images / "review.json").read_text())
    first = log["saves"][0]
    assert first["image"] == "sub/swapped.png" and first["prediction"] == "swapped.json"
    assert first["version_before"] == before["version"]
    assert first["edits"][0]["time"] == "2026-01-01T00:00:00Z" and first["time"].endswith("+00:00")
    changes = {c["vertebra"]: c for c in first["changes"]}
    assert changes["T4"]["change"] == "moved" and changes["T4"]["to"] == [40.25, 22.5]
    assert changes["T8"]["distance_px"] == 15.0 and changes["L4"]["change"] == "removed"
    assert changes["T5"]["change"] == "kept"
    assert log["saves"][1]["negative"] is True
    assert _contents(pred) == predictions_before  # never written to


def test_second_tab_gets_a_conflict_and_loses_nothing(folders):
    pred, images = folders
    with serving(pred, images) as srv:
        v0 = get_json(srv, "/api/radiograph/clean")["version"]
        status, first = put(srv, "clean", v0, {"T4": (10, 10)})
        assert status == 200
        status, second = put(srv, "clean", v0, {"T4": (50, 50)})  # the other tab
        assert status == 409
        assert second["current"]["version"] == first["version"]
        assert second["current"]["saved"]["points"] == [{"name": "T4", "x": 10.0, "y": 10.0}]
        # The second tab still has its edits and may save them over the first on purpose.
        status, third = put(srv, "clean", second["current"]["version"], {"T4": (50, 50)})
        assert status == 200
        status, _, body = request(srv, "PUT", "/api/radiograph/clean", {"points": []})
        assert status == 428, body  # no If-Match
    rows = list(csv.DictReader(open(images / "annotations.csv")))
    assert [(r["vertebra"], r["x"], r["y"]) for r in rows] == [("T4", "50", "50")]
    assert len(json.loads((images / "review.json").read_text())["saves"]) == 2


def test_a_crash_while_saving_leaves_the_previous_file(folders, monkeypatch):
    pred, images = folders
    with serving(pred, images) as srv:
        v0 = get_json(srv, "/api/radiograph/clean")["version"]
        assert put(srv, "clean", v0, {"T4": (10, 10)})[0] == 200
        before = (images / "annotations.csv").read_bytes()
        log_before = (images / "review.json").read_bytes()
        v1 = get_json(srv, "/api/radiograph/clean")["version"]

        def crash(*args):
            raise OSError(28, "No space left on device")

        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", crash)
            status, reply = put(srv, "clean", v1, {"T4": (20, 20)})
        assert status == 500 and "nothing was changed" in reply["error"]
        assert (images / "annotations.csv").read_bytes() == before
        assert (images / "review.json").read_bytes() == log_before
        assert not [p.name for p in images.iterdir() if p.name.endswith(".tmp")]
        assert put(srv, "clean", v1, {"T4": (20, 20)})[0] == 200  # nothing stuck


def test_bad_saves_are_refused(folders):
    pred, images = folders
    with serving(pred, images) as srv:
        v = get_json(srv, "/api/radiograph/clean")["version"]
        assert put(srv, "clean", v, {"T4": (WIDTH + 1, 10)})[1]["error"].startswith(
            "T4 at (65, 10)"
        )
        assert "participant" in put(srv, "clean", v, {"T4": (1, 1)}, participant=" ")[1]["error"]
        assert (
            put(srv, "gap", get_json(srv, "/api/radiograph/gap")["version"], {}, split="test")[0]
            == 200
        )
        # One participant, one split: the folder reader would refuse the csv otherwise.
        status, reply = put(srv, "clean", v, {"T4": (1, 1)}, participant="gap", split="train")
        assert status == 400 and "participant 'gap' has split 'test' on gap.png" in reply["error"]
        status, _ = put(srv, "gone", "x", {"T4": (1, 1)})
        assert status == 400
        for headers in ({"Origin": "http://evil.example"}, {"Content-Type": "text/plain"}):
            status, _, _ = request(
                srv, "PUT", "/api/radiograph/clean", {"points": []}, {"If-Match": v, **headers}
            )
            assert status in (403, 415)
    assert not (images / "annotations.csv").read_text().count("clean.png")


# --- security -------------------------------------------------------------------------------------


def test_path_traversal_is_refused(folders, tmp_path):
    pred, images = folders
    secret = tmp_path / "secret.png"
    Image.fromarray(np.full((HEIGHT, WIDTH), 7, np.uint8)).save(secret)
    (images / "link.png").symlink_to(secret)  # a link leading out of the images folder
    (pred / "link.json").write_text(json.dumps(_prediction("link.png")))
    attempts = [
        "/static/../../../etc/passwd",
        "/static/%2e%2e/%2e%2e/server.py",
        "/static/%252e%252e/%252e%252e/server.py",
        "/static/..%2f..%2fserver.py",
        "/static/..%5c..%5cserver.py",
        "/static/%2e%2e%252fserver.py",
        "//etc/passwd",
        "/api/image/%2Fetc%2Fpasswd",
        f"/api/image/{str(secret).replace('/', '%2F')}",
        "/api/image/..%2F..%2Fsecret",
        "/api/image/link",
        "/api/radiograph/..%2fclean",
    ]
    with serving(pred, images) as srv:
        answers = {path: request(srv, "GET", path) for path in attempts}
        queue = get_json(srv, "/api/queue")
        rebound = request(srv, "GET", "/api/queue", headers={"Host": "evil.example:80"})
    for path, (status, _, body) in answers.items():
        assert status in (400, 404), (path, status)
        assert b"root:" not in body and b"import" not in body and not body.startswith(b"\x89PNG")
    link = next(item for item in queue["items"] if item["id"] == "link")
    assert "lies outside" in link["problem"]
    assert rebound[0] == 403  # DNS rebinding: a foreign Host name


def test_token_required_off_loopback(folders):
    pred, images = folders
    with serving(pred, images, token="s3cret") as srv:
        assert srv.url.endswith("/?token=s3cret")
        assert request(srv, "GET", "/api/queue")[0] == 403
        assert request(srv, "GET", "/api/queue?token=wrong")[0] == 403
        status, headers, _ = request(srv, "GET", "/?token=s3cret")
        assert status == 200 and "HttpOnly" in headers["Set-Cookie"]
        cookie = headers["Set-Cookie"].split(";")[0]
        assert request(srv, "GET", "/api/queue", headers={"Cookie": cookie})[0] == 200
        assert request(srv, "GET", "/api/queue", headers={"X-Review-Token": "s3cret"})[0] == 200


def test_static_files_ship_with_the_package_and_reach_no_network():
    static = Path(server.__file__).parent / "static"
    names = sorted(p.name for p in static.iterdir())
    assert names == ["icon.svg", "index.html", "review.css", "review.js"]
    for path in static.iterdir():
        text = path.read_text()
        assert "http://" not in text.replace(
            "http://www.w3.org/2000/svg", ""
        )  # a name, not a fetch
        assert "https://" not in text and "//cdn" not in text
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"vertjax.review" = ["static/*"]' in pyproject


# --- the command line ------------------------------------------------------------------------------


def test_command_line_serves_until_stopped(folders):
    pred, images = folders
    process = subprocess.Popen(
        [sys.executable, "-m", "vertjax.review", str(pred), f"--images={images}", "--port=0"],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = []
        for line in process.stderr:
            lines.append(line)
            if "review at" in line:
                break
        url = line.split("review at ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and "token" not in url
        host, port = url[len("http://") :].rstrip("/").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", "/api/queue")
        assert len(json.loads(conn.getresponse().read())["items"]) == 4
        conn.close()
        assert "corrections go to " + str(images / "annotations.csv") in "".join(lines)
    finally:
        process.terminate()
        process.wait(timeout=30)
        process.stderr.close()


def test_a_missing_folder_is_one_line_of_the_command_line(tmp_path):
    from vertjax import cli

    assert catalog.CatalogError in cli.EXPECTED_ERRORS  # `vertjax: <message>`, exit status 1
    with pytest.raises(catalog.CatalogError, match="nope: prediction folder not found"):
        server.make_server(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(catalog.CatalogError, match="no prediction"):
        server.make_server(str(tmp_path / "empty"))


def test_store_version_ignores_row_order(tmp_path):
    sheet = store.read_sheet(tmp_path / "none.csv")
    assert sheet.rows == [] and sheet.labels("a.png") is None
    text = "image,participant,vertebra,x,y\na.png,p,T4,1,2\na.png,p,T5,3,4\n"
    (tmp_path / "a.csv").write_text(text)
    (tmp_path / "b.csv").write_text(
        "image,participant,vertebra,x,y\na.png,p,T5,3,4\na.png,p,T4,1,2\n"
    )
    a, b = store.read_sheet(tmp_path / "a.csv"), store.read_sheet(tmp_path / "b.csv")
    assert a.version("a.png") == b.version("a.png") != a.version("b.png")
