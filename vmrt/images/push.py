"""Pushing an image from vmrt's store to an OCI distribution (v2) registry.

The store keeps every image's blobs as they came (a pulled image's compressed layers, its
config and its manifest, byte for byte), so a push sends those blobs and that manifest: a
pulled image pushes with the digests it was pulled with. Per blob (the layers PARALLEL at a
time, then the config):

1. ``HEAD /v2/<name>/blobs/<digest>``: there already (an earlier push, or one that died
   midway): "Layer already exists".
2. a cross-repository mount from each repository of the same registry the image came from
   (its repo digests), ``POST .../blobs/uploads/?mount=<digest>&from=<repo>``: 201 is
   "Mounted from <repo>"; a 202 (refused) is an upload session, used for the upload.
3. an upload: monolithic (the blob in the ``PUT ...?digest=``) up to the chunk size, else
   ``PATCH`` chunks with ``Content-Range``, then the ``PUT``. A chunked session's URL and
   offset are kept (root only) while it runs, so a push killed midway and run again
   continues the session where the registry says it stands (``GET`` of the session).

Then the manifest is put by tag (or by its digest, for ``NAME@sha256:...``). Auth is the
pull client's (:class:`vmrt.images.registry.Client`), asking for ``pull,push`` on the
repository (and ``pull`` on the mount sources). Nothing the registry says is trusted: its
bodies are read up to a bound, an upload ``Location`` must stay on the registry's own
origin or be HTTPS (and then gets no credentials), and the digest it reports for a blob or
the manifest must be the one sent. Every local blob is checked against its digest first.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import re
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, NoReturn, TextIO

import requests

from ..errors import ImageError
from ..formatting import inert
from . import auth, reference
from .registry import NET_ERRORS, TIMEOUT, Aborted, Client, Transient, error_detail, parse_challenges, reason
from .store import MT_OCI_MANIFEST, Image, Store, digest_hex

PARALLEL = 3                # blobs sent at once (Docker sends 5)
DEFAULT_CHUNK = 16 << 20    # blobs larger than this go in PATCH chunks of this size (config push_chunk_size)
READ = 1 << 20
MAX_LOCATION = 8192
MAX_MOUNT_SOURCES = 3

Emit = Callable[[dict[str, Any]], None]


class _PushClient(Client):
    """The pull client with the push scope and the other methods (HEAD, POST, PATCH, PUT)."""

    def __init__(self, host: str, repo: str, insecure: Collection[str], creds: tuple[str, str] | None,
                 familiar_name: str, *, identity_token: str, mount_from: list[str],
                 cancel: threading.Event | None) -> None:
        super().__init__(host, repo, insecure, creds, familiar_name, identity_token=identity_token)
        self.cancel = cancel  # the caller's; self.abort (the client's own) is set by a failed upload
        self.scope = " ".join([f"repository:{repo}:pull,push", *(f"repository:{m}:pull" for m in mount_from)])
        self.origin = urllib.parse.urlsplit(self.root)[:2]

    def same_origin(self, url: str) -> bool:
        return urllib.parse.urlsplit(url)[:2] == self.origin

    def call(self, method: str, url: str, what: str, ok: tuple[int, ...], *, headers: dict[str, str] | None = None,
             body: Callable[[], Any] | None = None, params: dict[str, str] | None = None) -> requests.Response:
        """``method`` on ``url`` (absolute: an upload Location; else relative to /v2/), answering a
        401 once; a response whose status is in ``ok`` (body unread), else ImageError. ``body``
        makes the request body afresh (it is sent again after a 401). Credentials only go to
        the registry's own origin; redirects are not followed."""
        url = url if url.startswith(("http://", "https://")) else self.root + url
        sent = self._authorization() if self.same_origin(url) else None
        resp = self._request(method, url, headers, sent, body, params)
        if resp.status_code == 401 and self.same_origin(url):
            challenges = parse_challenges(resp.headers.get("WWW-Authenticate", ""))
            resp.close()
            self._answer(challenges, sent)
            sent = self._authorization()
            resp = self._request(method, url, headers, sent, body, params)
        if resp.status_code not in ok:
            self._fail(resp, what, sent)
        return resp

    def _request(self, method: str, url: str, headers: dict[str, str] | None, authorization: str | None,
                 body: Callable[[], Any] | None, params: dict[str, str] | None) -> requests.Response:
        host = urllib.parse.urlsplit(url).netloc
        h = {**(headers or {}), **({"Authorization": authorization} if authorization else {})}
        if self.abort.is_set() or (self.cancel is not None and self.cancel.is_set()):
            raise Aborted()
        try:
            resp = self._session().request(method, url, params=params, headers=h, data=body() if body else None,
                                           stream=True, timeout=TIMEOUT, allow_redirects=False)
        except requests.exceptions.SSLError as e:
            raise ImageError(f"cannot reach registry {host} over HTTPS: {reason(e)} (a plain-HTTP registry "
                             f"must be listed as an insecure registry)") from e
        except NET_ERRORS as e:
            raise Transient(f"cannot reach registry {host}: {reason(e)}") from e
        if resp.status_code == 429 or resp.status_code >= 500:
            resp.close()
            raise Transient(f"registry {host} answered {resp.status_code} {resp.reason}")
        return resp

    def _fail(self, resp: requests.Response, what: str, sent: str | None) -> NoReturn:
        """ImageError for a refusal, worded as ``docker push`` words it."""
        detail = error_detail(resp)
        resp.close()
        if resp.status_code == 401 and (sent or "").startswith("Basic "):
            raise ImageError(f"{self.host}: unauthorized: incorrect username or password")
        if resp.status_code in (401, 403):
            if not sent and self._scheme == "basic":
                detail = "no basic auth credentials"
            elif detail == f"{resp.status_code} {resp.reason}":  # a HEAD's answer has no body
                detail = "unauthorized: authentication required" if resp.status_code == 401 else "denied"
            raise ImageError(f"push access denied for {self.familiar_name}: {detail}")
        raise ImageError(f"{what}: registry {self.host} answered {detail}")

    def location(self, resp: requests.Response, base: str) -> str:
        """The upload session URL a response names: on the registry's origin, or HTTPS elsewhere."""
        loc = resp.headers.get("Location", "")
        resp.close()
        if not loc or len(loc) > MAX_LOCATION or any(c in loc for c in "\r\n\0"):
            raise ImageError(f"registry {self.host} started an upload without a usable Location")
        url = urllib.parse.urljoin(base, loc)
        parts = urllib.parse.urlsplit(url)
        if not self.same_origin(url) and (parts.scheme != "https" or not parts.netloc):
            raise ImageError(f"registry {self.host} sent an upload to {inert(parts.scheme)}://"
                             f"{inert(parts.netloc)}: refused (only its own origin, or HTTPS)")
        return url


# --- output --------------------------------------------------------------------------------

class _Progress:
    """Docker's push output: plain lines on ``out``, nothing (quiet), or JSON messages to ``emit``."""

    PERIOD = 0.2  # a layer's Pushing {current, total} at most this often (seconds), and at its end

    def __init__(self, out: TextIO, quiet: bool, emit: Emit | None) -> None:
        self.out, self.quiet, self.emit = out, quiet, emit
        self._last: dict[str, float] = {}

    def status(self, text: str, ident: str = "", detail: dict[str, int] | None = None) -> None:
        if detail is not None:
            now = time.monotonic()
            if now - self._last.get(ident, 0.0) < self.PERIOD and detail["current"] < detail["total"]:
                return
            self._last[ident] = now
        if self.emit is not None:
            msg: dict[str, Any] = {"status": text}
            if ident:
                msg.update(progressDetail=detail or {}, id=ident)
            self.emit(msg)
        elif not self.quiet and detail is None:
            print(inert(f"{ident}: {text}" if ident else text), file=self.out, flush=True)

    def aux(self, tag: str, digest: str, size: int) -> None:
        if self.emit is not None:
            self.emit({"progressDetail": {}, "aux": {"Tag": tag, "Digest": digest, "Size": size}})


# --- push ----------------------------------------------------------------------------------

_RANGE = re.compile(r"^(?:bytes=)?0-([0-9]{1,19})$")


class _Push:
    """One push: each blob there (skipped, mounted or uploaded), then the manifest."""

    def __init__(self, store: Store, client: _PushClient, image: Image, progress: _Progress, chunk: int,
                 mount_from: list[str]) -> None:
        self.store, self.client, self.image, self.progress = store, client, image, progress
        self.chunk, self.mount_from = chunk, mount_from
        self.repo = client.repo or ""

    def layers(self, todo: list[tuple[dict[str, Any], str]]) -> None:
        """Each (descriptor, ident) there, PARALLEL at a time; the first failure stops the others."""
        with concurrent.futures.ThreadPoolExecutor(PARALLEL, thread_name_prefix="push") as pool:
            futures = [pool.submit(self.blob, desc, ident) for desc, ident in todo]
            try:
                done, _ = concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
            except BaseException:  # Ctrl-C: stop every upload before the pool waits for them
                self.client.abort.set()
                for f in futures:
                    f.cancel()
                raise
            errors = [e for f in done if (e := f.exception()) is not None]
            if errors:  # the others stop at their next request; the first failure is the push's
                self.client.abort.set()
                for f in futures:
                    f.cancel()
                raise errors[0]

    def blob(self, desc: dict[str, Any], ident: str) -> None:
        """One blob there (retried whole after a transient failure); ``ident`` ('' for the config,
        which Docker does not show) names it in the output."""
        self._verify_local(desc["digest"], desc["size"])
        self.client.retry(lambda: self._blob(desc, ident))

    def _say(self, text: str, ident: str) -> None:
        if ident:
            self.progress.status(text, ident)

    def _blob(self, desc: dict[str, Any], ident: str) -> None:
        digest = desc["digest"]
        resp = self.client.call("HEAD", f"{self.repo}/blobs/{digest}", f"blob {digest}", (200, 404))
        resp.close()
        if resp.status_code == 200:
            self._say("Layer already exists", ident)
            return
        session = ""
        for src in self.mount_from:
            url = f"{self.repo}/blobs/uploads/"
            try:
                resp = self.client.call("POST", url, f"mount of {digest}", (201, 202),
                                        params={"mount": digest, "from": src})
            except ImageError:  # e.g. no pull access to the source (a 401): upload it instead
                continue
            if resp.status_code == 201:
                resp.close()
                self._say(f"Mounted from {src}", ident)
                return
            session = self.client.location(resp, self.client.root + url)  # refused: an upload session instead
        self._upload(desc, ident, session)
        self._say("Pushed", ident)

    def _verify_local(self, digest: str, size: int) -> None:
        h = hashlib.sha256()
        n = 0
        try:
            with open(self.store.blob_path(digest), "rb") as f:
                while data := f.read(READ):
                    h.update(data)
                    n += len(data)
        except FileNotFoundError:
            raise ImageError(f"blob {digest} is missing from the store: pull or load the image again") from None
        if "sha256:" + h.hexdigest() != digest or n != size:
            raise ImageError(f"blob {digest} in the store is corrupt (digest or size mismatch): not pushed")

    def _state_file(self, digest: str) -> Path:
        key = hashlib.sha256(f"{self.client.host}/{self.repo}@{digest}".encode()).hexdigest()
        return self.store.root / "push-uploads" / key

    def _upload(self, desc: dict[str, Any], ident: str, session: str) -> None:
        digest, size = desc["digest"], desc["size"]
        path = self.store.blob_path(digest)
        offset = 0
        if size > self.chunk:
            session, offset = self._resume(digest, size) or (session, 0)
        if not session:
            url = self.client.root + f"{self.repo}/blobs/uploads/"
            session = self.client.location(self.client.call("POST", url, f"upload of {digest}", (202,)), url)
        if size <= self.chunk:
            def whole() -> Any:
                return path.read_bytes()
            resp = self.client.call("PUT", session, f"upload of {digest}", (201,), body=whole,
                                    params={"digest": digest}, headers={"Content-Type": "application/octet-stream"})
        else:
            state = self._state_file(digest)
            with open(path, "rb") as f:
                f.seek(offset)
                while offset < size:
                    data = f.read(min(self.chunk, size - offset))
                    if not data:
                        raise ImageError(f"blob {digest} shrank in the store while it was pushed")
                    resp = self.client.call(
                        "PATCH", session, f"upload of {digest}", (202,), body=_const(data),
                        headers={"Content-Type": "application/octet-stream",
                                 "Content-Range": f"{offset}-{offset + len(data) - 1}"})
                    session = self.client.location(resp, session)
                    offset += len(data)
                    self._save_state(state, session, offset)
                    if ident:
                        self.progress.status("Pushing", ident, {"current": offset, "total": size})
            resp = self.client.call("PUT", session, f"upload of {digest}", (201,), params={"digest": digest},
                                    headers={"Content-Type": "application/octet-stream"})
        resp.close()
        said = resp.headers.get("Docker-Content-Digest", digest)
        if said != digest:
            raise ImageError(f"registry {self.client.host} stored blob {digest} as {inert(said[:80])}")
        if size > self.chunk:
            with contextlib.suppress(FileNotFoundError):
                self._state_file(digest).unlink()

    def _save_state(self, state: Path, session: str, offset: int) -> None:
        state.parent.mkdir(mode=0o700, exist_ok=True)
        tmp = state.with_name(state.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"url": session, "offset": offset}, f)
        os.replace(tmp, state)

    def _resume(self, digest: str, size: int) -> tuple[str, int] | None:
        """An earlier push's chunked session for this blob, and where the registry says it stands."""
        state = self._state_file(digest)
        try:
            saved = json.loads(state.read_bytes()[:MAX_LOCATION * 2])
            url = saved["url"]
            if not isinstance(url, str) or not self.client.same_origin(url):
                raise ValueError("not this registry's")
        except (OSError, ValueError, TypeError, KeyError):
            return None
        state.unlink()
        try:
            resp = self.client.call("GET", url, f"upload of {digest}", (204,))
        except ImageError:  # the session expired or was purged: start again
            return None
        m = _RANGE.match(resp.headers.get("Range", "").strip())
        resp.close()
        if not m or int(m[1]) + 1 > size:
            return None
        url = self.client.location(resp, url) if resp.headers.get("Location") else url
        return url, int(m[1]) + 1

    def manifest(self, target: str) -> tuple[str, int]:
        data = self.store.read_blob(self.image.manifest_digest)  # verified against its digest
        mt = self.image.manifest.get("mediaType") or MT_OCI_MANIFEST
        resp = self.client.call("PUT", f"{self.repo}/manifests/{target}", f"manifest {target}", (201,),
                                headers={"Content-Type": mt}, body=lambda: data)
        resp.close()
        said = resp.headers.get("Docker-Content-Digest", self.image.manifest_digest)
        if said != self.image.manifest_digest:
            raise ImageError(f"registry {self.client.host} stored manifest {self.image.manifest_digest} as "
                             f"{inert(said[:80])}")
        return self.image.manifest_digest, len(data)


def _const(data: bytes) -> Callable[[], bytes]:
    return lambda: data


def _mount_sources(image: Image, r: reference.Reference) -> list[str]:
    """Repositories of the same registry the image came from or went to (its repo digests)."""
    out: list[str] = []
    for rd in image.repo_digests:
        with contextlib.suppress(ImageError, ValueError):
            p = reference.parse(rd)
            if p.domain == r.domain and p.path != r.path and p.path not in out:
                out.append(p.path)
    return out[:MAX_MOUNT_SOURCES]


def push(store: Store, ref: str, *, insecure_registries: Collection[str] = (), quiet: bool = False,
         auth_file: Path, out: TextIO = sys.stdout, creds: tuple[str, str] | None = None,
         identity_token: str = "", chunk_size: int = 0, cancel: threading.Event | None = None,
         emit: Emit | None = None) -> tuple[str, int]:
    """Push ``ref`` (a tag, or ``NAME@sha256:...``) from ``store``; returns (manifest digest, size).

    ``creds``/``identity_token``, where given, are this push's credentials (the API's
    ``X-Registry-Auth``) instead of those in ``auth_file``. ``emit`` gets Docker's JSON
    progress messages instead of the lines on ``out``; setting ``cancel`` stops the push.
    Blobs larger than ``chunk_size`` (0: DEFAULT_CHUNK) go in chunks of that size.
    """
    r = reference.parse(ref)
    if "@" not in ref and ":" not in ref.rpartition("/")[2] and not quiet and emit is None:
        print("Using default tag: latest", file=out, flush=True)
    try:
        image = store.get(str(r))
    except ImageError:
        raise ImageError(f"An image does not exist locally with the tag: {r.familiar()}") from None
    target = r.digest or r.tag or "latest"
    if r.digest and r.digest != image.manifest_digest:  # e.g. the digest of the index it was pulled from
        raise ImageError(f"{r.familiar()}: the image's manifest is {image.manifest_digest}, not {r.digest}: "
                         f"push it by a tag")
    if creds is None and not identity_token:
        creds = auth.get(auth_file, r.domain)
    mount_from = _mount_sources(image, r)
    client = _PushClient(r.api_host, r.path, insecure_registries, creds, r.familiar_name,
                         identity_token=identity_token, mount_from=mount_from, cancel=cancel)
    progress = _Progress(out, quiet, emit)
    job = _Push(store, client, image, progress, chunk_size if chunk_size > 0 else DEFAULT_CHUNK, mount_from)
    try:
        with store.writing():  # garbage collection waits: the blobs stay while they are sent
            progress.status(f"The push refers to repository [{r.name}]")
            client.retry(client.ping)
            layers = list({d["digest"]: (d, diff) for d, diff in zip(image.layers, image.diff_ids, strict=True)}
                          .values())
            for _, diff_id in layers:
                progress.status("Preparing", digest_hex(diff_id)[:12])
            job.layers([(desc, digest_hex(diff_id)[:12]) for desc, diff_id in layers])
            config = image.manifest.get("config") or {}
            job.blob({"digest": image.id, "size": int(config.get("size") or len(store.read_blob(image.id)))}, "")
            digest, size = client.retry(lambda: job.manifest(target))
            progress.status(f"{target}: digest: {digest} size: {size}")
            progress.aux(target, digest, size)
            store.commit_image(image.manifest_digest, repo_digests=[f"{r.name}@{digest}"])
            return digest, size
    except Aborted as e:
        raise ImageError(f"push of {r.familiar()} cancelled") from e
    except NET_ERRORS as e:  # a local failure (a blob unreadable), or a network one not wrapped above
        raise ImageError(f"pushing {r.familiar()}: {reason(e)}") from e
    finally:
        client.close()
