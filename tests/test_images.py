"""The image store and layer unpacking, against real tar archives."""

from __future__ import annotations

import io
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest
from support import Vmrt, one_line_error

from vmrt import config
from vmrt.errors import ImageError, UsageError
from vmrt.images import bootstrap, reference, unpack
from vmrt.images.recipe import build
from vmrt.images.store import Store

REPO = Path(__file__).resolve().parent.parent


def _tar(entries: list[tarfile.TarInfo], data: dict[str, bytes] | None = None) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for ti in entries:
            payload = (data or {}).get(ti.name)
            if payload is not None:
                ti.size = len(payload)
            tf.addfile(ti, io.BytesIO(payload) if payload is not None else None)
    buf.seek(0)
    return buf


def _entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.mode = kind, link, 0o755 if kind == tarfile.DIRTYPE else 0o644
    return ti


@pytest.mark.root  # the entry's owner (root) is set with lchown
def test_parents_a_layer_leaves_out_are_0755(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    dest.mkdir()
    old = os.umask(0o077)  # vmrt's own umask
    try:
        unpack.extract(_tar([_entry("usr/lib/x/f")], {"usr/lib/x/f": b"x"}), dest)
    finally:
        os.umask(old)
    for d in ("usr", "usr/lib", "usr/lib/x"):
        assert stat.S_IMODE((dest / d).stat().st_mode) == 0o755, d
    assert (dest / "usr/lib/x/f").read_bytes() == b"x"


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "/etc/evil"])
def test_escaping_names_are_refused(tmp_path: Path, name: str) -> None:
    dest = tmp_path / "root"
    dest.mkdir()
    with pytest.raises(ImageError):
        unpack.extract(_tar([_entry(name)], {name: b"x"}), dest)
    assert not (tmp_path / "evil").exists()


def test_symlink_climbing_out_is_refused(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    dest.mkdir()
    with pytest.raises(ImageError, match="outside"):
        unpack.extract(_tar([_entry("link", tarfile.SYMTYPE, "../../outside")]), dest)


@pytest.mark.root
def test_writes_through_absolute_symlink_are_refused(tmp_path: Path) -> None:
    dest, outside = tmp_path / "root", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    # "etc" -> host-absolute path: extracted naively, etc/passwd would land on the host
    layer = _tar([_entry("etc", tarfile.SYMTYPE, str(outside)), _entry("etc/passwd")], {"etc/passwd": b"x"})
    with pytest.raises(ImageError, match="passes through symlink 'etc'"):
        unpack.extract(layer, dest)
    assert list(outside.iterdir()) == []
    assert not (dest / str(outside).lstrip("/")).exists()


def test_absolute_symlinks_still_resolve_inside_for_lookups(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "link").symlink_to("/etc")
    assert unpack.resolve_in_root(str(tmp_path), "link/passwd") == str(tmp_path / "etc" / "passwd")


@pytest.mark.root
def test_whiteouts_become_overlay_whiteouts(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    dest.mkdir()
    unpack.extract(_tar([_entry("d", tarfile.DIRTYPE), _entry("d/.wh.gone"), _entry("d/.wh..wh..opq")]), dest)
    st = os.lstat(dest / "d" / "gone")
    assert os.major(st.st_rdev) == 0 and os.minor(st.st_rdev) == 0
    assert os.getxattr(dest / "d", "trusted.overlay.opaque") == b"y"


@pytest.mark.root
def test_recipe_builds_a_real_oci_image(tmp_path: Path) -> None:
    store = Store(tmp_path)
    ref = build(REPO / "images" / "busybox", store)
    assert ref == "busybox:latest"
    img = store.get("busybox")
    assert img.manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert img.runtime_config["Cmd"] == ["sh"]
    # blobs are content addressed
    for desc in [img.manifest["config"], *img.layers]:
        assert store.read_blob(desc["digest"])
    (layer,) = img.layer_dirs()
    assert (layer / "bin" / "busybox").stat().st_mode & 0o111  # (the store is noexec: mode bits, not access)
    assert os.readlink(layer / "bin" / "sh") == "/bin/busybox"
    assert (tmp_path / "images" / "oci-layout").is_file()
    # rebuilding is deterministic
    assert build(REPO / "images" / "busybox", store) == ref
    assert store.get("busybox").manifest_digest == img.manifest_digest


@pytest.mark.root
def test_corrupt_blob_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path)
    build(REPO / "images" / "busybox", store)
    img = store.get("busybox")
    p = store.blob_path(img.manifest["config"]["digest"])
    p.write_bytes(p.read_bytes() + b" ")
    with pytest.raises(ImageError, match="corrupt"):
        store.get("busybox")
    with pytest.raises(ImageError, match="mismatch"):
        store.put_blob(b"abc", expected="sha256:" + "0" * 64)


def test_references() -> None:
    # Docker's short-name rules: docker.io, library/ for one component, "latest"
    cases = {
        "busybox": ("docker.io/library/busybox:latest", "busybox:latest"),
        "docker.io/busybox:1.36": ("docker.io/library/busybox:1.36", "busybox:1.36"),
        "index.docker.io/library/busybox": ("docker.io/library/busybox:latest", "busybox:latest"),
        "foo/bar": ("docker.io/foo/bar:latest", "foo/bar:latest"),
        "localhost/app": ("localhost/app:latest", "localhost/app:latest"),
        "127.0.0.1:5000/a/b:1.0": ("127.0.0.1:5000/a/b:1.0", "127.0.0.1:5000/a/b:1.0"),
        "quay.io/x/y": ("quay.io/x/y:latest", "quay.io/x/y:latest"),
        "busybox@sha256:" + "a" * 64: ("docker.io/library/busybox@sha256:" + "a" * 64, "busybox@sha256:" + "a" * 64),
    }
    for ref, (full, familiar) in cases.items():
        r = reference.parse(ref)
        assert (str(r), r.familiar()) == (full, familiar), ref
    assert reference.parse("busybox").api_host == "registry-1.docker.io"
    assert reference.parse("127.0.0.1:5000/a").api_host == "127.0.0.1:5000"
    for bad in ("UPPER", "a b", "", "x:", "busybox@sha256:12", "a//b", "/x", "host:port/x"):
        with pytest.raises(UsageError):
            reference.parse(bad)


@pytest.mark.root
@pytest.mark.parametrize("symlink_first", [True, False])
def test_directory_entry_never_changes_a_symlink_target(tmp_path: Path, symlink_first: bool) -> None:
    dest, victim = tmp_path / "root", tmp_path / "victim"
    dest.mkdir()
    victim.mkdir(mode=0o700)
    d = _entry("foo", tarfile.DIRTYPE)
    d.mode, d.uid = 0o777, 4242
    link = _entry("foo", tarfile.SYMTYPE, str(victim))
    unpack.extract(_tar([link, d] if symlink_first else [d, link]), dest)
    st = victim.stat()
    assert (st.st_mode & 0o777, st.st_uid) == (0o700, 0)


# --- regressions from the issue-4 review ------------------------------------------------------

@pytest.mark.parametrize("name", [".wh.", "a/.wh..", ".wh..."])
def test_whiteouts_of_nothing_or_a_parent_are_refused(tmp_path: Path, name: str) -> None:
    dest = tmp_path / "root"
    dest.mkdir()
    (tmp_path / "sibling").write_text("keep")
    with pytest.raises(ImageError, match="whiteout"):
        unpack.extract(_tar([_entry("a", tarfile.DIRTYPE), _entry(name)]), dest)
    assert (tmp_path / "sibling").read_text() == "keep" and dest.is_dir()


@pytest.mark.root
def test_symlink_depth_counts_where_the_entry_lands(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    dest.mkdir()
    # a -> . makes a/a/evil land at the root, where ../.. climbs out
    layer = _tar([_entry("a", tarfile.SYMTYPE, "."), _entry("a/a/evil", tarfile.SYMTYPE, "../..")])
    with pytest.raises(ImageError, match="outside the root"):
        unpack.extract(layer, dest)
    assert not (dest / "evil").is_symlink()


def test_huge_pax_header_is_refused_without_reading_it(tmp_path: Path) -> None:
    import zlib

    from vmrt.images.store import decompressed
    size = 300 << 20  # claimed; only a few MB of gzip are ever produced
    ti = tarfile.TarInfo("././@PaxHeader")
    ti.size, ti.type = size, tarfile.XHDTYPE
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    gz = io.BytesIO()
    gz.write(z.compress(ti.tobuf(format=tarfile.USTAR_FORMAT)))
    for _ in range(size >> 20):
        gz.write(z.compress(b"a" * (1 << 20)))
    gz.write(z.flush())
    gz.seek(0)
    (tmp_path / "root").mkdir()
    with pytest.raises(ImageError, match="tar header of 314572800 bytes refused"):
        unpack.extract(decompressed(gz), tmp_path / "root")


def test_out_of_range_metadata_is_an_image_error(tmp_path: Path) -> None:
    e = _entry("f")
    e.pax_headers = {"mtime": "1e400"}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(e, io.BytesIO(b""))
    buf.seek(0)
    (tmp_path / "root").mkdir()
    with pytest.raises(ImageError, match="cannot extract layer"):
        unpack.extract(buf, tmp_path / "root")


def _one_layer_image(store: Store, content: bytes, config: dict | None = None) -> str:  # type: ignore[type-arg]
    import gzip

    from vmrt.images.store import MT_OCI_LAYER_GZIP, sha256
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w") as tf:
        ti = tarfile.TarInfo("f")
        ti.size = len(content)
        tf.addfile(ti, io.BytesIO(content))
    tar = b.getvalue()
    gz = gzip.compress(tar)
    with store.writing():
        desc = {"mediaType": MT_OCI_LAYER_GZIP, "digest": store.put_blob(gz), "size": len(gz)}
        return store.write_image([(desc, sha256(tar))], config or {}, []).id


@pytest.mark.root
def test_a_tag_wins_over_an_image_id_prefix(tmp_path: Path) -> None:
    store = Store(tmp_path)
    ids = [_one_layer_image(store, b"%d" % i) for i in range(24)]
    a, b = ids[0], next(i for i in ids[1:] if i[7] != ids[0][7])
    store.tag(b[7:19], a)  # a tag spelled like the start of b's ID, pointing at a
    assert store.get(b[7:19]).id == a
    assert store.get("sha256:" + b[7:19]).id == b  # the explicit ID form still reaches b
    first = {}
    for i in ids:
        first.setdefault(i[7], []).append(i)
    shared = next(k for k, v in first.items() if len(v) > 1)  # 24 IDs, 16 hex digits: one is shared
    with pytest.raises(UsageError, match="ambiguous"):
        store.get(shared)
    store.tag(shared, a)  # now a tag of that name exists: it wins, no ambiguity
    assert store.get(shared).id == a


@pytest.mark.parametrize("config,field", [
    ({"config": ["x"]}, "config"),
    ({"history": [1]}, "history"),
    ({"created": 5}, "created"),
    ({"config": {"Env": "A=1"}}, "config.Env"),
    ({"config": {"Cmd": [1]}}, "config.Cmd"),
])
def test_malformed_configs_are_refused(tmp_path: Path, config: dict, field: str) -> None:  # type: ignore[type-arg]
    store = Store(tmp_path)
    with pytest.raises(ImageError, match=f"malformed: {field} must"):
        _one_layer_image(store, b"x", config)
    assert store.images() == []


# --- images/debian: debian:bookworm from Debian's archive (mmdebstrap, the host's apt sources) ---
DEBIAN = REPO / "images" / "debian"
MMDEBSTRAP_TIMEOUT = 900  # a first build downloads the archive's packages (~25-80 s here); then cached


def _debian(v: Vmrt, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    r = v("image", "build", str(DEBIAN), timeout=MMDEBSTRAP_TIMEOUT, env=env)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().strip() == "debian:bookworm"
    return r


@pytest.mark.parametrize("mode", ["process", pytest.param("vm", marks=pytest.mark.vm)])
def test_debian_recipe_runs_in_both_modes(vmrt: Vmrt, mode: str) -> None:
    _debian(vmrt)
    r = vmrt("run", "--rm", f"--isolation={mode}", "debian:bookworm", "cat", "/etc/debian_version")
    assert r.returncode == 0, r.stderr.decode()
    assert re.fullmatch(r"12\.\d+\n", r.stdout.decode()), r.stdout
    # Docker Hub's debian:bookworm config; its default command is bash
    r = vmrt("run", "--rm", "-i", f"--isolation={mode}", "debian:bookworm", input=b"echo $BASH_VERSION $PATH\n")
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().split() == [r.stdout.decode().split()[0],
                                         "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    assert r.stdout.decode().startswith("5.2.")


def test_debian_cache_hit_runs_no_mmdebstrap(vmrt: Vmrt, tmp_path: Path) -> None:
    """A second build (another store) takes the cached rootfs: with no mmdebstrap on PATH it still
    succeeds, leaves the cache entry as it was, and gives the same image."""
    _debian(vmrt)
    section = bootstrap.parse_section(tomllib.loads((DEBIAN / "recipe.toml").read_text())["mmdebstrap"], "debian")
    entry = config.load().cache / "images" / bootstrap.cache_key(section, *bootstrap.sources(section)) / "rootfs.tar.gz"
    before = entry.stat()
    only_apt = tmp_path / "bin"  # apt-config (the host's sources) and nothing else
    only_apt.mkdir()
    (only_apt / "apt-config").symlink_to(shutil.which("apt-config") or "/usr/bin/apt-config")
    other = Vmrt(tmp_path / "root", tmp_path / "run")
    try:
        r = _debian(other, env={"PATH": str(only_apt)})
        assert f"[image] cached: {entry.parent}" in r.stderr.decode()
        after = entry.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        ids = [v("image", "inspect", "--format", "{{.Id}}", "debian:bookworm").stdout for v in (vmrt, other)]
        assert ids[0] == ids[1] and ids[0].startswith(b"sha256:")
        layer = Store(other.root).get("debian:bookworm").layer_dirs()[0]
        # what mmdebstrap copies from the build host, and /dev's nodes, are not in the image
        assert not (layer / "etc" / "resolv.conf").exists() and not (layer / "etc" / "hostname").exists()
        assert sorted(os.listdir(layer / "dev")) == ["pts", "shm"]  # directories only, no device node
        assert os.readlink(layer / "bin") == "usr/bin"  # merged /usr by symlinks, as debootstrap makes it
        packages = re.findall(r"^Package: (\S+)", (layer / "var/lib/dpkg/status").read_text(), re.MULTILINE)
        assert "usrmerge" not in packages and "perl" not in packages and "apt" in packages
    finally:
        other.close()


@pytest.mark.parametrize("table,message", [
    ('variant = "minbase"', "suite must be a release name"),
    ('suite = "bookworm"\nvariant = "tiny"', "variant 'tiny' is not one of"),
    ('suite = "bookworm"\ninclude = ["--essential-hook=x"]', "include: '--essential-hook=x' is not a valid name"),
    ('suite = "bookworm"\ninclude = "nginx"', "include must be a list of strings"),
    ('suite = "bookworm"\nhooks = ["nope"]', "no hook directory 'nope'"),
    ('suite = "bookworm"\nmirror = "http://x"', "unknown key 'mirror'"),
    ('suite = "bookworm"\nsource_date_epoch = -1', "source_date_epoch must be a non-negative integer"),
    ('suite = "nosuchsuite"', "no apt source on this host serves 'nosuchsuite'"),
])
def test_bad_mmdebstrap_section_is_one_line(tmp_path: Path, table: str, message: str) -> None:
    (tmp_path / "recipe.toml").write_text(f'name = "bad"\n[mmdebstrap]\n{table}\n')
    r = subprocess.run([sys.executable, "-m", "vmrt", "image", "build", str(tmp_path)], capture_output=True,
                       env=dict(os.environ, VMRT_ROOT=str(tmp_path / "root"), VMRT_RUN_ROOT=str(tmp_path / "run"),
                                VMRT_CACHE=str(tmp_path / "cache")), timeout=60)
    assert r.returncode == 125
    line = one_line_error(r.stderr)
    assert "[mmdebstrap]" in line or "apt source" in line
    assert message in line, line
    assert not (tmp_path / "cache" / "images").exists() or not list((tmp_path / "cache" / "images").glob("*/"))


def test_apt_sources_of_the_suite_only(tmp_path: Path) -> None:
    """The host's entries for the suite (and its -updates, -security), one-line and deb822; others
    (deb-src, disabled, another suite: a third-party repository) are left out."""
    (tmp_path / "sources.list").write_text(
        "# comment\ndeb [arch=amd64] http://m.example/debian bookworm main contrib # trailing\n"
        "deb-src http://m.example/debian bookworm main\ndeb http://other.example/apt cloud-sdk-bookworm main\n")
    (tmp_path / "debian.sources").write_text(
        "Types: deb deb-src\nURIs: http://m.example/debian\nSuites: bookworm bookworm-updates trixie\n"
        "Components: main\nSigned-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n x\n\n"
        "# a disabled one\nEnabled: no\nTypes: deb\nURIs: http://off.example\nSuites: bookworm\n"
        "Components: main\n\nTypes: deb\nURIs: http://node.example\nSuites: nodistro\nComponents: main\n")
    section = bootstrap.parse_section({"suite": "bookworm", "components": ["main"]}, "t")
    one, deb822 = bootstrap.sources(section, [tmp_path / "sources.list", tmp_path / "debian.sources"])
    assert one == "deb [arch=amd64] http://m.example/debian bookworm main\n"
    assert deb822 == ("Types: deb\nURIs: http://m.example/debian\nSuites: bookworm bookworm-updates\n"
                      "Components: main\nSigned-By: \n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n x\n")
    other = bootstrap.parse_section({"suite": "bookworm", "variant": "apt"}, "t")
    assert bootstrap.cache_key(section, one, deb822) != bootstrap.cache_key(other, one, deb822)
    assert bootstrap.cache_key(section, one, deb822) != bootstrap.cache_key(section, one, deb822 + "\n")
    # credentials in a URI would be written into the image's sources: refused, with one line
    (tmp_path / "secret.list").write_text("deb https://user:hunter2@m.example/debian bookworm main\n")
    with pytest.raises(ImageError, match="carries credentials") as e:
        bootstrap.sources(section, [tmp_path / "secret.list"])
    assert "hunter2" not in str(e.value)
