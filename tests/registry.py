"""A real OCI distribution registry on 127.0.0.1 for client tests: Debian's docker-registry 2.8.

`Registry` runs `docker-registry serve` on a free loopback port with one of three auth modes:
none, basic (bcrypt htpasswd) or token (a real Docker bearer-token flow: `TokenServer` below issues
RS256 JWTs signed with an openssl-made key whose self-signed cert the registry trusts). `skopeo_copy`
pushes images built by tests/ocibuild.py. Everything stays on loopback; `stop()` reaps the process,
and live registries are also stopped at interpreter exit and die with their parent (PDEATHSIG).

Behaviour of distribution 2.8 that client tests run into:
- an OCI manifest or index is 404 MANIFEST_UNKNOWN unless Accept names its exact OCI type (even
  fetched by digest, even with */*); a Docker schema2 manifest fetched by tag without schema2 in
  Accept comes back converted to signed schema1 (a different digest);
- token `exp`/`nbf` are checked with about a minute of leeway, so expiry cannot be tested quickly;
- an anonymous token with an empty access list is answered 401 error="insufficient_scope".
"""

from __future__ import annotations

import atexit
import base64
import ctypes
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import requests

if TYPE_CHECKING:
    from ocibuild import OciLayout

REGISTRY_BIN = "/usr/bin/docker-registry"
SKOPEO = "/usr/bin/skopeo"
SERVICE = "vmrt-test-registry"
ISSUER = "vmrt-test-issuer"
Auth = Literal["none", "basic", "token"]

_live: set[Registry] = set()  # stopped at exit if a test forgot to


def free_port() -> int:
    """A loopback port nothing listens on right now (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL the child when the thread that started it exits (a crashed test run)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --- token server ----------------------------------------------------------------------------

class TokenServer:
    """The Docker registry token protocol (GET /token?service=&scope=, plus the OAuth2 POST form).

    Users presenting the right Basic credentials get every action they ask for; anonymous
    requests get a token with an empty access list, so the registry still answers 401 and a
    client must authenticate. Tokens are RS256 JWTs whose header carries the signing cert in
    "x5c"; distribution verifies that chain against `rootcertbundle` (the same self-signed cert).
    """

    def __init__(self, workdir: Path, user: str, password: str, *, service: str = SERVICE,
                 issuer: str = ISSUER, ttl: int = 300, anonymous_pull: bool = False) -> None:
        self.user, self.password, self.service, self.issuer = user, password, service, issuer
        self.ttl, self.anonymous_pull = ttl, anonymous_pull
        self.key, self.cert = workdir / "token-key.pem", workdir / "token-cert.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "3650",
                        "-subj", "/CN=vmrt test token signer", "-keyout", str(self.key), "-out", str(self.cert)],
                       check=True, capture_output=True)
        pem = self.cert.read_text()
        self._x5c = "".join(pem.split("-----")[2].split())  # the DER cert, standard base64
        self.tokens_issued = 0
        self.requests: list[dict[str, Any]] = []  # one per /token request: user (None: anonymous), scopes
        self.refused = 0  # requests with wrong credentials
        # OAuth2 refresh tokens (Docker's "identitytoken") and the user each stands for
        self.refresh_tokens: dict[str, str] = {}
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.realm = f"http://127.0.0.1:{self.port}/token"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="token-server", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)

    def sign(self, claims: dict[str, Any]) -> str:
        """A compact JWS: RS256 is PKCS#1 v1.5 over SHA-256, which is what `openssl dgst -sign` makes."""
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)], input=signing_input.encode(),
                             check=True, capture_output=True).stdout
        return f"{signing_input}.{_b64url(sig)}"

    def issue(self, subject: str, scopes: Sequence[str]) -> dict[str, Any]:
        """The token response for `subject` ('' for anonymous) asking for `scopes` ('repository:NAME:pull,push')."""
        access = []
        for scope in scopes:
            type_, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            wanted = [a for a in actions.split(",") if a]
            granted = wanted if subject else [a for a in wanted if a == "pull" and self.anonymous_pull]
            if type_ and name and granted:
                access.append({"type": type_, "name": name, "actions": granted})
        now = int(time.time())
        token = self.sign({"iss": self.issuer, "sub": subject, "aud": self.service, "exp": now + self.ttl,
                           "nbf": now - 10, "iat": now, "jti": uuid.uuid4().hex, "access": access})
        with self._lock:
            self.tokens_issued += 1
        issued_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        return {"token": token, "access_token": token, "expires_in": self.ttl, "issued_at": issued_at}

    def _check(self, user: str | None, password: str | None) -> str | None:
        """'' for anonymous, the user for good credentials, None for bad ones."""
        if user is None:
            return ""
        if secrets.compare_digest(user, self.user) and secrets.compare_digest(password or "", self.password):
            return user
        with self._lock:
            self.refused += 1
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
                pass

            def _reply(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if code == 401:
                    self.send_header("WWW-Authenticate", 'Basic realm="vmrt-test-token"')
                self.end_headers()
                self.wfile.write(data)

            def _serve(self, query: dict[str, list[str]], user: str | None, password: str | None) -> None:
                scopes = [s for q in query.get("scope", []) for s in q.split(" ") if s]
                subject = server._check(user, password)
                server.requests.append({"user": user, "scopes": scopes, "method": self.command})
                if subject is None:
                    self._reply(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]})
                else:
                    self._reply(200, server.issue(subject, scopes))

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                if url.path != "/token":
                    return self._reply(404, {})
                user = password = None
                kind, _, value = self.headers.get("Authorization", "").partition(" ")
                if kind.lower() == "basic":
                    user, _, password = base64.b64decode(value).decode().partition(":")
                self._serve(urllib.parse.parse_qs(url.query), user, password)

            def do_POST(self) -> None:  # OAuth2 password and refresh-token grants, as some clients use them
                if urllib.parse.urlsplit(self.path).path != "/token":
                    return self._reply(404, {})
                form = urllib.parse.parse_qs(self.rfile.read(int(self.headers.get("Content-Length", 0))).decode())
                if form.get("grant_type") == ["refresh_token"]:
                    user = server.refresh_tokens.get(form.get("refresh_token", [""])[0])
                    if user is None:
                        return self._reply(401, {"error": "invalid_grant"})
                    return self._serve(form, user, server.password)
                if form.get("grant_type") != ["password"]:
                    return self._reply(400, {"error": "unsupported_grant_type"})
                self._serve(form, form.get("username", [""])[0], form.get("password", [""])[0])

        return Handler


# --- registry --------------------------------------------------------------------------------

class Registry:
    """docker-registry serving `workdir/storage` on 127.0.0.1:<free port>; a context manager.

    Logs (stderr and the access log on stdout) go to `workdir/registry.log`, across restarts.
    `kill()` SIGKILLs it (a registry dying mid-pull); `restart()` brings it back on the same port
    with the same storage.
    """

    def __init__(self, workdir: Path, auth: Auth = "none", user: str = "vmrt", password: str = "s3cret", *,
                 anonymous_pull: bool = False, token_ttl: int = 300) -> None:
        self.workdir, self.auth, self.user, self.password = Path(workdir), auth, user, password
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage = self.workdir / "storage"
        self.log = self.workdir / "registry.log"
        self.config = self.workdir / "config.yml"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.token_server: TokenServer | None = None
        self._auth_config: dict[str, Any] = {}
        if auth == "basic":
            htpasswd = self.workdir / "htpasswd"
            out = subprocess.run(["htpasswd", "-Bbn", user, password], check=True, capture_output=True).stdout
            htpasswd.write_bytes(out.strip() + b"\n")  # bcrypt: the only hash distribution accepts
            self._auth_config = {"htpasswd": {"realm": "vmrt-test", "path": str(htpasswd)}}
        elif auth == "token":
            self.token_server = TokenServer(self.workdir, user, password, ttl=token_ttl, anonymous_pull=anonymous_pull)
            self._auth_config = {"token": {"realm": self.token_server.realm, "service": SERVICE, "issuer": ISSUER,
                                           "rootcertbundle": str(self.token_server.cert)}}
        elif auth != "none":
            raise ValueError(f"auth must be none, basic or token, not {auth!r}")

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def creds(self) -> str | None:
        """USER:PASSWORD for skopeo's --*-creds, or None for an open registry."""
        return None if self.auth == "none" else f"{self.user}:{self.password}"

    @property
    def tokens_issued(self) -> int:
        return self.token_server.tokens_issued if self.token_server else 0

    def ref(self, name: str, tag: str = "latest") -> str:
        """skopeo's name for NAME:TAG here (TAG may be 'sha256:...', giving NAME@DIGEST)."""
        return f"docker://{self.host}/{name}@{tag}" if tag.startswith("sha256:") else f"docker://{self.host}/{name}:{tag}"

    def _write_config(self) -> None:
        # YAML is a superset of JSON, so the config is written as JSON: no YAML library needed.
        config = {
            "version": "0.1",
            "log": {"level": "warn", "formatter": "text", "fields": {"service": "registry"}},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)}, "delete": {"enabled": True},
                        "maintenance": {"uploadpurging": {"enabled": False}}},
            "http": {"addr": self.host, "secret": "vmrt-test-secret"},
        }
        if self._auth_config:
            config["auth"] = self._auth_config
        self.config.write_text(json.dumps(config, indent=1))

    def start(self, timeout: float = 15.0) -> Registry:
        """Start docker-registry and wait until /v2/ answers (200, or 401 with auth). Idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        for attempt in range(3):
            self._write_config()
            env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}  # no config overrides
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(self.config)], stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=log, env=env, start_new_session=True,
                                             preexec_fn=_die_with_parent)
            _live.add(self)
            try:
                self._wait_ready(timeout)
                return self
            except RuntimeError:
                self.stop()
                if "address already in use" not in self.log_tail() or attempt == 2:
                    raise
                self.port = free_port()  # someone took the port between free_port() and the bind
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/v2/", timeout=1).status_code in (200, 401):
                    return
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry not answering on {self.url} after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; always reaps. The storage stays for a restart()."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def kill(self) -> None:
        """SIGKILL now, as a crash would (connections in flight are cut); reaped."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()
        self.proc = None

    def restart(self) -> Registry:
        """Stop (if running) and start again on the same port with the same storage."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """stop() and shut the token server down."""
        self.stop()
        if self.token_server is not None:
            self.token_server.close()
            self.token_server = None
        _live.discard(self)

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- direct access, for tests that need what skopeo would not push --------------------------

    def blob_path(self, digest: str) -> Path:
        """Where the filesystem driver keeps a blob's bytes (to corrupt or delete it under a client)."""
        algo, _, hex_ = digest.partition(":")
        return self.storage / "docker/registry/v2/blobs" / algo / hex_[:2] / hex_ / "data"

    def session(self) -> requests.Session:
        """A requests session that answers this registry's Basic or Bearer challenges with our creds."""
        s = requests.Session()
        if self.auth != "none":
            s.auth = ChallengeAuth(self.user, self.password)
        return s

    def put_blob(self, name: str, data: bytes, session: requests.Session | None = None) -> str:
        """Monolithic upload (POST then PUT ?digest=); returns the digest."""
        s = session or self.session()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        r = s.post(f"{self.url}/v2/{name}/blobs/uploads/", timeout=30)
        r.raise_for_status()
        location = urllib.parse.urljoin(self.url, r.headers["Location"])
        r = s.put(location, params={"digest": digest}, data=data,
                  headers={"Content-Type": "application/octet-stream"}, timeout=60)
        r.raise_for_status()
        return digest

    def put_manifest(self, name: str, ref: str, body: bytes | dict[str, Any], media_type: str | None = None,
                     session: requests.Session | None = None) -> str:
        """PUT a manifest (bytes as-is, or a dict as JSON) under tag or digest `ref`; returns its digest."""
        if isinstance(body, dict):
            media_type = media_type or body["mediaType"]
            body = json.dumps(body).encode()
        r = (session or self.session()).put(f"{self.url}/v2/{name}/manifests/{ref}", data=body,
                                            headers={"Content-Type": media_type or ""}, timeout=30)
        if not r.ok:
            raise RuntimeError(f"PUT manifest {name}:{ref}: {r.status_code} {r.text}")
        return r.headers.get("Docker-Content-Digest") or "sha256:" + hashlib.sha256(body).hexdigest()

    def upload(self, layout: OciLayout, ref: str, name: str, tag: str | None = None) -> str:
        """Push tag `ref` of an OciLayout over the HTTP API ourselves, bytes and media types exactly as
        in the layout (no skopeo checks or conversions): blobs, then list instances, then the top
        manifest as NAME:TAG (default: `ref`). Returns the top manifest's digest."""
        s = self.session()

        def push_manifest(desc: dict[str, Any], target: str) -> str:
            m = layout.manifest(desc["digest"])
            for child in m.get("manifests", []):
                push_manifest(child, child["digest"])
            for blob in [m["config"], *m["layers"]] if "config" in m else []:
                if s.head(f"{self.url}/v2/{name}/blobs/{blob['digest']}", timeout=10).status_code != 200:
                    self.put_blob(name, layout.blob_path(blob["digest"]).read_bytes(), s)
            return self.put_manifest(name, target, layout.blob_path(desc["digest"]).read_bytes(),
                                     desc["mediaType"], s)

        return push_manifest(layout.descriptor(ref), tag or ref)

    def push(self, src: str, name: str, tag: str = "latest", *, all_images: bool = False,
             extra: Sequence[str] = ()) -> None:
        """skopeo copy SRC (e.g. OciLayout.ref('latest')) to NAME:TAG here, digests preserved."""
        skopeo_copy(str(src), self.ref(name, tag), creds=self.creds, all_images=all_images,
                    extra=["--preserve-digests", *extra])


class ChallengeAuth(requests.auth.AuthBase):
    """Answer a 401 once: Basic with the creds, or Bearer by fetching a token from the challenge's realm."""

    def __init__(self, user: str, password: str) -> None:
        self.user, self.password = user, password

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.register_hook("response", self._on_response)
        return r

    def _on_response(self, resp: requests.Response, **kw: Any) -> requests.Response:
        if resp.status_code != 401 or resp.request.headers.get("Authorization"):
            return resp
        scheme, _, params = resp.headers.get("WWW-Authenticate", "").partition(" ")
        req = resp.request.copy()
        if scheme.lower() == "basic":
            req.prepare_auth((self.user, self.password))
        elif scheme.lower() == "bearer":
            fields = parse_challenge(params)
            query = {k: v for k, v in fields.items() if k in ("service", "scope")}
            token = requests.get(fields["realm"], params=query, auth=(self.user, self.password), timeout=10)
            token.raise_for_status()
            req.headers["Authorization"] = "Bearer " + token.json()["token"]
        else:
            return resp
        if req.body is not None and hasattr(req.body, "seek"):
            req.body.seek(0)
        resp.content  # noqa: B018 - drain the 401 so the connection can be reused
        resp.close()
        new = resp.connection.send(req, **kw)
        new.history.append(resp)
        return new


def parse_challenge(params: str) -> dict[str, str]:
    """'realm="x",service="y",scope="repository:a:pull,push"' -> dict (commas inside quotes kept)."""
    out: dict[str, str] = {}
    key, val, quoted, buf = "", "", False, ""
    for ch in params + ",":
        if ch == '"':
            quoted = not quoted
        elif ch == "=" and not quoted and not key:
            key, buf = buf.strip(), ""
        elif ch == "," and not quoted:
            val, buf = buf, ""
            if key:
                out[key] = val
            key = ""
        else:
            buf += ch
    return out


# --- skopeo ----------------------------------------------------------------------------------

def skopeo_copy(src: str, dest: str, *, creds: str | None = None, all_images: bool = False,
                extra: Sequence[str] = (), timeout: float = 120) -> None:
    """`skopeo copy SRC DEST` with plain HTTP (and `creds` or no creds at all) for docker:// ends."""
    args = [SKOPEO, "copy", "--insecure-policy", "--quiet"]
    for side, ref in (("src", src), ("dest", dest)):
        if ref.startswith("docker://"):
            args += [f"--{side}-tls-verify=false", f"--{side}-creds={creds}" if creds else f"--{side}-no-creds"]
    if all_images:
        args.append("--all")
    _skopeo([*args, *extra, src, dest], timeout)


def skopeo_inspect(ref: str, *, creds: str | None = None, raw: bool = False, config: bool = False,
                   timeout: float = 60) -> dict[str, Any]:
    """`skopeo inspect` of a docker:// ref over plain HTTP, parsed (raw: the manifest as stored)."""
    args = [SKOPEO, "inspect", "--tls-verify=false", f"--creds={creds}" if creds else "--no-creds"]
    args += ["--raw"] if raw else []
    args += ["--config"] if config else []
    return dict(json.loads(_skopeo([*args, ref], timeout)))


def _skopeo(args: list[str], timeout: float) -> str:
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise SkopeoError(f"{' '.join(args[1:])} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


class SkopeoError(RuntimeError):
    pass


@atexit.register
def _stop_all() -> None:
    for reg in list(_live):
        reg.close()


# --- a stub server of a test's own ----------------------------------------------------------------

class StubServer:
    """An HTTP/1.1 server on 127.0.0.1 (a free port) for a test's own registry stub: subclasses
    set their state, then call ``super().__init__()``, and return their handler class from
    ``_handler()`` (a ``StubHandler``); ``close()`` stops it."""

    def __init__(self) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        raise NotImplementedError


class StubHandler(BaseHTTPRequestHandler):
    """Quiet, keep-alive, and ``reply`` (no body to a HEAD)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    def reply(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
