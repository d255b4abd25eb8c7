"""The review's HTTP server: the page, the queue, radiographs as PNG, saving.

Standard library only (`http.server.ThreadingHTTPServer`), one thread per
connection. Routes:

  GET /                      the page (static/index.html)
  GET /static/<file>         its script and style, read from the package
  GET /api/queue             radiographs worst first with their reasons and
                             whether they are reviewed; problems found
  GET /api/radiograph/<id>   the prediction, the saved labels, the version
  GET /api/image/<id>        the radiograph as an 8-bit PNG, full resolution
  PUT /api/radiograph/<id>   save (`store.Store.save`); If-Match carries the
                             version: 412/409 when it is missing/stale

Security: nothing is served from a path built out of the URL. Ids are looked
up among the catalog's predictions and static names among the package's
files, after refusing any path that holds `..`, `.`, `//`, a backslash or a
NUL in any decoding (`%2e%2e`, `%252e%252e`). Images must lie inside the
images folder after following links (`catalog`). The server binds
127.0.0.1 by default and then answers only requests whose Host is a
loopback name (no DNS rebinding). Bound to any other address it requires a
random token, printed at start-up, on every request (query, header or the
cookie set by the page). Saves must be JSON from the page's own origin, so
another site cannot post into the folder. Every response forbids scripts,
styles and images from anywhere but the server (Content-Security-Policy).
"""

from __future__ import annotations

import collections
import hmac
import http.cookies
import http.server
import io
import ipaddress
import json
import secrets
import socket
import threading
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from tfds_builder.spine_radiographs import folder
from vertjax import imaging, vertebrae
from vertjax.review import catalog, store, suspicion

STATIC_DIR = Path(__file__).resolve().parent / "static"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
# Cookies ignore the port: one name per port keeps two servers' tokens apart.
TOKEN_COOKIE = "vertjax_review_{port}"
MAX_BODY = 1 << 20  # a save is a few kB; refuse anything near this
IMAGE_CACHE = 4  # decoded radiographs kept as PNG (the current one and its neighbours)
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the token may be in the address
    "X-Frame-Options": "DENY",
}


class Refused(Exception):
    """A request answered with an error status and message."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def path_segments(raw: str) -> list[str]:
    """The URL path's segments, each decoded once; Refused(400) for traversal in any form."""
    decoded = raw
    for _ in range(4):  # %25-encodings nest; four layers is beyond any real link
        if any(bad in decoded for bad in ("\\", "\x00", "//")):
            raise Refused(400, "refused path")
        if any(part in (".", "..") for part in decoded.split("/")):
            raise Refused(400, "refused path")
        decoded, previous = urllib.parse.unquote(decoded), decoded
        if decoded == previous:
            break
    if not raw.startswith("/"):
        raise Refused(400, "refused path")
    return [urllib.parse.unquote(part) for part in raw[1:].split("/")]


class App:
    """What the request handlers share: catalog, store, static files, token, image cache."""

    def __init__(self, found: catalog.Catalog, *, token: str | None, loopback: bool):
        self.catalog = found
        self.store = store.Store(found.images_root)
        self.token = token
        self.loopback = loopback
        self.static = {
            path.name: (path.read_bytes(), CONTENT_TYPES[path.suffix])
            for path in sorted(STATIC_DIR.iterdir())
            if path.suffix in CONTENT_TYPES
        }
        self._pngs: collections.OrderedDict[tuple, bytes] = collections.OrderedDict()
        self._pngs_lock = threading.Lock()

    def prediction(self, pid: str) -> catalog.Prediction:
        found = self.catalog.predictions.get(pid)
        if found is None:
            raise Refused(404, f"no radiograph {pid!r}")
        return found

    def queue(self) -> dict[str, Any]:
        sheet = self.store.sheet()
        reviewed = sheet.reviewed()
        problems = [*self.catalog.problems, *sheet.problems]
        if sheet.error:
            problems.append(f"{sheet.error}; saving is off until it is fixed")
        elif sheet.header and folder.NEGATIVE not in sheet.header:
            problems.append(
                f"{self.store.csv_path} has no '{folder.NEGATIVE}' column: the first save adds it, "
                "and from then on training takes only the images it names (an image without "
                "rows is left out instead of being a negative)"
            )
        items = [
            {
                "id": p.id,
                "image": p.image_id or p.image_name,
                "score": p.assessment.score,
                "reasons": [_reason(r) for r in p.assessment.reasons],
                "reviewed": p.image_id in reviewed,
                "problem": p.problem,
            }
            for p in self.catalog.predictions.values()
        ]
        return {
            "items": items,
            "problems": problems,
            "annotations": str(self.store.csv_path),
            "predictions": str(self.catalog.pred_dir),
        }

    def radiograph(self, p: catalog.Prediction) -> dict[str, Any]:
        sheet = self.store.sheet()
        labels = sheet.labels(p.image_id) if p.image_id else None
        return {
            "id": p.id,
            "file": p.file,
            "image": p.image_id,
            "image_name": p.image_name,
            "width": p.width,
            "height": p.height,
            "model": p.model,
            "score": p.assessment.score,
            "reasons": [_reason(r) for r in p.assessment.reasons],
            "prediction": [
                {
                    "name": name,
                    "x": float(p.xy[k, 0]),
                    "y": float(p.xy[k, 1]),
                    "confidence": float(p.confidence[k]),
                    "present": bool(p.present[k]),
                }
                for k, name in enumerate(vertebrae.NAMES)
            ],
            "saved": None
            if labels is None
            else {
                "points": [{"name": n, "x": x, "y": y} for n, (x, y) in labels.points.items()],
                "negative": labels.negative,
            },
            "participant": labels.participant if labels else (p.image_id or p.id),
            "split": labels.split if labels else "",
            "version": sheet.version(p.image_id) if p.image_id else "",
            "problem": p.problem,
            "save_problem": sheet.error,
            "row_problems": sheet.problems_of(p.image_id) if p.image_id else [],
        }

    def png(self, p: catalog.Prediction) -> bytes:
        """The radiograph as an 8-bit grey PNG (as the model sees it, before resizing)."""
        if p.image_path is None:
            raise Refused(404, p.problem or "no image")
        try:
            stat = p.image_path.stat()
        except OSError:
            raise Refused(404, f"image {p.image_path} has gone missing") from None
        key = (p.id, stat.st_mtime_ns, stat.st_size)
        with self._pngs_lock:
            if key in self._pngs:
                self._pngs.move_to_end(key)
                return self._pngs[key]
        try:
            pixels = imaging.read_radiograph(p.image_path).pixels
        except imaging.ImageError as e:
            raise Refused(404, str(e)) from None
        buffer = io.BytesIO()
        # Level 1: a few times faster than the default, the size hardly differs for films.
        Image.fromarray(np.rint(pixels * 255).astype(np.uint8)).save(
            buffer, format="PNG", compress_level=1
        )
        data = buffer.getvalue()
        with self._pngs_lock:
            self._pngs[key] = data
            while len(self._pngs) > IMAGE_CACHE:
                self._pngs.popitem(last=False)
        return data


def _reason(reason: suspicion.Reason) -> dict[str, Any]:
    return {"kind": reason.kind, "text": reason.text, "points": round(reason.points, 2)}


class Handler(http.server.BaseHTTPRequestHandler):
    """One request: checks (path, host, token, origin), then the route."""

    server: ReviewServer
    protocol_version = "HTTP/1.1"

    def version_string(self) -> str:
        return "vertjax-review"

    def log_message(self, format: str, *args: Any) -> None:
        logging.debug("review: %s - %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def _handle(self, method: str) -> None:
        app = self.server.app
        try:
            url = urllib.parse.urlsplit(self.path)
            segments = path_segments(url.path)
            self._check_host(app)
            from_query = self._check_token(app, urllib.parse.parse_qs(url.query))
            self._route(app, method, segments, set_cookie=from_query)
        except Refused as e:
            if method == "PUT":
                self.close_connection = True  # its body may be unread: no keep-alive after it
            if e.status >= 500 or e.status == 404:
                logging.warning("review: %s %s: %s", method, self.path.split("?")[0], e)
            self._json(e.status, {"error": str(e)})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser went away (a cancelled image load)
        except Exception as e:
            logging.exception("review: %s %s failed", method, self.path.split("?")[0])
            self._json(500, {"error": f"internal error: {type(e).__name__}: {e}"})

    def _check_host(self, app: App) -> None:
        if not app.loopback:
            return
        host = self.headers.get("Host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name.strip("[]") not in LOOPBACK_NAMES and not is_loopback(name.strip("[]")):
            raise Refused(403, f"unexpected Host {host!r}: open the address printed at start-up")

    def _check_token(self, app: App, query: dict[str, list[str]]) -> bool:
        """Refused(403) without the token; True when it came in the query (set the cookie)."""
        if app.token is None:
            return False
        cookies = http.cookies.SimpleCookie(self.headers.get("Cookie", ""))
        name = TOKEN_COOKIE.format(port=self.server.server_address[1])
        offered = [
            *query.get("token", [])[:1],
            self.headers.get("X-Review-Token", ""),
            cookies[name].value if name in cookies else "",
        ]
        for k, value in enumerate(offered):
            if value and hmac.compare_digest(value.encode(), app.token.encode()):
                return k == 0
        raise Refused(403, "token required: open the address printed at start-up")

    def _route(self, app: App, method: str, segments: list[str], *, set_cookie: bool) -> None:
        if method == "GET" and segments in ([""], ["index.html"]):
            self._static(app, "index.html", set_cookie=set_cookie)
        elif method == "GET" and len(segments) == 2 and segments[0] == "static":
            self._static(app, segments[1], set_cookie=False)
        elif method == "GET" and segments == ["api", "queue"]:
            self._json(200, app.queue())
        elif len(segments) == 3 and segments[:2] == ["api", "radiograph"]:
            prediction = app.prediction(segments[2])
            if method == "PUT":
                self._save(app, prediction)
            else:
                body = app.radiograph(prediction)
                self._json(200, body, etag=body["version"])
        elif method == "GET" and len(segments) == 3 and segments[:2] == ["api", "image"]:
            data = app.png(app.prediction(segments[2]))
            self._send(200, data, "image/png", cache="private, max-age=600")
        else:
            where = "/".join(segments)
            raise Refused(404 if method == "GET" else 405, f"no such page: {method} /{where}")

    def _static(self, app: App, name: str, *, set_cookie: bool) -> None:
        if name not in app.static:
            raise Refused(404, f"no such file: {name}")
        data, content_type = app.static[name]
        extra = {}
        if set_cookie:
            cookie = TOKEN_COOKIE.format(port=self.server.server_address[1])
            extra["Set-Cookie"] = f"{cookie}={app.token}; Path=/; HttpOnly; SameSite=Strict"
        self._send(200, data, content_type, extra=extra)

    def _save(self, app: App, prediction: catalog.Prediction) -> None:
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip()
        if content_type != "application/json":
            raise Refused(415, "a save must be JSON")
        origin = self.headers.get("Origin")
        if origin is not None and origin != f"http://{self.headers.get('Host', '')}":
            raise Refused(403, f"refused a save from another origin ({origin})")
        version = self.headers.get("If-Match", "").strip().strip('"')
        if not version:
            raise Refused(428, "a save needs If-Match: the version it started from")
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise Refused(413, "request too large")
        try:
            body = json.loads(self.rfile.read(length))
            points, participant = body["points"], body["participant"]
            split, edits = body.get("split", ""), body.get("edits", [])
            if not isinstance(points, list) or not isinstance(edits, list):
                raise TypeError("points and edits must be lists")
        except (ValueError, KeyError, TypeError) as e:
            raise Refused(400, f"bad save request: {e}") from None
        try:
            new = app.store.save(
                prediction,
                version=version,
                points=points,
                participant=participant,
                split=split,
                edits=edits,
            )
        except store.Conflict as e:
            logging.warning("review: %s: conflict, %s", prediction.id, e)
            current = app.radiograph(prediction)
            self._json(409, {"error": str(e), "current": current}, etag=e.current)
            return
        except store.Invalid as e:
            raise Refused(400, str(e)) from None
        except store.StoreError as e:
            raise Refused(500, str(e)) from None
        except OSError as e:
            raise Refused(500, f"saving failed, nothing was changed: {e}") from None
        logging.info("review: saved %s (%d points)", prediction.image_id, len(points))
        self._json(200, {"version": new, "reviewed": True}, etag=new)

    def _json(self, status: int, body: Any, *, etag: str | None = None) -> None:
        extra = {"ETag": f'"{etag}"'} if etag else {}
        data = json.dumps(body).encode()
        self._send(status, data, "application/json", extra=extra)

    def _send(
        self,
        status: int,
        data: bytes,
        content_type: str,
        *,
        cache: str = "no-store",
        extra: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        for name, value in {**HEADERS, **(extra or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", cache)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


class ReviewServer(http.server.ThreadingHTTPServer):
    """The HTTP server with its App; `url` is the address to open."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: App):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.app = app
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if host in ("0.0.0.0", "::"):
            host = socket.getfqdn()
        host = f"[{host}]" if ":" in host else host
        query = f"?token={self.app.token}" if self.app.token else ""
        return f"http://{host}:{port}/{query}"


def make_server(
    pred_dir: str,
    *,
    images: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
) -> ReviewServer:
    """A review server over a prediction folder, bound but not yet serving.

    Args:
      pred_dir: a folder written by `vertjax predict`.
      images: the folder holding the radiographs (`catalog.load`); corrections
        go to its annotations.csv.
      host: the address to bind; any but a loopback one requires the token.
      port: the port; 0 picks a free one.

    Returns:
      The ReviewServer; call `serve_forever()`.

    Raises:
      catalog.CatalogError: the prediction or images folder cannot be used.
      OSError: the address cannot be bound.
    """
    found = catalog.load(pred_dir, images)
    loopback = is_loopback(host)
    token = None if loopback else secrets.token_urlsafe(24)
    return ReviewServer((host, port), App(found, token=token, loopback=loopback))
