"""A small local server speaking the GitHub Releases REST API (the calls a release makes).

Two listeners on 127.0.0.1, like GitHub's api host and its separate uploads host:
the API answers release/asset calls and hands out an `upload_url` that points at the
upload listener. State is kept in memory. Behaviour follows the real API where our
client depends on it: Bearer/token auth (401 "Bad credentials"), 404 for an unknown
tag, 422 `already_exists` for a duplicate tag or asset name, assets < max_asset_bytes
(GitHub: < 2 GiB), Link-header pagination, `digest: sha256:...` on assets, asset
downloads (Accept: application/octet-stream) answered with a 302 to the uploads host.

Fault injection: `inject(method, path_regex, status, times, partial=...)` answers the
next matching requests with `status` and `message` (a partial upload leaves a 'starter'
asset, as a broken upload does on GitHub); `token` can be changed at any time.

Run by hand: python -m tests.servers.github_api [--token T]
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, urlsplit

GIB = 1024 ** 3


@dataclass
class Fault:
    method: str
    path: re.Pattern
    status: int
    times: int
    partial: bool = False
    retry_after: int | None = None
    message: str = "injected fault"


@dataclass
class Asset:
    id: int
    release_id: int
    name: str
    label: str
    data: bytes
    state: str = "uploaded"
    sha256: str = ""

    def __post_init__(self) -> None:
        self.sha256 = hashlib.sha256(self.data).hexdigest()  # once: listings repeat it often


@dataclass
class Release:
    id: int
    tag_name: str
    name: str
    body: str
    prerelease: bool
    target_commitish: str
    assets: dict[int, Asset] = field(default_factory=dict)


class GitHubAPIServer:
    """Start with .start(); .api_url for GITHUB_API_URL; .stop() when done."""

    def __init__(self, repository: str = "cos/cos-pipeline", token: str = "test-token",
                 max_asset_bytes: int = 2 * GIB, per_page_max: int = 100, report_digest: bool = True):
        self.repository = repository
        self.token = token
        self.max_asset_bytes = max_asset_bytes
        self.per_page_max = per_page_max
        self.report_digest = report_digest
        self.releases: dict[int, Release] = {}
        self.log: list[tuple[str, str, int]] = []   # (method, path, status) of every request
        self.faults: list[Fault] = []
        self._ids = iter(range(1000, 10 ** 9))
        self.lock = threading.RLock()
        self.api = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, "api"))
        self.uploads = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, "uploads"))
        self._threads: list[threading.Thread] = []

    # ---- control ----

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api.server_port}"

    @property
    def uploads_url(self) -> str:
        return f"http://127.0.0.1:{self.uploads.server_port}"

    def start(self) -> GitHubAPIServer:
        for srv in (self.api, self.uploads):
            t = threading.Thread(target=srv.serve_forever, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        for srv in (self.api, self.uploads):
            srv.shutdown()
            srv.server_close()

    def inject(self, method: str, path_regex: str, status: int = 502, times: int = 1,
               partial: bool = False, retry_after: int | None = None, message: str = "injected fault") -> None:
        with self.lock:
            self.faults.append(Fault(method, re.compile(path_regex), status, times, partial, retry_after,
                                     message))

    def release(self, tag: str) -> Release | None:
        return next((r for r in self.releases.values() if r.tag_name == tag), None)

    def uploads_done(self) -> list[str]:
        """Names of assets uploaded successfully, in order (to count uploads)."""
        return [parse_qs(urlsplit(p).query)["name"][0] for m, p, s in self.log
                if m == "POST" and s == 201 and "/assets" in p]

    # ---- JSON views ----

    def asset_json(self, a: Asset) -> dict:
        owner_repo = self.repository
        out = {"id": a.id, "name": a.name, "label": a.label, "state": a.state, "size": len(a.data),
               "content_type": "application/octet-stream",
               "url": f"{self.api_url}/repos/{owner_repo}/releases/assets/{a.id}",
               "browser_download_url": f"{self.uploads_url}/download/{a.id}/{quote(a.name)}"}
        if self.report_digest:
            out["digest"] = "sha256:" + a.sha256
        return out

    def release_json(self, r: Release) -> dict:
        base = f"{self.api_url}/repos/{self.repository}/releases/{r.id}"
        return {"id": r.id, "tag_name": r.tag_name, "name": r.name, "body": r.body, "draft": False,
                "prerelease": r.prerelease, "target_commitish": r.target_commitish, "url": base,
                "assets_url": f"{base}/assets",
                "upload_url": f"{self.uploads_url}/repos/{self.repository}/releases/{r.id}/assets{{?name,label}}",
                "assets": [self.asset_json(a) for a in r.assets.values()]}


def _handler(server: GitHubAPIServer, role: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # one write per response: headers and body in separate small writes meet the
        # client's delayed ACK (Nagle) and cost ~40 ms per request on loopback
        wbufsize = 1 << 16
        disable_nagle_algorithm = True

        def log_message(self, *args) -> None:  # quiet: pytest shows failures, not traffic
            pass

        # -- plumbing --

        def _send(self, status: int, body: object = None, headers: dict | None = None) -> None:
            raw = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
            self.send_response(status)
            ctype = "application/octet-stream" if isinstance(body, bytes) else "application/json"
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(raw)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(raw)
            with server.lock:
                server.log.append((self.command, self.path, status))

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _fault(self) -> Fault | None:
            with server.lock:
                for f in server.faults:
                    if f.times > 0 and f.method == self.command and f.path.search(self.path):
                        f.times -= 1
                        return f
            return None

        def _authorized(self) -> bool:
            auth = self.headers.get("Authorization", "")
            scheme, _, token = auth.partition(" ")
            return scheme.lower() in ("bearer", "token") and token == server.token

        def _dispatch(self) -> None:
            url = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            if role == "uploads" and self.command == "GET" and url.path.startswith("/download/"):
                return self._download(url.path)  # browser_download_url: no token (public release)
            if fault := self._fault():
                if fault.partial:
                    self._upload(url.path, query, partial=True)
                else:
                    self._body()
                headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
                return self._send(fault.status, {"message": fault.message}, headers)
            if not self._authorized():
                self._body()
                return self._send(401, {"message": "Bad credentials"})
            prefix = f"/repos/{server.repository}"
            if role == "api" and self.command == "GET" and url.path == prefix:
                return self._send(200, {"full_name": server.repository, "name": server.repository.split("/")[1]})
            if not url.path.startswith(prefix + "/"):
                self._body()
                return self._send(404, {"message": "Not Found"})
            path = url.path[len(prefix):]
            if role == "uploads":
                if self.command == "POST" and re.fullmatch(r"/releases/\d+/assets", path):
                    return self._upload(path, query)
                return self._send(404, {"message": "Not Found"})
            routes = [
                ("GET", r"/releases/tags/(?P<tag>[^/]+)", self._get_by_tag),
                ("POST", r"/releases", self._create),
                ("GET", r"/releases/(?P<rid>\d+)", self._get),
                ("PATCH", r"/releases/(?P<rid>\d+)", self._patch),
                ("GET", r"/releases/(?P<rid>\d+)/assets", self._list_assets),
                ("GET", r"/releases/assets/(?P<aid>\d+)", self._get_asset),
                ("PATCH", r"/releases/assets/(?P<aid>\d+)", self._patch_asset),
                ("DELETE", r"/releases/assets/(?P<aid>\d+)", self._delete_asset),
            ]
            for method, pattern, fn in routes:
                if method == self.command and (m := re.fullmatch(pattern, path)):
                    return fn(query=query, **m.groupdict())
            self._body()
            self._send(404, {"message": "Not Found"})

        do_GET = do_POST = do_PATCH = do_DELETE = _dispatch

        # -- releases --

        def _find(self, rid: str) -> Release | None:
            return server.releases.get(int(rid))

        def _get_by_tag(self, tag: str, query: dict) -> None:
            rel = server.release(tag)
            self._send(200, server.release_json(rel)) if rel else self._send(404, {"message": "Not Found"})

        def _create(self, query: dict) -> None:
            data = json.loads(self._body() or b"{}")
            with server.lock:
                if not data.get("tag_name"):
                    return self._send(422, {"message": "Validation Failed",
                                            "errors": [{"resource": "Release", "code": "missing_field",
                                                        "field": "tag_name"}]})
                if server.release(data["tag_name"]):
                    return self._send(422, {"message": "Validation Failed",
                                            "errors": [{"resource": "Release", "code": "already_exists",
                                                        "field": "tag_name"}]})
                rel = Release(next(server._ids), data["tag_name"], data.get("name") or data["tag_name"],
                              data.get("body") or "", bool(data.get("prerelease")),
                              data.get("target_commitish") or "main")
                server.releases[rel.id] = rel
            self._send(201, server.release_json(rel))

        def _get(self, rid: str, query: dict) -> None:
            rel = self._find(rid)
            self._send(200, server.release_json(rel)) if rel else self._send(404, {"message": "Not Found"})

        def _patch(self, rid: str, query: dict) -> None:
            data = json.loads(self._body() or b"{}")
            rel = self._find(rid)
            if not rel:
                return self._send(404, {"message": "Not Found"})
            with server.lock:
                for key in ("name", "body", "prerelease"):
                    if key in data:
                        setattr(rel, key, data[key])
            self._send(200, server.release_json(rel))

        # -- assets --

        def _asset(self, aid: str) -> Asset | None:
            for rel in server.releases.values():
                if int(aid) in rel.assets:
                    return rel.assets[int(aid)]
            return None

        def _list_assets(self, rid: str, query: dict) -> None:
            rel = self._find(rid)
            if not rel:
                return self._send(404, {"message": "Not Found"})
            per_page = min(int(query.get("per_page", 30)), server.per_page_max)
            page = int(query.get("page", 1))
            items = sorted(rel.assets.values(), key=lambda a: a.id)
            chunk = items[(page - 1) * per_page: page * per_page]
            headers = {}
            if page * per_page < len(items):
                nxt = f"{server.api_url}/repos/{server.repository}/releases/{rid}/assets?per_page={per_page}&page={page + 1}"
                headers["Link"] = f'<{nxt}>; rel="next"'
            self._send(200, [server.asset_json(a) for a in chunk], headers)

        def _get_asset(self, aid: str, query: dict) -> None:
            asset = self._asset(aid)
            if not asset:
                return self._send(404, {"message": "Not Found"})
            if self.headers.get("Accept") == "application/octet-stream":
                return self._send(302, None, {"Location": server.asset_json(asset)["browser_download_url"]})
            self._send(200, server.asset_json(asset))

        def _patch_asset(self, aid: str, query: dict) -> None:
            data = json.loads(self._body() or b"{}")
            asset = self._asset(aid)
            if not asset:
                return self._send(404, {"message": "Not Found"})
            with server.lock:
                rel = server.releases[asset.release_id]
                if "name" in data and any(a.name == data["name"] and a.id != asset.id for a in rel.assets.values()):
                    return self._send(422, {"message": "Validation Failed",
                                            "errors": [{"resource": "ReleaseAsset", "code": "already_exists",
                                                        "field": "name"}]})
                asset.name = data.get("name", asset.name)
                asset.label = data.get("label", asset.label)
            self._send(200, server.asset_json(asset))

        def _delete_asset(self, aid: str, query: dict) -> None:
            asset = self._asset(aid)
            if not asset:
                return self._send(404, {"message": "Not Found"})
            with server.lock:
                del server.releases[asset.release_id].assets[asset.id]
            self._send(204)

        def _upload(self, path: str, query: dict, partial: bool = False) -> None:
            rid = int(re.search(r"/releases/(\d+)/assets", path).group(1))
            length = self.headers.get("Content-Length")
            if length is None:
                return self._send(411, {"message": "Content-Length required"})
            data = self._body()
            rel = server.releases.get(rid)
            if partial:  # what a broken upload leaves behind on GitHub: an asset in state 'starter'
                if rel and (name := query.get("name")):
                    with server.lock:
                        a = Asset(next(server._ids), rid, name, "", data[: len(data) // 2], "starter")
                        rel.assets[a.id] = a
                return
            if not rel:
                return self._send(404, {"message": "Not Found"})
            name = query.get("name")
            if not name:
                return self._send(422, {"message": "name is required"})
            if len(data) >= server.max_asset_bytes:
                return self._send(422, {"message": f"asset {name} is {len(data)} bytes; "
                                                   f"assets must be smaller than {server.max_asset_bytes}"})
            with server.lock:
                if any(a.name == name for a in rel.assets.values()):
                    return self._send(422, {"message": "Validation Failed",
                                            "errors": [{"resource": "ReleaseAsset", "code": "already_exists",
                                                        "field": "name"}]})
                a = Asset(next(server._ids), rid, name, query.get("label", ""), data)
                rel.assets[a.id] = a
            self._send(201, server.asset_json(a))

        def _download(self, path: str) -> None:
            aid = path.split("/")[2]
            asset = self._asset(aid) if aid.isdigit() else None
            self._send(200, asset.data) if asset else self._send(404, {"message": "Not Found"})

    return Handler


if __name__ == "__main__":
    import argparse
    import time

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--token", default="test-token")
    args = ap.parse_args()
    srv = GitHubAPIServer(token=args.token).start()
    print(f"GITHUB_API_URL={srv.api_url} GITHUB_REPOSITORY={srv.repository} GITHUB_TOKEN={args.token}")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.stop()
