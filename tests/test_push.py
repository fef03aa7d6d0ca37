"""`vmrt push` and `docker push` through the API against a real registry (Debian's docker-registry
2.8 on loopback, tests/registry.py) with each auth mode: the image pulled back has the pushed
digests; a second push finds the layers there; a layer another repository of the registry has is
mounted; big blobs go in chunks; a push killed midway and run again finishes (its chunked upload
continued where the registry has it); bad credentials are one line and exit 1.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from ocibuild import OciLayout, big_layer
from registry import Registry, StubHandler, StubServer
from support import Vmrt, one_line_error
from test_api import DOCKER, Api, api  # api: the fixture, registered here

from vmrt.errors import ImageError
from vmrt.images import auth, push
from vmrt.images import registry as client
from vmrt.images.store import Store

assert api  # imported for pytest to find

DIGEST_LINE = re.compile(r"^(\S+): digest: (sha256:[0-9a-f]{64}) size: (\d+)$", re.M)


@pytest.fixture(scope="module")
def regs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Registry]]:
    base = tmp_path_factory.mktemp("push-regs")
    with Registry(base / "none") as none, Registry(base / "basic", "basic", password="b4sic-Push-1") as basic, \
            Registry(base / "token", "token", password="t0ken-Push-2") as token:
        yield {"none": none, "basic": basic, "token": token}


def _env(reg: Registry, tmp: Path, **extra: str) -> dict[str, str]:
    return {"VMRT_INSECURE_REGISTRIES": reg.host, "REGISTRY_AUTH_FILE": str(tmp / "auth.json"), **extra}


def _login(vmrt: Vmrt, reg: Registry, tmp: Path, password: str | None = None) -> None:
    if reg.auth != "none":
        r = vmrt("login", "-u", reg.user, "--password-stdin", reg.host, input=(password or reg.password).encode(),
                 env=_env(reg, tmp))
        assert r.returncode == 0, r.stderr


def _push(vmrt: Vmrt, reg: Registry, tmp: Path, ref: str, *args: str, **env: str) -> tuple[str, str, int]:
    """`vmrt push REF` (the busybox image tagged REF first); (output, digest, size)."""
    assert vmrt("tag", "busybox", ref).returncode == 0
    r = vmrt("push", *args, ref, env=_env(reg, tmp, **env))
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    m = DIGEST_LINE.search(out)
    assert m and m[1] == ref.rpartition(":")[2], out
    return out, m[2], int(m[3])


def _pull_back(reg: Registry, tmp: Path, name: str) -> tuple[str, str]:
    """Pull reg's NAME into a fresh store; (manifest digest, image id)."""
    store = Store(tmp / f"pulled-{name.replace('/', '-')}")
    try:
        img = client.pull(store, f"{reg.host}/{name}", insecure_registries=[reg.host], out=io.StringIO(),
                          auth_file=tmp / "auth.json")
        return img.manifest_digest, img.id
    finally:
        store.close()


def _busybox(vmrt: Vmrt) -> tuple[str, str]:
    """(manifest digest, id) of the store's busybox."""
    doc = json.loads(vmrt("image", "inspect", "busybox").stdout)[0]
    store = Store(vmrt.root)
    try:
        return store.get("busybox").manifest_digest, doc["Id"]
    finally:
        store.close()


@pytest.mark.parametrize("mode", ["none", "basic", "token"])
def test_push_and_pull_back_with_each_auth_mode(vmrt: Vmrt, regs: dict[str, Registry], tmp_path: Path,
                                                mode: str) -> None:
    """The stored manifest and blobs go as they are: the image pulled back has the same manifest
    digest and ID; a second push finds the layer there; -q prints the reference; the manifest is
    also there by its digest, and the image records it as a repo digest."""
    reg = regs[mode]
    _login(vmrt, reg, tmp_path)
    ref = f"{reg.host}/{mode}/busybox:1"
    out, digest, size = _push(vmrt, reg, tmp_path, ref)
    assert out.startswith(f"The push refers to repository [{reg.host}/{mode}/busybox]\n"), out
    assert ": Preparing\n" in out and ": Pushed\n" in out, out
    manifest_digest, image_id = _busybox(vmrt)
    assert digest == manifest_digest
    assert _pull_back(reg, tmp_path, f"{mode}/busybox:1") == (manifest_digest, image_id)
    out, again, _ = _push(vmrt, reg, tmp_path, ref)
    assert again == digest and ": Layer already exists\n" in out and "Pushed" not in out, out
    r = vmrt("push", "-q", ref, env=_env(reg, tmp_path))
    assert (r.returncode, r.stdout.decode()) == (0, f"{ref}\n"), r.stderr
    assert vmrt("tag", "busybox", f"{reg.host}/{mode}/busybox").returncode == 0
    r = vmrt("push", f"{reg.host}/{mode}/busybox", env=_env(reg, tmp_path))
    assert r.returncode == 0 and r.stdout.decode().startswith("Using default tag: latest\n"), r
    resp = reg.session().get(f"{reg.url}/v2/{mode}/busybox/manifests/{digest}",
                             headers={"Accept": "application/vnd.oci.image.manifest.v1+json, "
                                                "application/vnd.docker.distribution.manifest.v2+json"}, timeout=10)
    assert resp.status_code == 200 and len(resp.content) == size
    rds = json.loads(vmrt("image", "inspect", "-f", "{{json .RepoDigests}}", "busybox").stdout)
    assert f"{reg.host}/{mode}/busybox@{digest}" in rds
    if mode == "none":  # by digest: the manifest PUT by its digest, no tag
        r = vmrt("push", f"{reg.host}/bydigest/busybox@{digest}", env=_env(reg, tmp_path))
        assert r.returncode == 0 and f"{digest}: digest: {digest} size: {size}\n" in r.stdout.decode(), r
        assert _pull_back(reg, tmp_path, f"bydigest/busybox@{digest}")[0] == digest
    if mode == "token":
        assert reg.token_server is not None
        assert any(f"repository:{mode}/busybox:pull,push" in q["scopes"] for q in reg.token_server.requests)


def test_cross_repository_mount(vmrt: Vmrt, regs: dict[str, Registry], tmp_path: Path) -> None:
    """A layer the registry has in another repository the image came from is mounted, not sent
    (with token auth: the token asks pull on the source too)."""
    reg = regs["token"]
    _login(vmrt, reg, tmp_path)
    _, digest, _ = _push(vmrt, reg, tmp_path, f"{reg.host}/mount/src:1")
    out, again, _ = _push(vmrt, reg, tmp_path, f"{reg.host}/mount/dst:1")
    assert again == digest and ": Mounted from mount/src\n" in out and "Pushed" not in out, out
    assert reg.token_server is not None
    assert any("repository:mount/src:pull" in q["scopes"] and "repository:mount/dst:pull,push" in q["scopes"]
               for q in reg.token_server.requests)
    assert _pull_back(reg, tmp_path, "mount/dst:1")[0] == digest


def test_a_refused_mount_falls_back_to_an_upload(vmrt: Vmrt, tmp_path: Path) -> None:
    """The registry no longer has the layer in the source repository: the mount is answered with an
    upload session (202), and the layer goes up through it."""
    with Registry(tmp_path / "reg") as reg:
        _, digest, _ = _push(vmrt, reg, tmp_path, f"{reg.host}/gone/src:1")
        shutil.rmtree(reg.storage / "docker/registry/v2/repositories/gone/src/_layers")
        out, again, _ = _push(vmrt, reg, tmp_path, f"{reg.host}/gone/dst:1")
        assert again == digest and ": Pushed\n" in out and "Mounted" not in out, out
        log = reg.log.read_text()
        assert re.search(r'"POST /v2/gone/dst/blobs/uploads/\?mount=sha256%3A[0-9a-f]{64}&from=gone%2Fsrc '
                         r'HTTP/1.1" 202', log), log[-3000:]
        assert _pull_back(reg, tmp_path, "gone/dst:1")[0] == digest


def test_chunked_upload(vmrt: Vmrt, tmp_path: Path) -> None:
    """Blobs larger than the chunk size go in PATCH chunks, then the PUT; the image pulls back whole."""
    with Registry(tmp_path / "reg") as reg:
        out, digest, _ = _push(vmrt, reg, tmp_path, f"{reg.host}/chunked:1", VMRT_PUSH_CHUNK_SIZE="65536")
        assert ": Pushed\n" in out
        assert reg.log.read_text().count('"PATCH /v2/chunked/blobs/uploads/') > 4
        assert _pull_back(reg, tmp_path, "chunked:1")[0] == digest == _busybox(vmrt)[0]
    assert not any((vmrt.root / "push-uploads").iterdir())


def test_push_killed_midway_then_resumed(vmrt: Vmrt, tmp_path: Path) -> None:
    """`vmrt push` SIGKILLed after its small layer, in its big one's chunked upload: run again, the
    small layer is there and the big one's upload session goes on from where the registry has it."""
    layout = OciLayout(tmp_path / "layout")
    # a small first layer, done while the big second one is still going up (they go in parallel)
    layout.add_image([big_layer(128 << 10, 1, "a.bin"), big_layer(4 << 20, 2, "b.bin")], {"Cmd": ["/x"]})
    with Registry(tmp_path / "src") as src, Registry(tmp_path / "dst") as dst:
        src.push(layout.ref("latest"), "two")
        env = _env(src, tmp_path, VMRT_INSECURE_REGISTRIES=f"{src.host},{dst.host}", VMRT_PUSH_CHUNK_SIZE="16384")
        assert vmrt("pull", f"{src.host}/two", env=env).returncode == 0
        ref = f"{dst.host}/two:1"
        assert vmrt("tag", f"{src.host}/two", ref).returncode == 0
        proc = vmrt.popen("push", ref, env=env)
        lines: list[str] = []
        stdout = proc.stdout
        assert stdout is not None

        def read() -> None:
            for ln in iter(stdout.readline, b""):
                lines.append(ln.decode())
        reader = threading.Thread(target=read)
        reader.start()
        states = vmrt.root / "push-uploads"
        deadline = time.monotonic() + 60

        def offset() -> int:  # the second layer's upload so far, as the push records it
            if not any(": Pushed" in ln for ln in lines) or not states.is_dir():
                return 0
            try:
                return max((json.loads(f.read_text())["offset"] for f in states.iterdir()), default=0)
            except (OSError, ValueError, KeyError):  # being replaced
                return 0
        while offset() < (1 << 20):
            assert proc.poll() is None and time.monotonic() < deadline, (lines, proc.stderr and proc.stderr.read())
            time.sleep(0.01)
        # killed where the registry holds what the push recorded: distribution refuses a session whose
        # recorded offset is one PATCH behind (the push then starts that blob again, as Docker does)
        uploads = dst.storage / "docker/registry/v2/repositories/two/_uploads"
        for attempt in range(50):
            proc.send_signal(signal.SIGSTOP)
            time.sleep(0.2)  # a PATCH already sent lands
            done = offset()
            if done in [p.stat().st_size for p in uploads.glob("*/data")]:
                break
            proc.send_signal(signal.SIGCONT)
            time.sleep(0.002 * (attempt % 5))
        else:
            pytest.fail("the push never stopped between two chunks")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reader.join(10)
        assert sum(": Pushed" in ln for ln in lines) == 1, lines
        before = dst.log.read_text().count('"PATCH /v2/two/blobs/uploads/')
        r = vmrt("push", ref, env=env)
        assert r.returncode == 0, r.stderr
        out = r.stdout.decode()
        assert out.count(": Layer already exists\n") == 1 and out.count(": Pushed\n") == 1, out
        log = dst.log.read_text()
        assert re.search(r'"GET /v2/two/blobs/uploads/[0-9a-f-]+\?', log), "the session was not asked where it stood"
        left = ((4 << 20) + 4096 - done) // 16384 + 2  # the blob is a little over 4 MiB (its tar and gzip)
        assert 0 < log.count('"PATCH /v2/two/blobs/uploads/') - before <= left, "not resumed"
        m = DIGEST_LINE.search(out)
        assert m
        store = Store(vmrt.root)
        try:
            assert m[2] == store.get(ref).manifest_digest
        finally:
            store.close()
        assert _pull_back(dst, tmp_path, "two:1")[0] == m[2]
    assert not any(states.iterdir())


def test_bad_credentials_are_one_line_and_exit_1(vmrt: Vmrt, regs: dict[str, Registry], tmp_path: Path) -> None:
    basic, token = regs["basic"], regs["token"]
    assert vmrt("tag", "busybox", f"{basic.host}/denied:1").returncode == 0
    r = vmrt("push", f"{basic.host}/denied:1", env=_env(basic, tmp_path))
    assert r.returncode == 1 and "no basic auth credentials" in one_line_error(r.stderr), r.stderr
    for reg in (basic, token):
        auth_file = tmp_path / "auth.json"
        auth_file.write_text(json.dumps({"auths": {reg.host: {
            "auth": base64.b64encode(f"{reg.user}:not-it".encode()).decode()}}}))
        assert vmrt("tag", "busybox", f"{reg.host}/denied:1").returncode == 0
        r = vmrt("push", f"{reg.host}/denied:1", env=_env(reg, tmp_path))
        assert r.returncode == 1 and "incorrect username or password" in one_line_error(r.stderr), r.stderr
    r = vmrt("push", f"{basic.host}/never-tagged:1", env=_env(basic, tmp_path))
    assert r.returncode == 1 and "does not exist locally" in one_line_error(r.stderr), r.stderr


def test_docker_push_through_the_api(vmrt: Vmrt, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest,
                                     regs: dict[str, Registry], tmp_path: Path) -> None:
    """`docker --config DIR push` with a login in DIR/config.json (sent as X-Registry-Auth, for this
    push only): Docker's progress and digest line; the JSON stream ends in aux {Tag, Digest, Size};
    without credentials it fails in one line."""
    reg = regs["token"]
    monkeypatch.setitem(vmrt.env, "VMRT_INSECURE_REGISTRIES", reg.host)
    api_: Api = request.getfixturevalue("api")
    config = api_.home / "cfg"
    config.mkdir()
    (config / "config.json").write_text(json.dumps({"auths": {reg.host: {
        "auth": base64.b64encode(f"{reg.user}:{reg.password}".encode()).decode()}}}))
    ref = f"{reg.host}/api/busybox:2"
    assert api_.docker("tag", "busybox", ref).returncode == 0
    r = api_.docker("--config", str(config), "push", ref)
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr
    assert f"The push refers to repository [{reg.host}/api/busybox]" in out, out
    assert ": Pushed" in out or ": Mounted from " in out or ": Layer already exists" in out, out
    m = DIGEST_LINE.search(out)
    assert m and m[1] == "2" and m[2] == _busybox(vmrt)[0], out
    r = api_.docker("--config", str(config), "push", ref)
    assert r.returncode == 0 and b": Layer already exists" in r.stdout, r
    r = subprocess.run([DOCKER, "-H", f"unix://{api_.sock}", "--config", str(tmp_path), "push", ref],
                       capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and len(r.stderr.decode().strip().splitlines()) == 1, r
    assert b"authentication required" in r.stderr, r.stderr
    creds = base64.urlsafe_b64encode(json.dumps({"username": reg.user, "password": reg.password,
                                                 "serveraddress": reg.host}).encode()).decode()
    status, _, body = api_.request("POST", f"/images/{reg.host}/api/busybox/push?tag=2",
                                  headers={"X-Registry-Auth": creds})
    messages = [json.loads(line) for line in body.splitlines() if line.strip()]
    assert status == 200 and messages[-1]["aux"] == {"Tag": "2", "Digest": m[2], "Size": int(m[3])}, messages
    status, _, _ = api_.request("POST", f"/images/{reg.host}/api/nothere/push?tag=2")
    assert status == 404
    assert not os.path.exists(vmrt.root / "auth.json")


# --- a hostile registry --------------------------------------------------------------------------

class Hostile(StubServer):
    """A registry that asks for Basic credentials, then lies: upload Locations on another origin
    (`location`), blob and manifest digests it did not get (`claim`), and a huge error body."""

    def __init__(self) -> None:
        self.location, self.claim = "", ""
        self.seen: list[tuple[str, str, str]] = []  # method, path, Authorization
        super().__init__()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(StubHandler):

            def handle_one(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                auth = self.headers.get("Authorization", "")
                stub.seen.append((self.command, self.path, auth))
                if not auth:
                    return self.reply(401, b"{}", {"WWW-Authenticate": 'Basic realm="hostile"'})
                path = self.path.partition("?")[0]
                if self.command == "HEAD":
                    return self.reply(404)
                if self.command == "POST":
                    return self.reply(202, b"", {"Location": stub.location or "/v2/evil/blobs/uploads/u1"})
                if self.command == "PUT" and stub.claim:
                    return self.reply(201, b"", {"Docker-Content-Digest": stub.claim})
                if self.command == "PUT" and "/manifests/" in path:
                    return self.reply(400, b'{"errors":[{"code":"DENIED","message":"' + b"x" * (8 << 20) + b'"}]}')
                if self.command == "PUT":
                    return self.reply(201)
                return self.reply(200, b"{}")

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = handle_one

        return Handler


def test_a_hostile_registry_gets_no_credentials_elsewhere_and_its_lies_fail_the_push(
        vmrt: Vmrt, tmp_path: Path) -> None:
    """Upload Locations on another origin over plain HTTP are refused (and nothing, credentials
    least of all, is sent there); a blob or manifest digest the registry claims but was not sent
    fails the push; a huge error body is read only to a bound."""
    hostile, elsewhere = Hostile(), Hostile()
    auth.save(tmp_path / "auth.json", hostile.host, "user", "Secret-Hostile-3")
    store = Store(vmrt.root)

    def attempt() -> str:
        store.tag(f"{hostile.host}/evil:1", "busybox")
        with pytest.raises(ImageError) as e:
            push.push(store, f"{hostile.host}/evil:1", insecure_registries=[hostile.host],
                      auth_file=tmp_path / "auth.json", out=io.StringIO())
        return str(e.value)
    try:
        hostile.location = f"http://{elsewhere.host}/v2/evil/blobs/uploads/u1"
        assert "refused" in attempt()
        assert elsewhere.seen == []
        assert any(a.startswith("Basic ") for _, _, a in hostile.seen)  # the registry itself got them
        hostile.location = ""
        hostile.claim = "sha256:" + "0" * 64
        assert f"as {hostile.claim}" in attempt()
        hostile.claim = ""
        message = attempt()
        assert "manifest 1: registry" in message and len(message) < (128 << 10), message[:300]
    finally:
        store.close()
        hostile.close()
        elsewhere.close()


def test_a_client_leaving_mid_push_cancels_it(vmrt: Vmrt, monkeypatch: pytest.MonkeyPatch,
                                              request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """A client that closes its connection while its push sends chunks: the uploads stop, no
    manifest is put, and the service answers on (a later push of it goes through)."""
    layout = OciLayout(tmp_path / "layout")
    layout.add_image([big_layer(4 << 20, 9)], {"Cmd": ["/x"]}, ref="1")
    with Registry(tmp_path / "src") as src, Registry(tmp_path / "dst") as dst:
        src.push(layout.ref("1"), "big", "1")
        monkeypatch.setitem(vmrt.env, "VMRT_INSECURE_REGISTRIES", f"{src.host},{dst.host}")
        monkeypatch.setitem(vmrt.env, "VMRT_PUSH_CHUNK_SIZE", "16384")
        api_: Api = request.getfixturevalue("api")
        assert api_.docker("pull", f"{src.host}/big:1").returncode == 0
        assert api_.docker("tag", f"{src.host}/big:1", f"{dst.host}/big:1").returncode == 0
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        s.connect(str(api_.sock))
        s.sendall(f"POST /v1.43/images/{dst.host}/big/push?tag=1 HTTP/1.1\r\nHost: x\r\n"
                  "Content-Length: 0\r\n\r\n".encode())
        got = b""
        while b'"Pushing"' not in got:  # Docker's progress: the bytes so far of the layer's total
            data = s.recv(4096)
            assert data, got
            got += data
        s.close()

        def patches() -> int:
            return dst.log.read_text().count('"PATCH /v2/big/blobs/uploads/')
        time.sleep(1)
        before = patches()
        time.sleep(1)
        assert patches() == before, "the upload went on after the client left"
        assert before < (4 << 20) // 16384
        assert "/v2/big/manifests/1" not in dst.log.read_text()
        assert api_.request("GET", "/_ping")[0] == 200
        r = api_.docker("push", f"{dst.host}/big:1")
        assert r.returncode == 0 and b"1: digest: sha256:" in r.stdout, r
        assert api_.v("rmi", f"{dst.host}/big:1", f"{src.host}/big:1").returncode == 0
