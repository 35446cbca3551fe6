"""The GitHub Releases calls the release needs, over githubkit (typed REST endpoints,
auth, one httpx client).

Settings come from the GitHub Actions conventions: GITHUB_API_URL, GITHUB_REPOSITORY,
GITHUB_TOKEN (read and checked by core.env). What stays ours, and why:
- retries: 5xx, 429 and connection errors are retried with exponential back-off
  (Retry-After honoured), and a failed upload's half-made asset is deleted before the
  next attempt. githubkit's auto_retry cannot run a step between attempts and would
  re-send an already consumed upload body, so it is off.
- uploads go to the host in the release's `upload_url` through `GitHub.request`,
  streamed from a byte range of a file (a part of a split asset needs no copy on disk):
  githubkit's typed `upload_release_asset` posts to the API host, which github.com
  does not accept for uploads. (PyGithub was measured too: it refuses an upload URL
  on the API's host with another port, as the local test server and a GHES behind
  a port mapping have it: an AssertionError in Requester.__assertUrlAllowed.)
- the HTTP cache is off: the notes are re-read to catch another job's edit.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from githubkit import GitHub, Response
from githubkit.exception import RequestError, RequestFailed

from core import env

from ..errors import PipelineError

log = logging.getLogger("cos.github")

CHUNK = 1024 * 1024
TOKEN_HINT = ("set GITHUB_TOKEN to a token with contents: write on the repository "
              "(in Actions: `permissions: contents: write` and env GITHUB_TOKEN: ${{ secrets.GITHUB_TOKEN }})")


Json = dict[str, Any]  # a decoded JSON object of the API


class GitHubError(PipelineError):
    """A Releases API call failed (after retries, when retrying made sense)."""


@dataclass(frozen=True)
class Settings:
    api_url: str
    repository: str
    token: str

    @property
    def owner(self) -> str:
        return self.repository.split("/")[0]

    @property
    def repo(self) -> str:
        return self.repository.split("/")[1]

    @classmethod
    def from_env(cls) -> Settings:
        token, api_url, repository = env.get("GITHUB_TOKEN"), env.get("GITHUB_API_URL"), env.get("GITHUB_REPOSITORY")
        if not token:
            raise GitHubError("GITHUB_TOKEN is missing: cannot publish a GitHub Release", TOKEN_HINT)
        if not api_url:
            raise GitHubError("GITHUB_API_URL is not set",
                              "GitHub Actions sets it; elsewhere export the REST API root of your GitHub "
                              "(for github.com: https://api. followed by the host)")
        if not repository:
            raise GitHubError("GITHUB_REPOSITORY is not set",
                              "GitHub Actions sets it; elsewhere export GITHUB_REPOSITORY=owner/name")
        return cls(api_url, repository, token)


def file_range(path: Path, offset: int, length: int) -> Iterator[bytes]:
    """Stream `length` bytes of `path` from `offset` (one part of a split asset)."""
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                raise GitHubError(f"{path} shrank while being uploaded", "do not modify artifacts during a release")
            left -= len(chunk)
            yield chunk


class ReleasesClient:
    def __init__(self, settings: Settings, *, attempts: int = 5, backoff: float = 1.0,
                 timeout: float = 60.0) -> None:
        self.settings = settings
        self.attempts = attempts
        self.backoff = backoff
        self._gh = GitHub(settings.token, base_url=settings.api_url, user_agent="cos-pipeline-release",
                          # uploads of ~2 GiB parts: long write, but a stalled connection must not hang CI
                          timeout=httpx.Timeout(timeout, write=600.0, read=600.0),
                          auto_retry=False, http_cache=False)
        self._repos = self._gh.rest.repos
        self._owner_repo = (settings.owner, settings.repo)

    def __enter__(self) -> ReleasesClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass  # githubkit opens one httpx client per request

    # ---- transport: retries and clear errors ----

    def _send(self, what: str, call: Callable[[], Response[Any, Any]], *, ok: tuple[int, ...] = (200, 201, 204),
              before_retry: Callable[[], None] | None = None) -> httpx.Response:
        """One API call: retry 5xx / 429 / network errors; map 401/403/404 to clear errors.
        Status codes in `ok` (and 404 / 422, which callers interpret) are returned."""
        for attempt in range(1, self.attempts + 1):
            resp: httpx.Response | None = None
            try:
                answer = call().raw_response
            except RequestFailed as exc:
                answer = exc.response.raw_response
            except RequestError as exc:
                answer, problem = None, f"{type(exc.exc).__name__}: {exc.exc}"
            if answer is not None:
                if not (answer.status_code >= 500 or answer.status_code == 429 or _rate_limited(answer)):
                    return self._check(answer, what, ok)
                problem, resp = f"HTTP {answer.status_code} {_message(answer)}", answer
            if attempt == self.attempts:
                raise GitHubError(f"GitHub API {what} failed after {attempt} attempts: {problem}",
                                  "GitHub may be degraded; re-run the release later (it resumes where it stopped)")
            delay = _retry_after(resp) if resp is not None else None
            delay = delay if delay is not None else self.backoff * 2 ** (attempt - 1)
            log.warning("%s: %s; retry %d/%d in %.1fs", what, problem, attempt, self.attempts - 1, delay)
            time.sleep(delay)
            if before_retry:
                before_retry()
        raise AssertionError("unreachable")

    def _url(self, method: str, url: str, **kw: Any) -> Callable[[], Response[Any, Any]]:
        """A call of a URL the API handed out (upload_url, an asset's url, a next page)."""
        return lambda: self._gh.request(method, url, **kw)

    def _check(self, resp: httpx.Response, what: str, ok: tuple[int, ...]) -> httpx.Response:
        code = resp.status_code
        if code in ok or code in (404, 422):
            return resp
        if code == 401:
            raise GitHubError(f"GitHub API {what}: 401 {_message(resp)}: GITHUB_TOKEN is missing or lacks "
                              f"contents:write on {self.settings.repository}", TOKEN_HINT)
        if code == 403:
            raise GitHubError(f"GitHub API {what}: 403 {_message(resp)}: the token may not write releases "
                              f"of {self.settings.repository}", TOKEN_HINT)
        raise GitHubError(f"GitHub API {what}: HTTP {code} {_message(resp)}")

    def _object(self, resp: httpx.Response, what: str) -> Json:
        data = self._json(resp, what)
        if not isinstance(data, dict):
            raise GitHubError(f"GitHub API {what}: expected a JSON object, got {type(data).__name__}")
        return data

    def _json(self, resp: httpx.Response, what: str) -> Any:
        if resp.status_code == 404:
            raise GitHubError(f"GitHub API {what}: 404 not found",
                              f"check GITHUB_REPOSITORY={self.settings.repository} and that the token can see it")
        if resp.status_code == 422:
            raise GitHubError(f"GitHub API {what}: 422 {_message(resp)}")
        try:
            return resp.json()
        except ValueError:
            raise GitHubError(f"GitHub API {what}: the answer is not JSON ({resp.text[:100]!r})",
                              "check that GITHUB_API_URL is the REST API root") from None

    # ---- the repository ----

    def check_repository(self) -> Json:
        """The repository, before any work: the URL answers, the token is good, the repository exists."""
        return self._object(self._send("get repository", lambda: self._repos.get(*self._owner_repo)),
                            f"get repository {self.settings.repository}")

    # ---- releases ----

    def release_by_tag(self, tag: str) -> Json | None:
        resp = self._send(f"get release {tag}", lambda: self._repos.get_release_by_tag(*self._owner_repo, tag))
        return None if resp.status_code == 404 else self._json(resp, f"get release {tag}")

    def get_release(self, release_id: int) -> Json:
        return self._object(self._send("get release", lambda: self._repos.get_release(*self._owner_repo, release_id)),
                            "get release")

    def ensure_release(self, tag: str, *, name: str, body: str, prerelease: bool,
                       target: str | None) -> tuple[Json, bool]:
        """The release of `tag`, created when missing. Returns (release, created)."""
        if rel := self.release_by_tag(tag):
            return rel, False
        def create() -> Response[Any, Any]:
            owner, repo = self._owner_repo
            if target:
                return self._repos.create_release(owner, repo, tag_name=tag, name=name, body=body, draft=False,
                                                  prerelease=prerelease, target_commitish=target)
            return self._repos.create_release(owner, repo, tag_name=tag, name=name, body=body, draft=False,
                                              prerelease=prerelease)
        resp = self._send(f"create release {tag}", create)
        if resp.status_code == 422 and (rel := self.release_by_tag(tag)):
            return rel, False  # another matrix job created it in the meantime
        if resp.status_code == 404:
            self._json(resp, f"create release {tag}")
        if resp.status_code == 422:
            raise GitHubError(f"cannot create release {tag}: {_message(resp)}",
                              "push the tag first (git push origin TAG), or check that the commit exists on GitHub")
        log.info("created release %s", tag)
        return resp.json(), True

    def update_release(self, release_id: int, *, body: str) -> Json:
        return self._object(self._send("update release", lambda: self._repos.update_release(
            *self._owner_repo, release_id, body=body)), "update release")

    # ---- assets ----

    def assets(self, release: Json) -> list[Json]:
        def first() -> Response[Any, Any]:
            return self._repos.list_release_assets(*self._owner_repo, release["id"], per_page=100)
        call: Callable[[], Response[Any, Any]] | None = first
        out: list[Json] = []
        while call:
            resp = self._send("list release assets", call)
            page = self._json(resp, "list release assets")
            if not isinstance(page, list):
                raise GitHubError(f"GitHub API list release assets: expected a JSON list, got {type(page).__name__}")
            out += page
            url = resp.links.get("next", {}).get("url")
            call = self._url("GET", url) if url else None
        return out

    def delete_asset(self, asset: Json) -> None:
        resp = self._send(f"delete asset {asset['name']}",
                          lambda: self._repos.delete_release_asset(*self._owner_repo, asset["id"]))
        if resp.status_code not in (204, 404):
            self._json(resp, f"delete asset {asset['name']}")

    def rename_asset(self, asset: Json, name: str) -> Json:
        return self._object(self._send(f"rename asset {asset['name']}", lambda: self._repos.update_release_asset(
            *self._owner_repo, asset["id"], data={"name": name})), f"rename asset {asset['name']}")

    def download(self, asset: Json) -> bytes:
        resp = self._send(f"download asset {asset['name']}",
                          self._url("GET", asset["url"], headers={"Accept": "application/octet-stream"}))
        if resp.status_code >= 400:
            self._json(resp, f"download asset {asset['name']}")
        return resp.content

    def upload(self, release: Json, name: str, path: Path, offset: int, length: int,
               *, sha256: str | None = None) -> Json:
        """Upload bytes [offset, offset+length) of `path` as asset `name`."""
        url = release["upload_url"].split("{", 1)[0]

        def drop_partial() -> None:
            for asset in self.assets(release):
                if asset["name"] == name and asset.get("state") != "uploaded":
                    log.info("deleting half-uploaded asset %s", name)
                    self.delete_asset(asset)

        started = time.monotonic()
        # githubkit hands `content` to httpx, which streams an iterator; its annotation says bytes
        resp = self._send(f"upload {name}", lambda: self._gh.request(  # type: ignore[call-overload]
            "POST", url, params={"name": name}, content=file_range(path, offset, length),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(length)}),
            before_retry=drop_partial)
        if resp.status_code == 422:
            # a retried upload whose first attempt did land: accept it if it is complete
            same = [a for a in self.assets(release) if a["name"] == name]
            if same and same[0].get("state") == "uploaded" and same[0]["size"] == length \
                    and same[0].get("digest") in (None, f"sha256:{sha256}"):
                return same[0]
            raise GitHubError(f"upload of {name} refused: 422 {_message(resp)}")
        asset = self._object(resp, f"upload {name}")
        secs = max(time.monotonic() - started, 1e-6)
        log.info("uploaded %s: %d bytes in %.1fs (%.1f MB/s)", name, length, secs, length / secs / 1e6)
        return asset


def _message(resp: httpx.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        return resp.text[:200]
    msg = data.get("message", "") if isinstance(data, dict) else ""
    errors = data.get("errors") if isinstance(data, dict) else None
    return f"{msg} {errors}" if errors else msg


def _rate_limited(resp: httpx.Response) -> bool:
    return resp.status_code == 403 and resp.headers.get("x-ratelimit-remaining") == "0"


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    if value and value.isdigit():
        return min(float(value), 120.0)
    reset = resp.headers.get("x-ratelimit-reset")
    if _rate_limited(resp) and reset and reset.isdigit():
        return min(max(float(reset) - time.time(), 1.0), 120.0)
    return None
