"""Pulling images from an OCI distribution (v2) registry, and ``login``/``logout``.

A pull fetches the manifest (choosing the platform's entry of an index), the
config, then every missing layer, and commits the image in one store
transaction, so an interrupted pull leaves nothing visible. Nothing from the
registry is trusted: manifests are checked against the digest asked for (or
``Docker-Content-Digest`` for a tag), the config against its descriptor, and
each layer twice while it streams: its blob digest (checked when the last byte
arrives, before the unpacker sees the end of the stream) and its uncompressed
diff id (the store's check). Manifests and configs are capped in size.

Speed comes from unpacking while downloading: each layer's HTTP body flows
through a tee into the store's blob writer and the store's unpacker at once,
three layers at a time, so a pull costs about as much as the download itself.
Transient failures (connection errors, timeouts, 5xx, 429) are retried with
exponential back-off; a layer restarts from its first byte, since the
unpacker cannot resume mid-stream.

A registry's mirrors (vmrt/images/mirrors.py) are tried first, in order, each as a
whole pull checked exactly as the origin's is; any failure of one (unreachable, 5xx,
no such manifest, a digest that does not match) moves on to the next with a notice,
and last to the origin. A mirror gets only the credentials stored for its own host.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import logging
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO, TypeVar

import requests
import urllib3

from ..errors import ImageError, UsageError
from ..formatting import inert
from . import auth, reference
from . import mirrors as mirrors_mod
from .store import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MT_OCI_INDEX,
    MT_OCI_MANIFEST,
    BlobWriter,
    Image,
    Store,
    descriptor,
    digest_hex,
    layer_descriptors,
    sha256,
)

ACCEPT = ", ".join([*MANIFEST_TYPES, *INDEX_TYPES])
MAX_JSON = 4 << 20          # manifests, indexes, configs and token replies: no real one comes near
CHUNK = 1 << 20
PARALLEL = 3                # layers downloaded at once, as Docker does
ATTEMPTS = 5
BACKOFF = 0.2               # seconds before the first retry, doubling after each
TIMEOUT = (10, 60)          # connect, read (between bytes)
MIRROR_ATTEMPTS = 2         # a mirror's requests: the next mirror, or the origin, is the retry

LOG = logging.getLogger(__name__)

T = TypeVar("T")

_NET_ERRORS = (OSError, urllib3.exceptions.HTTPError)  # requests' exceptions are OSErrors
_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm", "i386": "386"}
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7"}


class _Transient(Exception):
    """A failure worth retrying: the connection broke or timed out, or the registry answered 5xx or 429."""


class _Aborted(Exception):
    """Another layer failed: this download stops (the pull reports the first failure)."""


# --- WWW-Authenticate ----------------------------------------------------------------------

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_CHALLENGE_PART = re.compile(
    rf'[\s,]*(?:(?P<key>{_TOKEN})\s*=\s*(?P<value>"(?:[^"\\]|\\.)*"|[^\s,]*)|(?P<scheme>{_TOKEN}))')


def parse_challenges(header: str) -> dict[str, dict[str, str]]:
    """``WWW-Authenticate`` as {scheme: {param: value}}, schemes and names lower-cased.

    Quoted values keep their commas and escaped quotes (``scope="repository:a:pull,push"``);
    a header may carry several challenges (``Bearer realm="x", Basic realm="y"``).
    """
    out: dict[str, dict[str, str]] = {}
    params: dict[str, str] | None = None
    pos = 0
    while pos < len(header) and (m := _CHALLENGE_PART.match(header, pos)) and m.end() > pos:
        pos = m.end()
        if m["scheme"]:
            params = out.setdefault(m["scheme"].lower(), {})
        elif params is not None:
            v = m["value"]
            params[m["key"].lower()] = re.sub(r"\\(.)", r"\1", v[1:-1]) if v.startswith('"') else v
    return out


# --- platforms -----------------------------------------------------------------------------

Platform = tuple[str, str, str]  # os, architecture, variant ('' for any)


def _normal(os_: str, arch: str, variant: str) -> Platform:
    arch = _ARCH_ALIASES.get(arch.lower(), arch.lower())
    return os_.lower(), arch, (variant.lower() or _DEFAULT_VARIANT.get(arch, ""))


def parse_platform(platform: str) -> Platform:
    """``os/arch[/variant]`` normalised as Docker does (``linux/aarch64`` is ``linux/arm64/v8``)."""
    parts = platform.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise UsageError(f"invalid platform {platform!r}: expected os/arch[/variant], e.g. linux/arm64")
    return _normal(parts[0], parts[1], parts[2] if len(parts) == 3 else "")


def _show(p: Any) -> str:
    p = p if isinstance(p, dict) else {}
    return "/".join(str(x) for x in (p.get("os", "unknown"), p.get("architecture", "unknown"), p.get("variant"))
                    if x)


def _matches(p: Any, want: Platform) -> bool:
    if not isinstance(p, dict) or not isinstance(p.get("os"), str) or not isinstance(p.get("architecture"), str):
        return False
    have = _normal(p["os"], p["architecture"], str(p.get("variant") or ""))
    return have[:2] == want[:2] and (not want[2] or have[2] == want[2])


# --- helpers -------------------------------------------------------------------------------

def _chain(e: BaseException) -> list[BaseException]:
    """``e`` and every exception it wraps (urllib3 nests them in args, reason, cause, context)."""
    chain: list[BaseException] = []
    todo = [e]
    while todo:
        x = todo.pop(0)
        if all(x is not c for c in chain):
            chain.append(x)
            linked = [*x.args, getattr(x, "reason", None), x.__cause__, x.__context__]
            todo += [c for c in linked if isinstance(c, BaseException)]
    return chain


def _unknown_host(e: BaseException) -> bool:
    """The name does not resolve at all: retrying cannot help (a temporary DNS failure can)."""
    return any(isinstance(x, socket.gaierror) and x.errno == socket.EAI_NONAME for x in _chain(e))


def _reason(e: BaseException) -> str:
    """A network error's root cause in a few words ("connection refused"), not urllib3's nesting of it."""
    chain = _chain(e)
    for x in chain:
        if isinstance(x, OSError) and isinstance(x.strerror, str) and x.strerror:
            return x.strerror[0].lower() + x.strerror[1:]
    if any(isinstance(x, TimeoutError | requests.Timeout | urllib3.exceptions.TimeoutError) for x in chain):
        return "timed out"
    return next((a for x in chain for a in x.args if isinstance(a, str) and a), type(e).__name__)


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ImageError(f"{what} is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise ImageError(f"{what} is not a JSON object")
    return obj


def _error_detail(resp: requests.Response) -> str:
    """The registry's error body as Docker prints it ("manifest unknown: manifest unknown")."""
    try:
        errors = json.loads(resp.raw.read(65536, decode_content=True)).get("errors")
        details = [f"{str(x['code']).lower().replace('_', ' ')}: {x.get('message', '')}" for x in errors]
    except (*_NET_ERRORS, ValueError, TypeError, KeyError, AttributeError):
        details = []
    return "; ".join(details) or f"{resp.status_code} {resp.reason}"


def _is_insecure(host: str, insecure: Collection[str]) -> bool:
    """Plain HTTP is used only for registries listed as insecure, by ``host:port`` or ``host``."""
    names = {auth.server_host(i) for i in insecure}
    return host in names or host.rpartition(":")[0] in names


@dataclasses.dataclass
class _Manifest:
    digest: str
    media_type: str
    data: bytes
    body: dict[str, Any]


# --- HTTP ----------------------------------------------------------------------------------

class _Client:
    """One registry, one repository: authenticated GETs with retries, shared by the download threads.

    Auth follows the registry's ``WWW-Authenticate`` challenge (from the ``/v2/`` ping or
    any later 401): Basic with the stored credentials, or a Bearer token fetched from
    the challenge's realm (with the credentials, if any, else anonymously; with an
    identity token, Docker's OAuth2 refresh-token grant), cached for the pull's scope.
    A 401 later on (an expired token) fetches a fresh token once. ``abort`` (the
    caller's, to cancel the pull; else the client's own) stops the downloads.
    """

    attempts: int | None = None  # tries per request; None: ATTEMPTS

    def __init__(self, host: str, repo: str | None, insecure: Collection[str], creds: tuple[str, str] | None,
                 familiar_name: str = "", *, identity_token: str = "", abort: threading.Event | None = None) -> None:
        self.host, self.repo, self.creds, self.identity_token = host, repo, creds, identity_token
        self.familiar_name = familiar_name or host
        self.root = f"{'http' if _is_insecure(host, insecure) else 'https'}://{host}/v2/"
        self.scope = f"repository:{repo}:pull" if repo else ""
        self.abort = abort or threading.Event()
        self._scheme = ""
        self._tokens: dict[str, str] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self._sessions: list[requests.Session] = []

    def close(self) -> None:
        for s in self._sessions:
            s.close()

    def _session(self) -> requests.Session:
        """One session (connection pool) per thread: requests' sessions are not thread-safe."""
        s: requests.Session | None = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
            with self._lock:
                self._sessions.append(s)
        return s

    def _authorization(self) -> str | None:
        if self._scheme == "basic" and self.creds:
            return "Basic " + base64.b64encode(":".join(self.creds).encode()).decode()
        if self._scheme == "bearer" and self.scope in self._tokens:
            return "Bearer " + self._tokens[self.scope]
        return None

    def _send(self, url: str, headers: dict[str, str], authorization: str | None,
              params: dict[str, str] | None = None, form: dict[str, str] | None = None) -> requests.Response:
        """A GET (a POST of ``form``, for a token) with the session's retries left to the caller."""
        host = url.split("/")[2]
        if authorization:
            headers = {**headers, "Authorization": authorization}
        try:
            if form is not None:
                resp = self._session().post(url, data=form, headers=headers, stream=True, timeout=TIMEOUT)
            else:
                resp = self._session().get(url, params=params, headers=headers, stream=True, timeout=TIMEOUT)
        except requests.exceptions.SSLError as e:
            raise ImageError(f"cannot reach registry {host} over HTTPS: {_reason(e)} (a plain-HTTP registry "
                             f"must be listed as an insecure registry)") from e
        except _NET_ERRORS as e:
            if _unknown_host(e):
                raise ImageError(f"cannot reach registry {host}: {_reason(e)}") from e
            raise _Transient(f"cannot reach registry {host}: {_reason(e)}") from e
        if resp.status_code == 429 or resp.status_code >= 500:
            resp.close()
            raise _Transient(f"registry {host} answered {resp.status_code} {resp.reason}")
        return resp

    def ping(self) -> None:
        """``GET /v2/``, as Docker starts: a 401 here sets up auth before the first real request."""
        resp = self._send(self.root, {}, None)
        resp.close()
        if resp.status_code == 401:
            self._answer(parse_challenges(resp.headers.get("WWW-Authenticate", "")), None)

    def get(self, url: str, what: str, headers: dict[str, str] | None = None) -> requests.Response:
        """A 200 response (body unread) for ``url``, relative to /v2/; ImageError for any other answer."""
        url = self.root + url
        sent = self._authorization()
        resp = self._send(url, headers or {}, sent)
        if resp.status_code == 401:
            challenges = parse_challenges(resp.headers.get("WWW-Authenticate", ""))
            resp.close()
            self._answer(challenges, sent)
            sent = self._authorization()
            resp = self._send(url, headers or {}, sent)
        if resp.status_code != 200:
            self._fail(resp, what, sent)
        return resp

    def _answer(self, challenges: dict[str, dict[str, str]], stale: str | None) -> None:
        """Take up a 401's challenge, unless another thread already did since ``stale`` was sent."""
        with self._lock:
            if self._authorization() != stale:
                return
            if "bearer" in challenges:
                self._scheme = "bearer"
                self._tokens[self.scope] = self._token(challenges["bearer"])
            elif "basic" in challenges:
                self._scheme = "basic"

    def _token(self, challenge: dict[str, str]) -> str:
        realm = challenge.get("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise ImageError(f"registry {self.host} sent a bearer challenge without a usable realm: {realm!r}")
        if (self.creds or self.identity_token) and realm.startswith("http://") and self.root.startswith("https://"):
            raise ImageError(f"registry {self.host} asks for credentials to be sent to {realm} over plain "
                             "HTTP: refused")
        if self.identity_token:  # Docker's OAuth2 refresh-token grant (what `docker login` stores for some registries)
            form = {k: v for k, v in (("grant_type", "refresh_token"), ("refresh_token", self.identity_token),
                                      ("service", challenge.get("service", "")), ("scope", self.scope),
                                      ("client_id", "vmrt")) if v}
            resp = self._send(realm, {}, None, form=form)
            if resp.status_code in (400, 401, 403):
                resp.close()
                raise ImageError(f"{self.host}: unauthorized: the identity token was refused")
        else:
            params = {k: v for k, v in (("service", challenge.get("service", "")), ("scope", self.scope),
                                        ("account", self.creds[0] if self.creds else "")) if v}
            basic = "Basic " + base64.b64encode(":".join(self.creds).encode()).decode() if self.creds else None
            resp = self._send(realm, {}, basic, params)
        if resp.status_code in (401, 403) and self.creds:
            resp.close()
            raise ImageError(f"{self.host}: unauthorized: incorrect username or password")
        if resp.status_code != 200:
            self._fail(resp, f"token from {realm}", None)
        reply = _json(self.body(resp, MAX_JSON, f"token reply from {realm}"), f"token reply from {realm}")
        token = reply.get("token") or reply.get("access_token")
        if not isinstance(token, str) or not token:
            raise ImageError(f"token server {realm} sent no token")
        return token

    def _fail(self, resp: requests.Response, what: str, sent: str | None) -> NoReturn:
        """ImageError for a registry's refusal, worded as Docker words it."""
        detail = _error_detail(resp)
        resp.close()
        if resp.status_code == 401 and (self.repo is None or (sent or "").startswith("Basic ")):
            raise ImageError(f"{self.host}: unauthorized: incorrect username or password")
        if resp.status_code in (401, 403) or "name unknown:" in detail:
            if not sent and self._scheme == "basic":
                detail = "no basic auth credentials"
            raise ImageError(f"pull access denied for {self.familiar_name}, repository does not exist or may "
                             f"require 'docker login': {detail}")
        if resp.status_code == 404:
            raise ImageError(f"{what} not found: {detail}")
        raise ImageError(f"{what}: registry {self.host} answered {detail}")

    def body(self, resp: requests.Response, limit: int, what: str) -> bytes:
        """The whole body, refused beyond ``limit`` bytes (a hostile registry could send gigabytes)."""
        with resp:
            length = resp.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > limit:
                raise ImageError(f"{what} is too large ({length} bytes; at most {limit} accepted)")
            try:
                data = resp.raw.read(limit + 1, decode_content=True)
            except _NET_ERRORS as e:
                raise _Transient(f"download from registry {self.host} broke off: {_reason(e)}") from e
        if len(data) > limit:
            raise ImageError(f"{what} is too large (over {limit} bytes)")
        return bytes(data)

    def retry(self, fn: Callable[[], T], on_retry: Callable[[float], None] = lambda delay: None) -> T:
        """``fn()``, run again after a transient failure, waiting BACKOFF seconds, doubled each time."""
        attempt, attempts = 1, self.attempts or ATTEMPTS
        while True:
            try:
                return fn()
            except _Transient as e:
                if attempt >= attempts:
                    raise ImageError(f"{e} (gave up after {attempts} attempts)") from e
                delay = BACKOFF * 2 ** (attempt - 1)
                on_retry(delay)
                if self.abort.wait(delay):
                    raise _Aborted() from e
                attempt += 1

    def manifest(self, ref: str, what: str) -> _Manifest:
        """The manifest or index ``ref`` (a tag or a digest) names, verified against its digest."""
        def fetch() -> tuple[bytes, requests.structures.CaseInsensitiveDict[str]]:
            resp = self.get(f"{self.repo}/manifests/{ref}", what, {"Accept": ACCEPT})
            return self.body(resp, MAX_JSON, what), resp.headers

        data, headers = self.retry(fetch)
        digest = sha256(data)
        claimed = ref if ref.startswith("sha256:") else headers.get("Docker-Content-Digest", digest)
        if claimed.startswith("sha256:") and claimed != digest:
            raise ImageError(f"{what}: digest mismatch: the registry promised {claimed}, the content is {digest}")
        body = _json(data, what)
        mt = body.get("mediaType") or headers.get("Content-Type", "").partition(";")[0].strip()
        if not isinstance(mt, str):
            raise ImageError(f"{what} is malformed: mediaType is not a string")
        if body.get("schemaVersion") == 1 or mt.startswith("application/vnd.docker.distribution.manifest.v1"):
            raise ImageError(f"{what} uses Docker image manifest v2 schema 1, which is deprecated and not "
                             f"supported: push the image again with a current tool")
        if mt not in (*MANIFEST_TYPES, *INDEX_TYPES) and body.get("schemaVersion") == 2:
            mt = MT_OCI_INDEX if "manifests" in body else MT_OCI_MANIFEST if "config" in body else mt
        if mt not in (*MANIFEST_TYPES, *INDEX_TYPES):
            raise ImageError(f"{what} has unsupported media type {mt!r}")
        return _Manifest(digest, mt, data, body)

    def blob(self, desc: dict[str, Any], what: str) -> bytes:
        """A small blob (a config), verified against its descriptor."""
        if desc["size"] > MAX_JSON:
            raise ImageError(f"{what} is too large ({desc['size']} bytes; at most {MAX_JSON} accepted)")
        data = self.retry(lambda: self.body(self.get(f"{self.repo}/blobs/{desc['digest']}", what), desc["size"], what))
        if sha256(data) != desc["digest"] or len(data) != desc["size"]:
            raise ImageError(f"{what}: digest mismatch: expected {desc['digest']} ({desc['size']} bytes), "
                             f"got {sha256(data)} ({len(data)} bytes)")
        return data


class _Tee(io.RawIOBase):
    """A layer's HTTP body as a stream: every chunk read also goes to the store's blob writer.

    The blob's digest is checked when its last byte has arrived, before the reader is
    told the stream ended, so the unpacker never completes a layer from a blob that
    does not match the manifest. ``failure`` records what went wrong on the download's
    side (a broken connection, a digest mismatch), however the unpacker reports it.
    """

    def __init__(self, client: _Client, resp: requests.Response, writer: BlobWriter, desc: dict[str, Any],
                 on_data: Callable[[int], None]) -> None:
        super().__init__()
        self._client, self._resp, self._writer, self._on_data = client, resp, writer, on_data
        self._digest, self._left, self._size = desc["digest"], desc["size"], desc["size"]
        self.failure: ImageError | _Transient | _Aborted | None = None

    def readable(self) -> bool:
        return True

    def _fail(self, e: ImageError | _Transient | _Aborted) -> ImageError | _Transient | _Aborted:
        self.failure = self.failure or e
        return self.failure

    def readinto(self, b: Any) -> int:
        if self.failure is not None:
            raise self.failure
        if self._client.abort.is_set():
            raise self._fail(_Aborted())
        if self._left == 0:
            if self._writer.digest != self._digest:
                raise self._fail(ImageError(f"digest mismatch for layer {self._digest}: "
                                            f"the registry sent content with digest {self._writer.digest}"))
            return 0
        try:
            data = self._resp.raw.read(min(len(b), self._left), decode_content=False)  # bytes as digested
        except _NET_ERRORS as e:
            raise self._fail(_Transient(f"download from registry {self._client.host} broke off: {_reason(e)}")) from e
        if not data:
            raise self._fail(_Transient(f"registry {self._client.host} ended layer {self._digest} after "
                                        f"{self._size - self._left} of {self._size} bytes"))
        n = len(data)
        b[:n] = data
        self._writer.write(data)
        self._left -= n
        self._on_data(n)
        return n

    def settle(self) -> None:
        """After the unpacker failed: raise the download's failure instead, if there was one.

        The rest of the blob is read first, so a corrupt blob is reported as a digest
        mismatch rather than as whatever gzip made of it.
        """
        with contextlib.suppress(ImageError, _Transient, _Aborted):
            buf = bytearray(CHUNK)
            while self.readinto(buf):
                pass
        if self.failure is not None:
            raise self.failure


# --- output --------------------------------------------------------------------------------

class _Progress:
    """Docker-like output: a tqdm bar per layer on a terminal, Docker's plain lines elsewhere, or nothing."""

    def __init__(self, out: TextIO, quiet: bool) -> None:
        self.out, self.quiet = out, quiet
        self.tty = not quiet and out.isatty()
        if self.tty:  # imported only for a terminal: tqdm costs ~40 ms of start-up
            from tqdm import tqdm
            self._tqdm = tqdm
        self._lock = threading.Lock()
        self._bars: dict[str, Any] = {}

    def line(self, text: str) -> None:
        if self.quiet:
            return
        text = inert(text)  # names and digests a registry sent
        with self._lock:
            if self.tty:
                self._tqdm.write(text, file=self.out)
            else:
                print(text, file=self.out, flush=True)

    def layers(self, layers: list[tuple[dict[str, Any], bool]]) -> None:
        """Announce the layers in manifest order: (descriptor, already stored); a repeated layer once."""
        unique = list({desc["digest"]: (desc, exists) for desc, exists in layers}.values())
        for position, (desc, exists) in enumerate(unique):
            short = digest_hex(desc["digest"])[:12]
            if self.tty:
                bar = self._tqdm(total=desc["size"], initial=desc["size"] if exists else 0, file=self.out,
                           desc=f"{short}: {'Already exists' if exists else 'Downloading'}", position=position,
                           leave=True, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True)
                if exists:
                    bar.close()
                else:
                    self._bars[desc["digest"]] = bar
            else:
                self.line(f"{short}: {'Already exists' if exists else 'Pulling fs layer'}")

    def advance(self, digest: str, n: int) -> None:
        if digest in self._bars:
            self._bars[digest].update(n)

    def retrying(self, digest: str, delay: float) -> None:
        if digest in self._bars:
            self._bars[digest].reset()
            self._bars[digest].set_description(f"{digest_hex(digest)[:12]}: Retrying")
        else:
            self.line(f"{digest_hex(digest)[:12]}: Retrying in {delay:g} seconds")

    def done(self, digest: str) -> None:
        bar = self._bars.pop(digest, None)
        if bar is not None:
            bar.set_description(f"{digest_hex(digest)[:12]}: Pull complete", refresh=False)
            bar.close()
        else:
            self.line(f"{digest_hex(digest)[:12]}: Pull complete")

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()


# --- pull ----------------------------------------------------------------------------------

class JsonProgress(_Progress):
    """Docker's JSON progress messages (the API's ``docker pull`` stream), each given to ``emit``
    as an object: a layer's Pulling fs layer / Already exists, Downloading {current, total}
    (at most every PERIOD seconds a layer), Pull complete; the pull's own lines as statuses."""

    PERIOD = 0.2

    def __init__(self, emit: Callable[[dict[str, Any]], None]) -> None:
        super().__init__(sys.stderr, quiet=True)
        self.emit = emit
        self._sizes: dict[str, list[float]] = {}  # digest -> [received, total, last emitted]

    def line(self, text: str) -> None:
        ident, sep, status = text.partition(": Pulling from ")
        self.emit({"status": f"Pulling from {status}", "id": ident} if sep else {"status": text})

    def layers(self, layers: list[tuple[dict[str, Any], bool]]) -> None:
        for desc, exists in {d["digest"]: (d, e) for d, e in layers}.values():
            self.emit({"status": "Already exists" if exists else "Pulling fs layer", "progressDetail": {},
                       "id": digest_hex(desc["digest"])[:12]})
            if not exists:
                self._sizes[desc["digest"]] = [0, float(desc["size"]), 0.0]

    def advance(self, digest: str, n: int) -> None:
        with self._lock:
            s = self._sizes.get(digest)
            if s is None:
                return
            s[0] += n
            now = time.monotonic()
            if now - s[2] < self.PERIOD and s[0] < s[1]:
                return
            s[2] = now
        self.emit({"status": "Downloading", "progressDetail": {"current": int(s[0]), "total": int(s[1])},
                   "id": digest_hex(digest)[:12]})

    def retrying(self, digest: str, delay: float) -> None:
        with self._lock:
            if digest in self._sizes:
                self._sizes[digest][0] = 0
        self.emit({"status": f"Retrying in {delay:g} seconds", "progressDetail": {}, "id": digest_hex(digest)[:12]})

    def done(self, digest: str) -> None:
        with self._lock:
            self._sizes.pop(digest, None)
        self.emit({"status": "Pull complete", "progressDetail": {}, "id": digest_hex(digest)[:12]})

    def close(self) -> None:
        self._sizes.clear()


class _Pull:
    """One pull: manifest, platform choice, config, layers, then the commit."""

    def __init__(self, store: Store, client: _Client, ref: reference.Reference, platform: Platform,
                 progress: _Progress) -> None:
        self.store, self.client, self.ref, self.platform, self.progress = store, client, ref, platform, progress

    def run(self) -> Image:
        r = self.ref
        self.progress.line(f"{r.digest or r.tag}: Pulling from {r.path}")
        self.client.retry(self.client.ping)
        top = self.client.manifest(r.digest or str(r.tag), f"manifest for {r.familiar()}")
        extra = []
        manifest = top
        if top.media_type in INDEX_TYPES:
            desc = self._choose(top.body)
            self.store.put_blob(top.data, top.digest)
            extra.append(top.digest)
            manifest = self.client.manifest(desc["digest"], f"manifest {desc['digest']} of {r.familiar()}")
            if manifest.media_type not in MANIFEST_TYPES or len(manifest.data) != desc["size"]:
                raise ImageError(f"{r.familiar()}: index entry {desc['digest']} is not an image manifest "
                                 f"of {desc['size']} bytes")
        layers, diff_ids = self._config(manifest)
        if self.client.abort.is_set():  # cancelled by the caller
            raise _Aborted()
        self.store.put_blob(manifest.data, manifest.digest)
        config_digest = manifest.body["config"]["digest"]
        present = [self.store.has_blob(d["digest"]) and self.store.has_layer(diff) for d, diff in
                   zip(layers, diff_ids, strict=True)]
        up_to_date = all(present) and self.store.lookup(str(r)) == config_digest
        if not up_to_date:
            self.progress.layers(list(zip(layers, present, strict=True)))
            self._layers([(d, diff) for d, diff, p in zip(layers, diff_ids, present, strict=True) if not p])
        self.progress.line(f"Digest: {top.digest}")
        image = self.store.commit_image(manifest.digest, [str(r)] if r.tag and not r.digest else [],
                                        repo_digests=[f"{r.name}@{top.digest}"], extra_blobs=extra)
        status = "Image is up to date" if up_to_date else "Downloaded newer image"
        self.progress.line(f"Status: {status} for {r.familiar()}")
        return image

    def _choose(self, index: dict[str, Any]) -> dict[str, Any]:
        """The index entry for the wanted platform; ImageError listing the platforms there are."""
        entries = index.get("manifests")
        if not isinstance(entries, list):
            raise ImageError(f"index of {self.ref.familiar()} has no manifest list")
        for entry in entries:
            if _matches(entry.get("platform") if isinstance(entry, dict) else None, self.platform):
                return descriptor(entry, f"index of {self.ref.familiar()}")
        want = "/".join(p for p in self.platform if p)
        available = ", ".join(sorted({_show(e.get("platform")) for e in entries if isinstance(e, dict)})) or "none"
        raise ImageError(f"no matching manifest for {want} in the manifest list entries of {self.ref.familiar()} "
                         f"(available platforms: {available})")

    def _config(self, manifest: _Manifest) -> tuple[list[dict[str, Any]], list[str]]:
        """The manifest's layer descriptors and the config's diff ids; the config is fetched and stored."""
        what = f"manifest {manifest.digest}"
        config_desc = descriptor(manifest.body.get("config"), what)
        layers = layer_descriptors(manifest.body, what)
        what = f"config {config_desc['digest']}"
        if self.store.has_blob(config_desc["digest"]):
            data = self.store.read_blob(config_desc["digest"])
        else:
            data = self.client.blob(config_desc, what)
        config = _json(data, what)
        rootfs = config.get("rootfs")
        diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
            raise ImageError(f"{what} has no rootfs.diff_ids")
        for d in diff_ids:
            digest_hex(d)
        if len(diff_ids) != len(layers):
            raise ImageError(f"{what} names {len(diff_ids)} diff ids for {len(layers)} layers")
        self.store.put_blob(data, config_desc["digest"])
        return layers, diff_ids

    def _layers(self, todo: list[tuple[dict[str, Any], str]]) -> None:
        """Fetch (or unpack from a stored blob) each missing layer, PARALLEL at a time."""
        unique = list({d["digest"]: (d, diff) for d, diff in todo}.values())
        with concurrent.futures.ThreadPoolExecutor(PARALLEL, thread_name_prefix="pull") as pool:
            futures = [pool.submit(self._layer, d, diff) for d, diff in unique]
            try:
                done, _ = concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
            except BaseException:  # Ctrl-C: stop every download before the pool waits for them
                self.client.abort.set()
                for f in futures:
                    f.cancel()
                raise
            errors = [e for f in done if (e := f.exception()) is not None]
            if errors:  # stop the others (they give up at their next read) and report the first
                self.client.abort.set()
                for f in futures:
                    f.cancel()
                raise errors[0]

    def _layer(self, desc: dict[str, Any], diff_id: str) -> None:
        digest = desc["digest"]
        if self.store.has_blob(digest):  # only its unpacked tree is missing
            self.store.unpacked_layer(desc, diff_id)
        else:
            self.client.retry(lambda: self._download(desc, diff_id),
                              on_retry=lambda delay: self.progress.retrying(digest, delay))
        self.progress.done(digest)

    def _download(self, desc: dict[str, Any], diff_id: str) -> None:
        digest = desc["digest"]
        resp = self.client.get(f"{self.client.repo}/blobs/{digest}", f"blob {digest}",
                               {"Accept-Encoding": "identity"})
        with resp, self.store.blob_writer(digest, desc["size"]) as writer:
            tee = _Tee(self.client, resp, writer, desc, lambda n: self.progress.advance(digest, n))
            try:
                self.store.unpacked_layer(desc, diff_id, stream=io.BufferedReader(tee, CHUNK))
            except ImageError:
                tee.settle()
                raise


class _MirrorClient(_Client):
    """A mirror of the pull's registry: its own URL (plain HTTP only where it says ``http://``),
    the credentials stored for its own host (never the origin's) and MIRROR_ATTEMPTS a request."""

    attempts = MIRROR_ATTEMPTS

    def __init__(self, mirror: mirrors_mod.Mirror, repo: str, creds: tuple[str, str] | None, familiar_name: str,
                 abort: threading.Event) -> None:
        super().__init__(mirror.host, repo, (), creds, familiar_name, abort=abort)
        self.root = mirror.api_root


class _Linked(threading.Event):
    """One mirror's abort: set by its own failed layer (which must not cancel the pull's next
    source), or set because the caller's ``cancel`` is."""

    def __init__(self, parent: threading.Event | None) -> None:
        super().__init__()
        self.parent = parent

    def is_set(self) -> bool:
        return super().is_set() or (self.parent is not None and self.parent.is_set())

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            left = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
            if left <= 0:
                return False
            super().wait(left)
        return True


def _pull_from(store: Store, client: _Client, r: reference.Reference, want: Platform,
               progress: _Progress) -> Image:
    try:
        with store.writing():
            return _Pull(store, client, r, want, progress).run()
    except _Aborted as e:  # only the caller's cancel ends a pull so: a failed layer's own error is raised
        raise ImageError(f"pull of {r.familiar()} cancelled") from e
    except _NET_ERRORS as e:  # a local failure (disk full), or a network one the code above did not wrap
        raise ImageError(f"pulling {r.familiar()}: {_reason(e)}") from e
    finally:
        client.close()


def pull(store: Store, ref: str, *, platform: str = "linux/amd64", insecure_registries: Collection[str] = (),
         quiet: bool = False, auth_file: Path, out: TextIO = sys.stderr, creds: tuple[str, str] | None = None,
         identity_token: str = "", cancel: threading.Event | None = None,
         progress: _Progress | None = None,
         mirrors: Mapping[str, Sequence[mirrors_mod.Mirror]] | None = None) -> Image:
    """Pull ``ref`` (Docker's short names allowed) into ``store``; returns the committed image.

    ``creds`` (user, password) or ``identity_token``, where given, are this pull's
    credentials (the API's ``X-Registry-Auth``), used instead of those stored in
    ``auth_file`` and kept nowhere. Setting ``cancel`` stops the pull (ImageError).
    ``progress`` (a JsonProgress: the API's stream) replaces the output on ``out``.
    ``mirrors`` ({registry: its mirrors}, mirrors.from_config()) are tried before the registry.
    The whole pull holds the store's writer lock, so garbage collection cannot take
    blobs that belong to no image yet.
    """
    r = reference.parse(ref)
    want = parse_platform(platform)
    if "@" not in ref and ":" not in ref.rpartition("/")[2] and not quiet and progress is None:
        print("Using default tag: latest", file=out, flush=True)
    if progress is None:
        progress = _Progress(out, quiet)
    try:
        sources = mirrors_mod.for_domain(mirrors or {}, r.domain)
        for n, mirror in enumerate(sources):
            mirror_client = _MirrorClient(mirror, r.path, auth.get(auth_file, mirror.host), r.familiar_name,
                                          _Linked(cancel))
            try:
                return _pull_from(store, mirror_client, r, want, progress)
            except ImageError as e:
                if cancel is not None and cancel.is_set():
                    raise
                progress.close()
                then = f"mirror {sources[n + 1]}" if n + 1 < len(sources) else r.api_host
                notice = f"Mirror {mirror} failed, pulling from {then} instead: {e}"
                if progress.quiet and not isinstance(progress, JsonProgress):
                    LOG.warning("%s", inert(notice))
                else:
                    progress.line(notice)
        if creds is None and not identity_token:
            creds = auth.get(auth_file, r.domain)
        client = _Client(r.api_host, r.path, insecure_registries, creds, r.familiar_name,
                         identity_token=identity_token, abort=cancel)
        return _pull_from(store, client, r, want, progress)
    finally:
        progress.close()


def login(server: str, username: str, password: str, *, insecure_registries: Collection[str] = (),
          auth_file: Path) -> None:
    """Check the credentials against ``server``'s registry, and only then store them."""
    check_login(server, username, password, insecure_registries=insecure_registries)
    auth.save(auth_file, server, username, password)


def check_login(server: str, username: str, password: str, *, insecure_registries: Collection[str] = ()) -> None:
    """Whether ``server``'s registry takes the credentials (an ImageError if not); nothing stored."""
    if not username or not password:
        raise UsageError("login needs a username and a password")
    host = auth.server_host(server)
    api = reference.DOCKER_HUB_API if auth.server_key(host) == auth.DOCKER_HUB_KEY else host
    client = _Client(api, None, insecure_registries, (username, password))
    try:
        client.retry(lambda: client.get("", f"login to {api}").close())
    finally:
        client.close()


def logout(server: str, *, auth_file: Path) -> bool:
    """Forget the credentials for ``server``; False if there were none."""
    return auth.erase(auth_file, server)


# --- what the upload side (vmrt/images/push.py) shares with pulls ------------------------------
# public names for the pull client's machinery, so a push authenticates, retries, words errors
# and bounds what it reads exactly as a pull does
Client = _Client
Transient = _Transient
Aborted = _Aborted
NET_ERRORS = _NET_ERRORS
reason = _reason
error_detail = _error_detail
