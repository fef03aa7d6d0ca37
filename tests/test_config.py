"""Configuration precedence and validation (no VM needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmrt import config
from vmrt.bundle import RunOptions, make_config, merge_env, parse_cpus, parse_memory, resolve_user
from vmrt.errors import UsageError


def test_file_then_env_precedence(tmp_path: Path) -> None:
    f = tmp_path / "config.toml"
    f.write_text('isolation = "hyperv"\nmemory_mib = 512\n[timeouts]\nagent_ready = 7\n')
    cfg = config.load({"VMRT_CONFIG": str(f)})
    assert (cfg.isolation, cfg.memory_mib, cfg.timeouts.agent_ready) == ("vm", 512, 7.0)
    cfg = config.load({"VMRT_CONFIG": str(f), "VMRT_MEMORY_MIB": "300", "VMRT_TIMEOUT_AGENT_READY": "9",
                       "VMRT_ISOLATION": "process"})
    assert (cfg.isolation, cfg.memory_mib, cfg.timeouts.agent_ready) == ("process", 300, 9.0)


@pytest.mark.parametrize("env", [{"VMRT_ISOLATION": "kvm"}, {"VMRT_MEMORY_MIB": "lots"},
                                 {"VMRT_TIMEOUT_START": "soon"}])
def test_bad_settings_are_usage_errors(env: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        config.load({"VMRT_CONFIG": str(tmp_path / "none.toml"), **env})


def test_unknown_config_key_is_rejected(tmp_path: Path) -> None:
    f = tmp_path / "config.toml"
    f.write_text("colour = 'blue'\n")
    with pytest.raises(UsageError, match="unknown setting"):
        config.load({"VMRT_CONFIG": str(f)})


def test_sizes() -> None:
    assert parse_memory("512m") == 512 << 20
    assert parse_memory("1g") == 1 << 30
    assert parse_memory("1.5GB") == 3 << 29
    for bad in ("", "12x", "-1m", "1k"):
        with pytest.raises(UsageError):
            parse_memory(bad)
    assert parse_cpus("0.5") == 0.5
    with pytest.raises(UsageError):
        parse_cpus("0")


def test_env_merge_follows_docker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FROM_HOST", "h")
    monkeypatch.delenv("NOT_SET", raising=False)
    f = tmp_path / "e"
    f.write_text("A=file\nB=file\n")
    opts = RunOptions(image="x", env=["B=flag", "FROM_HOST", "NOT_SET"], env_files=[f])
    assert merge_env(["PATH=/bin", "A=img"], opts) == ["PATH=/bin", "A=file", "B=flag", "FROM_HOST=h"]
    with pytest.raises(UsageError):
        merge_env([], RunOptions(image="x", env=["=v"]))


def _rootfs(tmp_path: Path) -> Path:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nann:x:1000:1000::/home/ann:/bin/sh\n")
    (tmp_path / "etc/group").write_text("root:x:0:\nann:x:1000:\nstaff:x:50:ann,bob\n")
    return tmp_path


def test_user_resolution(tmp_path: Path) -> None:
    root = _rootfs(tmp_path)
    u = resolve_user(root, "ann")
    assert (u.uid, u.gid, u.groups, u.home) == (1000, 1000, [50], "/home/ann")
    u = resolve_user(root, "ann:staff")
    assert (u.uid, u.gid, u.groups) == (1000, 50, [])
    u = resolve_user(root, "4242:7")
    assert (u.uid, u.gid, u.home) == (4242, 7, "/")
    with pytest.raises(UsageError, match="unable to find user"):
        resolve_user(root, "nobody-here")
    with pytest.raises(UsageError, match="unable to find group"):
        resolve_user(root, "ann:nogroup")


def test_passwd_symlink_cannot_leave_the_image(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.write_text("evil:x:0:0::/:/bin/sh\n")
    (root / "etc/passwd").symlink_to(outside)  # absolute: resolved inside the image root
    with pytest.raises(UsageError):
        resolve_user(root, "evil")


def test_oci_config_from_image_and_flags(tmp_path: Path) -> None:
    root = _rootfs(tmp_path)
    img = {"Env": ["PATH=/x"], "Entrypoint": ["/ep"], "Cmd": ["default"], "WorkingDir": "/w", "User": "ann"}
    c = make_config(img, root, RunOptions(image="i", command=["arg"], tty=True, memory_bytes=64 << 20,
                                          cpus=1.5), "a" * 64, "vm")
    p = c["process"]
    assert p["args"] == ["/ep", "arg"] and p["cwd"] == "/w" and p["terminal"] is True
    assert p["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [50]}
    assert "HOME=/home/ann" in p["env"] and "TERM=xterm" in p["env"] and f"HOSTNAME={'a' * 12}" in p["env"]
    assert c["linux"]["resources"] == {"memory": {"limit": 64 << 20}, "cpu": {"period": 100000, "quota": 150000},
                                       "devices": [{"allow": False, "access": "rwm"}]}
    assert make_config(img, root, RunOptions(image="i", entrypoint="", command=["x"]), "b" * 64,
                       "vm")["process"]["args"] == ["x"]
    with pytest.raises(UsageError, match="no command"):  # --entrypoint "" also drops the image's Cmd
        make_config(img, root, RunOptions(image="i", entrypoint=""), "b" * 64, "vm")
    with pytest.raises(UsageError, match="no command"):
        make_config({}, root, RunOptions(image="i"), "c" * 64, "vm")
    assert make_config(img, root, RunOptions(image="i", entrypoint="sh"), "d" * 64, "vm")["process"]["args"] == ["sh"]
