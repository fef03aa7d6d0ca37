"""``vmrt build``: an image from a Dockerfile, as Docker's classic builder makes it.

Each instruction is a step on a *state*: the stage's layers and image config, committed to
the store as an (untagged) image, so that a RUN step runs in an ordinary vmrt container made
from it (process isolation: :mod:`vmrt.runner`, the build's network). What the step leaves in
its writable layer becomes the next layer (:mod:`vmrt.images.buildlayer`: the layer is
untrusted and read without following anything in it). The step images a build made are
forgotten when it ends (its result stays); their blobs stay until the next collection
(``vmrt image prune``, ``rmi``), and with them the build cache.

The cache (``<root>/builder/cache``) maps a step's key (the parent state's image ID, the
instruction as expanded, the build args a RUN sees, and for COPY/ADD the digest of what is
copied: names, types, modes, owners, link targets, contents) to the layer the step made
and its time, so a cached rebuild makes the very same image IDs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import sys
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import bundle, fsmode, network, rootfs, runner, safefs
from . import volumes as volumes_mod
from .agent import walk
from .config import Config
from .errors import UsageError, VmrtError
from .formatting import inert
from .images import buildlayer, reference
from .images import dockerfile as df
from .images.store import Store
from .layout import rw_dir
from .ocispec import Spec
from .state import State
from .timings import Timings
from .vm import disk as vmdisk

LOG = logging.getLogger(__name__)
Layer = tuple[dict[str, Any], str]  # (descriptor, diff id)
CONFIG_ONLY = {"ENV", "ARG", "LABEL", "USER", "EXPOSE", "CMD", "ENTRYPOINT", "VOLUME", "SHELL", "STOPSIGNAL",
               "HEALTHCHECK", "ONBUILD", "MAINTAINER"}
DEFAULT_SHELL = ["/bin/sh", "-c"]


class BuildError(VmrtError):
    """A failed build step (docker build's exit status 1)."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg, exit_code=1)


@dataclasses.dataclass
class Options:
    context: Path | None                 # None: a tar archive on stdin
    dockerfile: str | None = None
    tags: list[str] = dataclasses.field(default_factory=list)
    build_args: dict[str, str] = dataclasses.field(default_factory=dict)
    target: str | None = None
    no_cache: bool = False
    pull: bool = False
    isolation: str = "process"
    network: str | None = None
    quiet: bool = False
    iidfile: Path | None = None
    platform: str | None = None


@dataclasses.dataclass
class Stage:
    name: str | None
    layers: list[Layer]
    config: dict[str, Any]          # the image config without rootfs
    image_id: str = ""
    args: dict[str, str | None] = dataclasses.field(default_factory=dict)
    cmd_set: bool = False

    @property
    def run(self) -> dict[str, Any]:
        return dict(self.config.setdefault("config", {}))


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _short(image_id: str) -> str:
    return image_id.partition(":")[2][:12]


class Builder:
    def __init__(self, cfg: Config, opts: Options, out: Callable[[str], None]) -> None:
        self.cfg, self.opts, self.say = cfg, opts, out
        self.store = Store(cfg.root)
        self.cache_dir = cfg.root / "builder" / "cache"
        self.made: list[str] = []       # step images this build added to the store
        self.stages: list[Stage] = []
        self.escape = "\\"
        self.where = "Dockerfile"
        self.used_args: set[str] = set()
        self.meta_args: dict[str, str | None] = {}
        self.step = 0
        self.total = 0
        self._state: State | None = None
        self.ignore = df.Ignore()
        self.ctx_fd = -1

    # --- the build ---------------------------------------------------------------------
    def build(self, context: Path, text: str) -> str:
        self.escape = _escape_directive(text)
        instructions = df.parse(text, self.where)
        syntax = _directives(text).get("syntax")
        if syntax is not None:  # a frontend image is never pulled or run: vmrt's own parser builds
            self.say(inert(f"[Warning] {self.where}:1: the syntax directive ({syntax[:200]}) is ignored: "
                           "vmrt builds with its own Dockerfile parser"))
        if not instructions or instructions[0].cmd not in ("FROM", "ARG"):
            line = instructions[0].line if instructions else 1
            raise df.DockerfileError(f"{self.where}:{line}: the first instruction must be FROM (or ARG before FROM)")
        stages = self._split(instructions)
        if self.opts.target is not None:
            names = [s[0].value[2].lower() if len(s[0].value) > 2 else None for s in stages[1:]]
            if self.opts.target.lower() not in names:
                raise UsageError(f"failed to reach build target {self.opts.target} in Dockerfile")
            stages = stages[:1 + names.index(self.opts.target.lower()) + 1]
        self.total = sum(len(s) for s in stages)
        if not (context / ".dockerignore").is_symlink():
            try:  # bounded as the Dockerfile is: nothing of a context is held whole
                data = safefs.read_regular(context, ".dockerignore", df.MAX_BYTES)
            except safefs.FileTooLarge:
                raise df.DockerfileError(f".dockerignore: larger than {df.MAX_BYTES >> 20} MiB") from None
            if data is not None:
                self.ignore = df.Ignore(data.decode(errors="replace"))
        self.ctx_fd = os.open(context, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for ins in stages[0]:  # the ARGs before the first FROM
                try:
                    self._meta_arg(ins)
                except VmrtError as e:
                    raise self._fail(ins, e) from e
            for body in stages[1:]:
                self._stage(body)
        finally:
            os.close(self.ctx_fd)
            if self._state is not None:
                self._state.close()
        unused = sorted(set(self.opts.build_args) - self.used_args)
        if unused:
            self.say(f"[Warning] One or more build-args [{' '.join(unused)}] were not consumed")
        return self.stages[-1].image_id

    def _split(self, instructions: list[df.Instruction]) -> list[list[df.Instruction]]:
        out: list[list[df.Instruction]] = [[]]
        for ins in instructions:
            if ins.cmd == "FROM":
                out.append([ins])
            elif len(out) == 1 and ins.cmd != "ARG":
                raise df.DockerfileError(f"{self.where}:{ins.line}: {ins.cmd} before the first FROM")
            else:
                out[-1].append(ins)
        return out

    def _header(self, ins: df.Instruction) -> None:
        self.step += 1
        self.say(f"Step {self.step}/{self.total} : {ins.original.rstrip()}")

    def _meta_arg(self, ins: df.Instruction) -> None:
        self._header(ins)
        for name, default in _arg_decls(ins, {k: v for k, v in self.meta_args.items() if v is not None}):
            self.meta_args[name] = self.opts.build_args.get(name, default)
            if name in self.opts.build_args:
                self.used_args.add(name)

    def _fail(self, ins: df.Instruction, e: Exception) -> BuildError:
        msg = str(e)
        if len(msg) > 1000:  # an echoed command may be long: the line says where
            msg = msg[:1000] + "..."
        if msg.startswith(f"{self.where}:"):
            return BuildError(msg)
        return BuildError(f"{self.where}:{ins.line}: {ins.cmd}: {msg}")

    def _stage(self, body: list[df.Instruction]) -> None:
        frm = body[0]
        self._header(frm)
        try:
            stage = self._from(frm)
        except VmrtError as e:
            raise self._fail(frm, e) from e
        self.stages.append(stage)
        self.say(f" ---> {_short(stage.image_id)}" if stage.image_id else " ---> scratch")
        triggers = list(stage.run.get("OnBuild") or [])
        if triggers:
            stage.config["config"]["OnBuild"] = None
            self.say(f"# Executing {len(triggers)} build trigger{'s' if len(triggers) > 1 else ''}")
            for text in triggers:
                for ins in df.parse(text, f"{self.where}:{frm.line}: ONBUILD"):
                    if ins.cmd in ("ONBUILD", "FROM", "MAINTAINER"):  # the image's text: as Docker refuses it
                        raise BuildError(f"{self.where}:{frm.line}: {ins.cmd} isn't allowed as an ONBUILD trigger")
                    self._do(stage, dataclasses.replace(ins, line=frm.line))
        for ins in body[1:]:
            self._header(ins)
            self._do(stage, ins)

    def _do(self, stage: Stage, ins: df.Instruction) -> None:
        try:
            getattr(self, f"_i_{ins.cmd.lower()}", self._unknown)(stage, ins)
        except BuildError as e:
            if str(e).startswith(f"{self.where}:"):
                raise
            raise BuildError(f"{self.where}:{ins.line}: {str(e)[:1000]}") from e
        except VmrtError as e:
            raise self._fail(ins, e) from e

    def _unknown(self, stage: Stage, ins: df.Instruction) -> None:
        raise UsageError(f"unknown instruction: {ins.cmd}")

    # --- FROM -----------------------------------------------------------------------------
    def _from(self, ins: df.Instruction) -> Stage:
        ins.check_flags({"platform"}, self.where)
        env = {k: v for k, v in self.meta_args.items() if v is not None}
        vals = [df.word(v, env, self.escape) for v in ins.value]
        if len(vals) not in (1, 3) or (len(vals) == 3 and vals[1].upper() != "AS"):
            raise UsageError("FROM requires either one or three arguments (FROM IMAGE [AS NAME])")
        base, name = vals[0], (vals[2].lower() if len(vals) == 3 else None)
        if name is not None and not re.fullmatch(r"[a-z][a-z0-9-_.]*", name):
            raise UsageError(f"invalid name for build stage: {name!r}, name can't start with a number "
                             "or contain symbols")
        prev = self._stage_named(base)
        if prev is not None:
            return Stage(name, list(prev.layers), copy.deepcopy(prev.config), prev.image_id)
        if base == "":
            raise UsageError("FROM needs an image")
        if base.lower() == "scratch":
            cfg: dict[str, Any] = {"architecture": "amd64", "os": "linux", "config": {}, "history": []}
            return Stage(name, [], cfg, "")
        platform = ins.flag("platform")
        if platform:
            platform = df.word(platform, env, self.escape)
        img = runner.find_image(self.cfg, self.store, base, "always" if self.opts.pull else "missing",
                                platform or self.opts.platform)
        config = {k: copy.deepcopy(v) for k, v in img.config.items() if k != "rootfs"}
        config.setdefault("config", {})
        config["config"] = dict(config["config"] or {})
        config["history"] = list(config.get("history") or [])
        return Stage(name, list(zip(img.layers, img.diff_ids, strict=True)), config, img.id)

    def _stage_named(self, ref: str) -> Stage | None:
        for s in self.stages:
            if s.name is not None and s.name == ref.lower():
                return s
        return None

    # --- state and cache -------------------------------------------------------------------
    def _env(self, stage: Stage) -> dict[str, str]:
        """What a word is expanded with: the args in scope, then the stage's Env over them."""
        env = {k: v for k, v in stage.args.items() if v is not None}
        for e in stage.run.get("Env") or []:
            k, _, v = str(e).partition("=")
            env[k] = v
        return env

    def _key(self, stage: Stage, what: str) -> str:
        return hashlib.sha256(f"{stage.image_id}\n{json.dumps(stage.layers and stage.layers[-1][1])}\n{what}"
                              .encode()).hexdigest()

    def _cached(self, key: str) -> dict[str, Any] | None:
        if self.opts.no_cache:
            return None
        try:
            entry = json.loads((self.cache_dir / key).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or not isinstance(entry.get("created"), str):
            return None
        layer = entry.get("layer")
        if layer is not None and not (isinstance(layer, list) and len(layer) == 2 and isinstance(layer[0], dict)
                                      and self.store.has_blob(str(layer[0].get("digest")))):
            return None  # collected since (image prune): build it again
        return entry

    def _remember(self, key: str, entry: dict[str, Any]) -> None:
        fsmode.private_dir(self.cache_dir.parent)
        fsmode.private_dir(self.cache_dir)
        fsmode.write_private(self.cache_dir / key, json.dumps(entry))

    def _commit(self, stage: Stage, created_by: str, layer: Layer | None, created: str,
                config: dict[str, Any] | None = None) -> None:
        """The stage's next state: ``config`` (the runtime config) and ``layer`` over the parent."""
        if config is not None:
            stage.config["config"] = config
        stage.config["created"] = created
        entry: dict[str, Any] = {"created": created, "created_by": created_by}
        if layer is None:
            entry["empty_layer"] = True
        else:
            stage.layers.append(layer)
        stage.config["history"] = [*stage.config.get("history", []), entry]
        before = set(self._ids())
        img = self.store.write_image(list(stage.layers), dict(stage.config))
        if img.id not in before:
            self.made.append(img.id)
        stage.image_id = img.id

    def _ids(self) -> Iterator[str]:
        for (i,) in self.store.db.execute("SELECT id FROM images"):
            yield str(i)

    def _config_step(self, stage: Stage, ins: df.Instruction, config: dict[str, Any], what: str) -> None:
        key = self._key(stage, "config\n" + what + "\n" + json.dumps(config, sort_keys=True))
        entry = self._cached(key)
        if entry is not None:
            self.say(" ---> Using cache")
        else:
            entry = {"created": _now(), "layer": None}
            self._remember(key, entry)
        self._commit(stage, what, None, entry["created"], config)
        self.say(f" ---> {_short(stage.image_id)}")

    def _layer_step(self, stage: Stage, what: str, content: str, make: Callable[[], Layer | None],
                    config: dict[str, Any] | None = None) -> None:
        key = self._key(stage, "layer\n" + what + "\n" + content)
        entry = self._cached(key)
        if entry is not None:
            self.say(" ---> Using cache")
            layer = entry["layer"]
        else:
            made = make()
            if made is not None and made[1] in {d for _, d in stage.layers}:
                # the very bytes of a layer the stage has (COPY a; RUN rm a; COPY a, or two steps
                # that changed nothing within a second): an overlay cannot stack one dir twice, and
                # dropping it would lose what it applies again: the same files, another diff ID
                made = buildlayer.distinct(self.store, made, f"{self.where} step {self.step}")
            layer = list(made) if made is not None else None
            entry = {"created": _now(), "layer": layer}
            self._remember(key, entry)
        self._commit(stage, what, (layer[0], layer[1]) if layer else None, entry["created"], config)
        self.say(f" ---> {_short(stage.image_id)}")

    # --- config-only instructions ------------------------------------------------------------
    def _i_arg(self, stage: Stage, ins: df.Instruction) -> None:
        for name, default in _arg_decls(ins, self._env(stage)):
            if name in self.opts.build_args:
                self.used_args.add(name)
                stage.args[name] = self.opts.build_args[name]
            elif default is None and name in self.meta_args:
                stage.args[name] = self.meta_args[name]
            else:
                stage.args[name] = default
        self._config_step(stage, ins, stage.run, f"ARG {' '.join(ins.value)}")

    def _i_env(self, stage: Stage, ins: df.Instruction) -> None:
        run = stage.run
        env = list(run.get("Env") or [])
        pairs = df.pairs(ins.value, self._env(stage), "ENV")
        for k, v in pairs:
            if not k:
                raise UsageError("ENV names can not be blank")
            env = [e for e in env if str(e).partition("=")[0] != k] + [f"{k}={v}"]
        run["Env"] = env
        self._config_step(stage, ins, run, "ENV " + " ".join(f"{k}={v}" for k, v in pairs))

    def _i_label(self, stage: Stage, ins: df.Instruction) -> None:
        run = stage.run
        labels = dict(run.get("Labels") or {})
        for k, v in df.pairs(ins.value, self._env(stage), "LABEL"):
            labels[k] = v
        run["Labels"] = labels
        self._config_step(stage, ins, run, "LABEL " + " ".join(ins.value))

    def _i_maintainer(self, stage: Stage, ins: df.Instruction) -> None:
        stage.config["author"] = " ".join(ins.value)
        self._config_step(stage, ins, stage.run, "MAINTAINER " + " ".join(ins.value))

    def _one_word(self, stage: Stage, ins: df.Instruction) -> str:
        if len(ins.value) != 1:
            raise UsageError(f"{ins.cmd} requires exactly one argument")
        return df.word(ins.value[0], self._env(stage), self.escape)

    def _i_user(self, stage: Stage, ins: df.Instruction) -> None:
        run = stage.run
        run["User"] = self._one_word(stage, ins)
        self._config_step(stage, ins, run, f"USER {run['User']}")

    def _i_stopsignal(self, stage: Stage, ins: df.Instruction) -> None:
        run = stage.run
        sig = self._one_word(stage, ins)
        if not re.fullmatch(r"(SIG)?[A-Z0-9+-]+|[0-9]+", sig.upper()):
            raise UsageError(f"invalid signal: {sig}")
        run["StopSignal"] = sig
        self._config_step(stage, ins, run, f"STOPSIGNAL {sig}")

    def _i_expose(self, stage: Stage, ins: df.Instruction) -> None:
        run = stage.run
        ports = dict(run.get("ExposedPorts") or {})
        env = self._env(stage)
        for raw in ins.value:
            for p in df.words(raw, env, self.escape):
                num, _, proto = p.partition("/")
                proto = (proto or "tcp").lower()
                lo, _, hi = num.partition("-")
                if proto not in ("tcp", "udp", "sctp") or not lo.isdigit() or (hi and not hi.isdigit()):
                    raise UsageError(f"invalid containerPort: {p}")
                for n in range(int(lo), int(hi or lo) + 1):
                    if not 0 < n < 65536:
                        raise UsageError(f"invalid containerPort: {p}")
                    ports[f"{n}/{proto}"] = {}
        run["ExposedPorts"] = ports
        self._config_step(stage, ins, run, "EXPOSE " + " ".join(sorted(ports)))

    def _i_volume(self, stage: Stage, ins: df.Instruction) -> None:
        run = stage.run
        vols = dict(run.get("Volumes") or {})
        env = self._env(stage)
        for raw in ins.value:
            for v in ([raw] if ins.json else df.words(raw, env, self.escape)):
                if not v.strip():
                    raise UsageError("VOLUME specified can not be an empty string")
                vols[v] = {}
        run["Volumes"] = vols
        self._config_step(stage, ins, run, "VOLUME " + json.dumps(sorted(vols)))

    def _i_shell(self, stage: Stage, ins: df.Instruction) -> None:
        if not ins.json or not ins.value:
            raise UsageError("SHELL requires the arguments to be in JSON form")
        run = stage.run
        run["Shell"] = list(ins.value)
        self._config_step(stage, ins, run, f"SHELL {json.dumps(list(ins.value))}")

    def _shell(self, stage: Stage) -> list[str]:
        return list(stage.run.get("Shell") or DEFAULT_SHELL)

    def _command(self, stage: Stage, ins: df.Instruction) -> list[str]:
        if ins.json:
            return list(ins.value)
        return [*self._shell(stage), " ".join(ins.value)]

    def _i_cmd(self, stage: Stage, ins: df.Instruction) -> None:
        run = stage.run
        run["Cmd"] = self._command(stage, ins)
        stage.cmd_set = True
        self._config_step(stage, ins, run, f"CMD {json.dumps(run['Cmd'])}")

    def _i_entrypoint(self, stage: Stage, ins: df.Instruction) -> None:
        run = stage.run
        run["Entrypoint"] = self._command(stage, ins) if ins.value else None
        if not stage.cmd_set:  # a CMD from the base image does not go with a new ENTRYPOINT (Docker)
            run["Cmd"] = None
        self._config_step(stage, ins, run, f"ENTRYPOINT {json.dumps(run['Entrypoint'])}")

    def _i_healthcheck(self, stage: Stage, ins: df.Instruction) -> None:
        run = stage.run
        if not ins.value:
            raise UsageError("HEALTHCHECK requires an argument")
        kind = ins.value[0].upper()
        if kind == "NONE":
            if len(ins.value) > 1 or ins.flags:
                raise UsageError("HEALTHCHECK NONE takes no arguments")
            hc: dict[str, Any] = {"Test": ["NONE"]}
        elif kind == "CMD":
            ins.check_flags({"interval", "timeout", "start-period", "start-interval", "retries"}, self.where)
            rest = list(ins.value[1:])
            if not rest:
                raise UsageError("Missing command after HEALTHCHECK CMD")
            hc = {"Test": ["CMD", *rest] if ins.json else ["CMD-SHELL", " ".join(rest)]}
            for flag, field in (("interval", "Interval"), ("timeout", "Timeout"), ("start-period", "StartPeriod"),
                                ("start-interval", "StartInterval")):
                val = ins.flag(flag)
                if val is not None:
                    hc[field] = _duration_ns(val, flag)
            retries = ins.flag("retries")
            if retries is not None:
                if not retries.isdigit() or int(retries) < 1:
                    raise UsageError(f"--retries must be at least 1 (not {retries})")
                hc["Retries"] = int(retries)
        else:
            raise UsageError(f"Unknown type {kind!r} in HEALTHCHECK (try CMD)")
        run["Healthcheck"] = hc
        self._config_step(stage, ins, run, f"HEALTHCHECK {json.dumps(hc, sort_keys=True)}")

    def _i_onbuild(self, stage: Stage, ins: df.Instruction) -> None:
        if ins.sub is None:
            raise UsageError("ONBUILD requires an instruction")
        if ins.sub.cmd in ("ONBUILD", "FROM", "MAINTAINER"):
            raise UsageError(f"{ins.sub.cmd} isn't allowed as an ONBUILD trigger")
        run = stage.run
        run["OnBuild"] = [*(run.get("OnBuild") or []), ins.sub.original.rstrip("\n")]
        self._config_step(stage, ins, run, f"ONBUILD {ins.sub.original}")

    def _i_workdir(self, stage: Stage, ins: df.Instruction) -> None:
        run = stage.run
        path = self._one_word(stage, ins)
        cur = run.get("WorkingDir") or "/"
        run["WorkingDir"] = os.path.normpath(path if path.startswith("/") else os.path.join(cur, path))
        wd = run["WorkingDir"]
        if wd == "/" or self._is_dir(stage, wd):
            self._config_step(stage, ins, run, f"WORKDIR {wd}")
            return

        def make() -> Layer:
            layer = buildlayer.LayerTar(self.store.tmp)
            try:
                buildlayer.parents(layer, wd + "/x", 0, 0)
                return layer.store(self.store)
            finally:
                layer.close()
        self._layer_step(stage, f"WORKDIR {wd}", "", make, run)

    # --- RUN --------------------------------------------------------------------------------
    def _i_run(self, stage: Stage, ins: df.Instruction) -> None:
        ins.check_flags({"network", "mount"}, self.where)
        mounts = df.run_mounts(ins.flags, self._env(stage), stage.run.get("WorkingDir") or "/", self.escape)
        if ins.json:
            args = list(ins.value)
        else:
            text = " ".join(ins.value)
            if ins.heredocs and re.fullmatch(r"<<-?[\"']?(\w+)[\"']?", text.strip()):
                text = ins.heredocs[0].content
            elif ins.heredocs:
                text = text + "\n" + "".join(f"{h.content}{h.name}\n" for h in ins.heredocs)
            args = [*self._shell(stage), text]
        if not args:
            raise UsageError("RUN needs a command")
        env_names = {str(e).partition("=")[0] for e in stage.run.get("Env") or []}
        build_env = [f"{k}={v}" for k, v in sorted(stage.args.items()) if v is not None and k not in env_names]
        what = "RUN " + (f"|{len(build_env)} {' '.join(build_env)} " if build_env else "") + " ".join(args)
        if not stage.layers:
            raise UsageError("RUN in a stage with no layers (FROM scratch): there is no shell to run")
        network_name = ins.flag("network") or self.opts.network
        content = "\n".join(self._mount_key(stage, m) for m in mounts)

        def make() -> Layer:
            with contextlib.ExitStack() as stack:
                host_mounts = [self._mount(stage, m, stack) for m in mounts]
                return self._run(stage, args, build_env, network_name, host_mounts, self._stubs(stage, mounts))
        self._layer_step(stage, what, content, make)

    # --- RUN --mount ---------------------------------------------------------------------------
    def _mount_key(self, stage: Stage, m: df.RunMount) -> str:
        """What the step's cache key holds of a mount: its options, and for a bind what it shows
        (the context's content there, as COPY's key; a stage's or image's ID)."""
        if m.type != "bind":
            return m.key()
        if m.from_ is None:
            if self.ignore.excluded(_rel(m.source)):
                raise UsageError(f"--mount: source {m.source!r}: excluded by .dockerignore")
            digest, _ = buildlayer.tree_digest(self.ctx_fd, _rel(m.source), lambda rel: not self.ignore.excluded(rel))
            return f"{m.key()} {digest}"
        src = self._from_stage(m.from_)
        if src is not None:
            return f"{m.key()} {src.image_id} {json.dumps([d for _, d in src.layers])}"
        img = runner.find_image(self.cfg, self.store, m.from_, "missing", self.opts.platform)
        return f"{m.key()} {img.id}"

    def _stubs(self, stage: Stage, mounts: list[df.RunMount]) -> set[str]:
        """The mount points a step's mounts make where the image has nothing (the target and its
        missing parents): left out of the layer when the step left them empty (as buildkit)."""
        out = set()
        for m in mounts:
            parts = [p for p in m.target.split("/") if p]
            for k in range(1, len(parts) + 1):
                rel = "/".join(parts[:k])
                if self._image_stat(stage, rel, follow=False) is None:
                    out.add(rel)
        return out

    def _staging(self, stack: contextlib.ExitStack) -> Path:
        """A private dir for one mount's host side, removed (once nothing is mounted in it) at the end:
        under ``<root>/builder/staging`` (root's, 0700), on the state root's disk, never in the
        run root (a tmpfs: what a step writes into a rw bind, a writable file's copy, a
        filtered context or a private cache would be host RAM)."""
        base = fsmode.private_dir(self.cfg.root / "builder" / "staging")
        path = base / ("mnt-" + secrets.token_hex(8))
        path.mkdir(mode=0o700)

        def remove() -> None:
            if rootfs.mounts_under(path):
                LOG.warning("%s: still mounted, left in place", path)
                return
            shutil.rmtree(path, ignore_errors=True)
        stack.callback(remove)
        return path

    def _mount(self, stage: Stage, m: df.RunMount, stack: contextlib.ExitStack) -> volumes_mod.Mount:
        if m.type == "tmpfs":  # exec allowed, as buildkit's; nosuid and nodev kept
            return volumes_mod.Mount("tmpfs", m.target, options=["exec", *([f"size={m.size}"] if m.size else [])])
        if m.type == "cache":
            return volumes_mod.Mount("bind", m.target, source=str(self._cache_dir(m, stack)), readonly=m.readonly)
        return volumes_mod.Mount("bind", m.target, source=str(self._bind_source(stage, m, stack)),
                                 readonly=m.readonly)

    def _cache_dir(self, m: df.RunMount, stack: contextlib.ExitStack) -> Path:
        """``type=cache``: ``<root>/builder/mounts/<sha256 of the id>`` (root's 0700 parent; never in
        a layer), locked for the step as ``sharing`` says: shared (a shared lock), locked (an
        exclusive one, waited for), private (exclusive if free, else a fresh dir for this step)."""
        base = fsmode.private_dir(self.cfg.root / "builder" / "mounts")
        name = hashlib.sha256(m.id.encode()).hexdigest()[:32]
        lock = stack.enter_context(open(base / f"{name}.lock", "a", opener=fsmode.opener))
        path = base / name
        if m.sharing == "private":
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                path = self._staging(stack) / "cache"
        else:
            fcntl.flock(lock, fcntl.LOCK_EX if m.sharing == "locked" else fcntl.LOCK_SH)
        try:
            os.mkdir(path, 0o700)
            os.chown(path, m.uid, m.gid)
            os.chmod(path, m.mode)
        except FileExistsError:
            pass
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise BuildError(f"the cache mount {path} is not a directory")
        return path

    def _bind_source(self, stage: Stage, m: df.RunMount, stack: contextlib.ExitStack) -> Path:
        """``type=bind``: ``source`` resolved inside the context (``.dockerignore`` applies) or
        ``from``'s root (mounted read-only for the step), never by a link out of it; bound
        read-only from the opened fd (no path is looked up again); with ``rw`` an overlay over it
        whose writes are dropped after the step."""
        root_fd, keep, _ = stack.enter_context(self._source_root(stage, m.from_))
        rel = _rel(m.source)
        if not keep(rel):
            raise UsageError(f"--mount: source {m.source!r}: excluded by .dockerignore")
        try:
            fd = safefs.open_in_root(root_fd, rel or ".", os.O_PATH)
        except OSError as e:
            raise UsageError(f"--mount: source {m.source!r}: {e.strerror}") from None
        stack.callback(os.close, fd)
        st = os.fstat(fd)
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            raise UsageError(f"--mount: source {m.source!r} is not a file or directory")
        work = self._staging(stack)
        src = Path(f"/proc/self/fd/{fd}")
        if m.from_ is None and stat.S_ISDIR(st.st_mode) and buildlayer.tree_digest(root_fd, rel, keep)[1]:
            src = self._filtered_copy(root_fd, rel, keep, work)  # what .dockerignore leaves of it
        if m.readonly or stat.S_ISDIR(st.st_mode):
            target = work / "src"
            target.mkdir() if stat.S_ISDIR(st.st_mode) else target.touch(0o600)
            rootfs.bind(src, target, readonly=True)
            stack.callback(rootfs.umount, target)
            if m.readonly:
                return target
            upper, wdir, merged = work / "upper", work / "work", work / "merged"
            for d in (upper, wdir):
                d.mkdir(mode=0o700)
            os.chown(upper, st.st_uid, st.st_gid)  # the merged root is the upper's: the source's own
            os.chmod(upper, stat.S_IMODE(st.st_mode))
            rootfs.mount_overlay([target], upper, wdir, merged)
            stack.callback(rootfs.umount, merged)
            return merged
        copy = work / "file"  # a writable file: a copy the step may change
        with open(src, "rb") as fin, open(copy, "wb", opener=fsmode.opener) as fout:
            while chunk := fin.read(buildlayer.CHUNK):
                fout.write(chunk)
        return copy

    def _filtered_copy(self, root_fd: int, rel: str, keep: Callable[[str], bool], work: Path) -> Path:
        layer = buildlayer.LayerTar(self.store.tmp)
        try:
            buildlayer.copy_source(root_fd, rel, "/", layer, into_dir=False, uid=0, gid=0, chmod=None, keep=keep,
                                   notice=lambda m: self.say(inert(f"[Warning] {m}")))
            layer.tar.close()
            layer.file.seek(0)
            out = work / "filtered"
            out.mkdir(mode=0o755)
            try:  # the tar filter: links are kept as links (to anywhere: the step's view); the walk that
                # wrote the tar never descends a link, so no entry is extracted through one
                with tarfile.open(fileobj=layer.file, mode="r:") as tf:
                    tf.extractall(out, filter="tar")
            except (tarfile.TarError, OSError) as e:
                raise BuildError(f"--mount: source /{rel}: {str(e)[:300]}") from e
            return out
        finally:
            layer.close()

    def _run(self, stage: Stage, args: list[str], build_env: list[str], network_name: str | None,
             mounts: list[volumes_mod.Mount] | None = None, stubs: set[str] | None = None) -> Layer:
        if self._state is None:
            self._state = State(self.cfg.db_path)
        state = self._state
        isolation = self.opts.isolation
        net = network.NetRequest(network=network_name) if network_name and network_name != "default" else None
        opts = bundle.RunOptions(image=stage.image_id, command=args, entrypoint="", env=build_env, rm=True,
                                 pull="never", net=net, mounts=list(mounts or []))
        c, image, layers, spec = runner.create(self.cfg, opts, isolation, state, persist=False)
        layer = buildlayer.LayerTar(self.store.tmp)
        stubs = stubs or set()
        try:
            self.say(f" ---> Running in {c.id[:12]}")
            driver = runner.make_driver(isolation, accel=None, kernel=None, runtime=self.cfg.runtime)
            notice: Callable[[str], None] = lambda m: self.say(inert(f"[Warning] {m}"))  # noqa: E731
            with open(os.devnull, "rb") as null_in, open(os.devnull, "wb") as null_out, \
                    self._guest_walk(spec, layer, notice, stubs) if isolation == "vm" else _no_walk() as walk_fd:
                out = null_out.fileno() if self.opts.quiet else sys.stdout.fileno()
                err = null_out.fileno() if self.opts.quiet else sys.stderr.fileno()
                sys.stdout.flush()
                status = runner.execute(self.cfg, state, c, image, layers, spec, driver, Timings(), log_dir=None,
                                        stdio=(null_in.fileno(), out, err), scratch=True, walk_fd=walk_fd)
                if status != 0:
                    raise BuildError(f"The command '{' '.join(args)}' returned a non-zero code: {status}")
            if isolation == "process":
                buildlayer.from_upper(rw_dir(self.cfg, c.id) / "upper", layer, notice, stubs)
            stored = layer.store(self.store)
            self.say(f" ---> Removed intermediate container {c.id[:12]}")
            return stored
        finally:
            layer.close()
            runner.discard(self.cfg, state, c)

    @contextlib.contextmanager
    def _guest_walk(self, spec: Spec, layer: buildlayer.LayerTar, notice: Callable[[str], None],
                    stubs: set[str]) -> Iterator[int]:
        """A VM step's writable layer into ``layer``. The host never reads the step's disk (a hostile
        ext4 image): once the step's process has exited 0 (its PID namespace, and every process of
        the step with it, gone), the guest agent walks the upper dir with contents (WALK_AFTER) and
        its stream comes to the fd this yields, read as it comes by :class:`walk.ContentParser`
        (bounded by what the disk, or the guest's RAM, holds) in a thread. What the parser refuses ends the read: the
        driver's next write fails and the run with it; the parser's error is the step's, unless the
        stream was only cut short (the VM died or never booted): then the run's own error is."""
        want = spec.get("annotations", {}).get(bundle.STORAGE_SIZE)
        if want:
            disk = int(want)
        elif vmdisk.parse_size(self.cfg.vm_storage_size):
            disk = vmdisk.storage_size(self.cfg.vm_storage_size, "vm_storage_size")
        else:  # the writable layer is a tmpfs in the guest's RAM
            disk = self.cfg.memory_mib << 20
        failed: list[BaseException] = []
        done = threading.Event()
        r, w = os.pipe2(os.O_CLOEXEC)
        stream = os.fdopen(r, "rb", buffering=0)
        parser = walk.ContentParser(stream.read, disk + walk.META_BYTES)

        def read() -> None:
            try:
                with stream:
                    skipped: set[str] = set()  # files left out: a hard link to one is too

                    def add(e: walk.ContentEntry) -> None:
                        buildlayer.add_upper(layer, e.path, e.mode, uid=e.uid, gid=e.gid, mtime=e.mtime_ns // 10**9,
                                             rdev=e.rdev, opaque=e.opaque, link=e.link, hardlink=e.hardlink,
                                             xattrs=e.xattrs, size=e.size, data=e.data, notice=notice,
                                             skipped=skipped)
                    pending: list[walk.ContentEntry] = []  # mount stubs, kept only if something under them is
                    for e in parser.entries():
                        while pending and not e.path.startswith(pending[-1].path + "/"):
                            skipped.add(pending.pop().path)
                        if e.path in stubs and (stat.S_ISDIR(e.mode) or (stat.S_ISREG(e.mode) and e.size == 0)):
                            pending.append(e)
                            continue
                        for p in pending:
                            add(p)
                        pending.clear()
                        add(e)
                    done.set()
            except BaseException as ex:  # noqa: BLE001 - handed to the build's thread, raised there
                failed.append(ex)
        reader = threading.Thread(target=read, name="layer-walk", daemon=True)
        reader.start()
        try:
            yield w
        except BuildError:
            raise  # the step's own failure: no walk came
        except VmrtError:
            os.close(w)  # the parser's end first: its error (if it stopped the run) is the one to tell
            w = -1
            reader.join()
            if not failed or parser.cut_short:
                raise  # the run failed before its walk came, or inside it (boot, the VM's death): its error
        finally:
            if w >= 0:
                os.close(w)
            reader.join()
        if failed:
            if isinstance(failed[0], VmrtError | OSError | tarfile.TarError):
                raise BuildError(f"the step's layer: {failed[0]}") from failed[0]
            raise failed[0]
        if not done.is_set():
            raise BuildError("the step's layer: the guest sent no walk")

    # --- COPY / ADD ----------------------------------------------------------------------------
    def _i_copy(self, stage: Stage, ins: df.Instruction) -> None:
        self._copy(stage, ins, add=False)

    def _i_add(self, stage: Stage, ins: df.Instruction) -> None:
        self._copy(stage, ins, add=True)

    def _copy(self, stage: Stage, ins: df.Instruction, *, add: bool) -> None:
        ins.check_flags({"from", "chown", "chmod", "link"} if not add else {"chown", "chmod", "link", "checksum"},
                        self.where)
        if len(ins.value) < 2:
            raise UsageError(f"{ins.cmd} requires at least two arguments, but only one was provided. "
                             "Destination could not be determined")
        env = self._env(stage)
        srcs = [df.word(s, env, self.escape) if not s.startswith("<<") else s for s in ins.value[:-1]]
        dest = df.word(ins.value[-1], env, self.escape)
        if not dest.startswith("/"):
            dest = os.path.join(stage.run.get("WorkingDir") or "/", dest) + ("/" if dest.endswith("/") else "")
        chown, chmod = ins.flag("chown"), ins.flag("chmod")
        uid, gid = self._chown(stage, df.word(chown, env, self.escape)) if chown else (0, 0)
        mode = None
        if chmod:
            if not re.fullmatch(r"[0-7]{3,4}", chmod):
                raise UsageError(f"invalid chmod parameter: {chmod!r} (an octal mode)")
            mode = int(chmod, 8)
        from_ref = ins.flag("from")
        urls = [s for s in srcs if re.match(r"https?://", s)]
        if urls and not add:
            raise UsageError(f"source can't be a URL for COPY: {urls[0]}")
        if urls:
            self._add_urls(stage, ins, srcs, dest, uid, gid, mode)
            return
        with self._source_root(stage, from_ref) as (root_fd, keep, owner):
            heredocs = {f"<<{h.name}": h for h in ins.heredocs}
            matched: list[str] = []
            for s in srcs:
                if s.startswith("<<"):
                    matched.append(s)
                    continue
                plain = os.path.normpath("/" + s).strip("/")
                found = buildlayer.glob(root_fd, s, keep) if df.has_glob(s) else (
                    [plain] if keep(plain) and safefs.stat_in_root(root_fd, plain or ".") is not None else [])
                if not found and not df.has_glob(s):
                    raise UsageError(f"failed to compute cache key: \"/{s.strip('/')}\" not found: "
                                     "not found in build context or excluded by .dockerignore")
                if not found:
                    raise UsageError(f"no source files were specified (nothing matches {s!r})")
                matched += found
            into_dir = dest.endswith("/") or self._is_dir(stage, dest)
            if len(matched) > 1 and not dest.endswith("/"):
                raise UsageError(f"When using {ins.cmd} with more than one source file, the destination must be "
                                 "a directory and end with a /")
            layer = buildlayer.LayerTar(self.store.tmp)
            try:
                notice: Callable[[str], None] = lambda m: self.say(inert(f"[Warning] {m}"))  # noqa: E731
                ou, og = (uid, gid) if chown or owner is None else (None, None)
                for rel in matched:
                    if rel in heredocs:
                        name = dest.rstrip("/") + "/" + heredocs[rel].name if into_dir else dest
                        self._parents(stage, layer, name)
                        ti = tarfile.TarInfo(name.strip("/"))
                        ti.mode, ti.uid, ti.gid = mode if mode is not None else 0o644, uid, gid
                        layer.add_data(ti, heredocs[rel].content.encode())
                        continue
                    if add and from_ref is None and buildlayer.is_archive(root_fd, rel):
                        self._parents(stage, layer, dest.rstrip("/") + "/x")
                        buildlayer.extract_archive(root_fd, rel, dest, layer, *((uid, gid) if chown else (None, None)))
                        continue
                    found_st = safefs.stat_in_root(root_fd, rel or ".")
                    is_dir = found_st is not None and (found_st.st_mode & 0o170000) == 0o040000
                    self._parents(stage, layer, dest.rstrip("/") + "/x" if into_dir and not is_dir else dest)
                    buildlayer.copy_source(root_fd, rel, dest, layer, into_dir=into_dir, uid=ou, gid=og,
                                           chmod=mode, keep=keep, notice=notice,
                                           dest_exists=is_dir and self._is_dir(stage, dest))
            except BaseException:
                layer.close()
                raise
        what = f"{ins.cmd} " + " ".join(f for f in ins.flags) + (" " if ins.flags else "") + \
            " ".join(srcs) + f" {dest}"
        digest = layer.meta.hexdigest()

        def make() -> Layer:
            try:
                return layer.store(self.store)
            finally:
                layer.close()
        try:
            self._layer_step(stage, what, digest, make)
        finally:
            layer.close()

    def _add_urls(self, stage: Stage, ins: df.Instruction, srcs: list[str], dest: str, uid: int, gid: int,
                  mode: int | None) -> None:
        """ADD URL... DEST: each downloaded (by the host, as Docker's daemon does) into the layer."""
        if len(srcs) > 1 and not dest.endswith("/"):
            raise UsageError("When using ADD with more than one source file, the destination must be a directory "
                             "and end with a /")
        if any(not re.match(r"https?://", s) for s in srcs):
            raise UsageError("ADD of URLs and local files together is not supported")
        checksum = ins.flag("checksum")
        if checksum is not None and len(srcs) > 1:
            raise UsageError("--checksum needs exactly one URL")
        into_dir = dest.endswith("/") or self._is_dir(stage, dest)
        layer = buildlayer.LayerTar(self.store.tmp)
        try:
            for url in srcs:
                target = (dest.rstrip("/") + "/" + buildlayer.url_name(url)) if into_dir else dest
                self._parents(stage, layer, target)
                buildlayer.download(url, target.strip("/"), layer, uid=uid, gid=gid, mode=mode, checksum=checksum,
                                    tmp_dir=self.store.tmp)
        except BaseException:
            layer.close()
            raise
        what = "ADD " + " ".join(ins.flags) + (" " if ins.flags else "") + " ".join(srcs) + f" {dest}"

        def make() -> Layer:
            return layer.store(self.store)
        try:
            self._layer_step(stage, what, layer.meta.hexdigest(), make)
        finally:
            layer.close()

    def _parents(self, stage: Stage, layer: buildlayer.LayerTar, path: str) -> None:
        """The directories above ``path`` in the layer: missing ones made 0755 root's; those the
        image has, with its mode, owner and time (as Docker's layers carry them: a layer that
        left one out would leave its unpacked directory's mode over the image's), except where
        the image's is a link (resolved by the image)."""
        parts = [p for p in path.split("/") if p][:-1]
        for k in range(1, len(parts) + 1):
            d = "/" + "/".join(parts[:k])
            if layer.has(d.strip("/")):
                continue
            ti = tarfile.TarInfo(d.strip("/"))
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 0
            if self._is_dir(stage, d):
                st = self._image_stat(stage, d, follow=False)
                if st is None or not stat.S_ISDIR(st.st_mode):
                    continue
                ti.mode, ti.uid, ti.gid, ti.mtime = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, int(st.st_mtime)
            layer.add(ti)

    def _layer_dirs(self, stage: Stage) -> list[Path]:
        return [self.store.unpacked_layer(d, i) for d, i in stage.layers]

    def _image_stat(self, stage: Stage, path: str, *, follow: bool = True) -> os.stat_result | None:
        """``path`` in the stage's image: the topmost layer that has it decides (each resolved
        inside its own layer)."""
        for layer in reversed(self._layer_dirs(stage)):
            s = safefs.stat_in_root(layer, path, follow=follow)
            if s is not None:
                return s
        return None

    def _is_dir(self, stage: Stage, path: str) -> bool:
        """Whether ``path`` is a directory in the stage's image."""
        s = self._image_stat(stage, path)
        return s is not None and stat.S_ISDIR(s.st_mode)

    def _chown(self, stage: Stage, spec: str) -> tuple[int, int]:
        """``--chown=user[:group]``: names from the stage's /etc/passwd and /etc/group; without a
        group the GID is the UID (as Docker documents)."""
        user, _, group = spec.partition(":")
        dirs = self._layer_dirs(stage)
        lookup = rootfs.LayeredRoot(dirs) if dirs else None
        roots = (lookup.pick("/etc/passwd"), lookup.pick("/etc/group")) if lookup else None

        def need_roots() -> tuple[Path, Path]:
            if roots is None:
                raise UsageError(f"unable to convert uid/gid chown string {spec!r}: no /etc/passwd or /etc/group")
            return roots
        uid = int(user) if user.isdigit() else bundle.resolve_user(need_roots(), user).uid
        if group:
            gid = int(group) if group.isdigit() else bundle.resolve_user(need_roots(), f"0:{group}").gid
        else:
            gid = uid
        if uid > 0xFFFFFFFE or gid > 0xFFFFFFFE:
            raise UsageError(f"--chown {spec!r} is out of range")
        return uid, gid

    def _from_stage(self, ref: str) -> Stage | None:
        """``--from=``'s stage: an earlier one by index or name; None: an image's reference."""
        if ref.isdigit():
            if int(ref) >= len(self.stages) - 1:
                raise UsageError(f"invalid from flag value {ref}: there is no stage {ref} before this one")
            return self.stages[int(ref)]
        return self._stage_named(ref)

    @contextlib.contextmanager
    def _source_root(self, stage: Stage, from_ref: str | None
                     ) -> Iterator[tuple[int, Callable[[str], bool], str | None]]:
        """Where COPY reads: the context (``.dockerignore`` applies), or an earlier stage's or an
        image's root, mounted read-only here for the step. The third item: None for the context
        (files become root's or --chown's), the stage otherwise (owners kept)."""
        if from_ref is None:
            yield self.ctx_fd, lambda rel: not self.ignore.excluded(rel), None
            return
        src = self._from_stage(from_ref)
        if src is not None:
            dirs = self._layer_dirs(src)
        else:
            img = runner.find_image(self.cfg, self.store, from_ref, "missing", self.opts.platform)
            dirs = img.layer_dirs()
        if not dirs:
            raise UsageError(f"--from={from_ref}: the stage has no files")
        target = self.cfg.run_root / "builds" / secrets.token_hex(8)
        fsmode.private_dir(target.parent)
        rootfs.mount_readonly(dirs, target)
        try:
            fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                yield fd, lambda rel: True, from_ref
            finally:
                os.close(fd)
        finally:
            rootfs.umount(target)
            with contextlib.suppress(OSError):
                target.rmdir()

    # --- the end ----------------------------------------------------------------------------------
    def forget_steps(self, keep: str | None) -> None:
        """The step images this build added, but for its result (and any tagged since). Not
        while another build or pull holds the store (forgetting waits for the store's exclusive
        lock): then they stay as dangling images, for ``vmrt image prune``."""
        if not self.made or self.made == [keep]:
            return
        with open(self.store.root / "gc.lock", "a", opener=fsmode.opener) as lk:
            try:
                fcntl.flock(lk, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                LOG.info("the store is busy: this build's %d step images stay until an image prune", len(self.made))
                return
            fcntl.flock(lk, fcntl.LOCK_UN)
        for image_id in self.made:
            if image_id == keep:
                continue
            with contextlib.suppress(VmrtError):
                if not self.store.get(image_id).tags:
                    self.store.delete_if_unused(image_id)


@contextlib.contextmanager
def _no_walk() -> Iterator[None]:
    yield None


def _rel(path: str) -> str:
    return os.path.normpath("/" + path).strip("/")


def _arg_decls(ins: df.Instruction, env: dict[str, str]) -> list[tuple[str, str | None]]:
    out = []
    for v in ins.value:
        name, eq, default = v.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise UsageError(f"invalid ARG name {name[:100]!r}")
        out.append((name, df.word(default, env) if eq else None))
    return out


def _directives(text: str) -> dict[str, str]:
    """The parser directives (``# name=value`` lines before anything else), names lower case."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = re.fullmatch(r"\s*#\s*(\w+)\s*=\s*(\S*)\s*", line)
        if not m:
            break
        out.setdefault(m[1].lower(), m[2])
    return out


def _escape_directive(text: str) -> str:
    esc = _directives(text).get("escape")
    return esc if esc in ("\\", "`") else "\\"


_DUR = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")


def _duration_ns(text: str, flag: str) -> int:
    units = {"ns": 1, "us": 1000, "µs": 1000, "ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}
    pos, total = 0, 0.0
    for m in _DUR.finditer(text):
        if m.start() != pos:
            break
        total += float(m[1]) * units[m[2]]
        pos = m.end()
    if pos != len(text) or not text:
        raise UsageError(f"invalid duration for --{flag}: {text!r}")
    return int(total)


# --- the cache ----------------------------------------------------------------------------------
def prune_cache(cfg: Config, *, prune_all: bool) -> tuple[list[str], int]:
    """``vmrt builder prune``: layers only the cache holds are collected (as ``image prune``
    collects), and the entries that named them go; with ``prune_all`` every entry goes. The
    entries removed and the bytes freed."""
    store = Store(cfg.root)
    freed = store.collect()
    cache = cfg.root / "builder" / "cache"
    gone = []
    for p in sorted(cache.iterdir()) if cache.is_dir() else ():
        try:
            layer = json.loads(p.read_text()).get("layer")
        except (OSError, ValueError, AttributeError):
            layer = None
        if prune_all or (layer is not None and not store.has_blob(str(layer[0].get("digest")))):
            p.unlink(missing_ok=True)
            gone.append(p.name)
    mounts = cfg.root / "builder" / "mounts"  # RUN --mount=type=cache dirs: all, but those a build holds
    for lock_path in sorted(mounts.glob("*.lock")) if mounts.is_dir() else ():
        with open(lock_path, "a", opener=fsmode.opener) as lk:
            try:
                fcntl.flock(lk, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            d = lock_path.with_suffix("")
            if d.is_dir() and not d.is_symlink():
                freed += _du(d)
                shutil.rmtree(d, ignore_errors=True)
                gone.append("cache-mount:" + d.name)
            # the lock file stays: unlinked, a build waiting on it would then hold a lock on a
            # name-less inode while the next one locks a new file of the same name
    return gone, freed


def _du(path: Path) -> int:
    """Bytes a directory tree holds (never following a link)."""
    total = 0
    for top, dirs, files in os.walk(path):
        for n in files + dirs:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(top, n)).st_blocks * 512
    return total


def cache_records(cfg: Config) -> list[dict[str, Any]]:
    """The build cache as ``docker system df`` lists it (``BuildCache``): one record per step that
    made a layer still stored; ``Shared`` when an image holds that layer too."""
    store = Store(cfg.root)
    cache = cfg.root / "builder" / "cache"
    held = {d["digest"] for img in store.images() for d in img.layers} if cache.is_dir() else set()
    out = []
    for p in sorted(cache.iterdir()) if cache.is_dir() else ():
        try:
            entry = json.loads(p.read_text())
            desc = entry["layer"][0] if entry.get("layer") else None
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            continue
        if not isinstance(desc, dict) or not store.has_blob(str(desc.get("digest"))):
            continue
        when = str(entry.get("created", ""))
        out.append({"ID": p.name[:25], "Parents": [], "Type": "regular", "Description": "a build step's layer",
                    "InUse": False, "Shared": desc["digest"] in held, "Size": int(desc.get("size") or 0),
                    "CreatedAt": when, "LastUsedAt": when, "UsageCount": 1})
    mounts = cfg.root / "builder" / "mounts"
    for d in sorted(mounts.iterdir()) if mounts.is_dir() else ():
        if d.suffix == ".lock" or d.is_symlink() or not d.is_dir():
            continue
        when = dt.datetime.fromtimestamp(d.stat().st_mtime, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        out.append({"ID": d.name[:25], "Parents": [], "Type": "exec.cachemount",
                    "Description": "a RUN --mount=type=cache dir", "InUse": False, "Shared": False,
                    "Size": _du(d), "CreatedAt": when, "LastUsedAt": when, "UsageCount": 1})
    return out


# --- the command ---------------------------------------------------------------------------------
class _ContextTar(tarfile.TarFile):
    """A context archive read as a stream (never whole in memory), its files written sparse:
    a run of zeros becomes a hole, so a big sparse file (a disk image) costs no disk either;
    its members' sizes together at most ``limit`` bytes."""

    limit = 0
    total = 0
    _zeros = bytes(buildlayer.CHUNK)

    def next(self) -> tarfile.TarInfo | None:
        ti = super().next()
        if ti is not None:
            self.total += max(ti.size, 0)
            if self.total > self.limit:
                raise ContextTooLarge(f"the build context is larger than build_context_max "
                                      f"({self.limit / (1 << 30):.1f} GiB, {self.limit} bytes)")
        return ti

    def makefile(self, tarinfo: tarfile.TarInfo,
                 targetpath: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> None:
        if tarinfo.sparse is not None:
            super().makefile(tarinfo, targetpath)
            return
        source = self.fileobj
        assert source is not None
        source.seek(tarinfo.offset_data)
        with open(targetpath, "wb", buffering=0) as target:
            left = tarinfo.size
            while left:
                chunk = source.read(min(left, buildlayer.CHUNK))
                if not chunk:
                    raise tarfile.ReadError("unexpected end of data")
                if chunk == self._zeros[:len(chunk)]:
                    target.seek(len(chunk), os.SEEK_CUR)
                else:
                    target.write(chunk)
                left -= len(chunk)
            target.truncate(tarinfo.size)


class ContextTooLarge(UsageError):
    """A context over ``build_context_max`` (docker build's failures exit 1)."""

    exit_code = 1


def _stdin_context(tmp: Path, limit: int) -> Path:
    """``vmrt build -``: the context as a tar archive on stdin, unpacked privately as it comes
    (tarfile's data filter: no absolute names, no ``..``, no links out, no devices)."""
    ctx = tmp / "context"
    ctx.mkdir(mode=0o700)
    try:
        # the limit is the class's: opening a stream reads (and counts) the first member already
        limited: type[_ContextTar] = type("_LimitedContextTar", (_ContextTar,), {"limit": limit})
        with limited.open(fileobj=sys.stdin.buffer, mode="r|*") as tf:
            tf.extractall(ctx, filter=_context_filter)
    except tarfile.FilterError as e:
        raise UsageError(f"the build context on stdin has an unsafe entry: {str(e)[:300]}") from e
    except (tarfile.TarError, OSError) as e:
        raise UsageError(f"the build context on stdin is not a tar archive: {str(e)[:300]}") from e
    return ctx


def _context_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    """tarfile's data filter, but a directory keeps its mode (less setuid/setgid/sticky and
    group/other write, as the filter treats files): the data filter leaves it to the umask
    (vmrt's 077), and COPY of a directory would make it 0700 in the image.

    A symbolic link keeps its target, wherever it points, as in a directory context (docker's
    CLI sends links as links): the build never follows one out of the context (COPY resolves
    in its root), and the data filter's realpath check still refuses any later entry, or hard
    link, that would be written or linked through it."""
    if member.issym():
        checked = tarfile.data_filter(member.replace(linkname=".", deep=False), dest)
        return None if checked is None else checked.replace(linkname=member.linkname, deep=False)
    new = tarfile.data_filter(member, dest)
    if new is not None and new.isdir():
        new = new.replace(mode=member.mode & 0o755, deep=False)
    return new


def build(cfg: Config, opts: Options, out: Callable[[str], None]) -> str:
    """``vmrt build``: the image's ID (printed by the caller; the progress went to ``out``)."""
    if opts.isolation not in ("process", "vm"):
        raise UsageError(f"invalid --isolation {opts.isolation!r}: use process or vm")
    for t in opts.tags:
        if reference.parse(t).digest:
            raise UsageError(f"invalid tag {t!r}: a tag cannot hold a digest")
    tags = [str(reference.parse(t)) for t in opts.tags]
    if opts.context is None and opts.dockerfile == "-":
        raise UsageError("invalid argument: can't use stdin for both build context and dockerfile")
    with tempfile.TemporaryDirectory(prefix="vmrt-build-") as tmpd:
        context = opts.context if opts.context is not None else _stdin_context(Path(tmpd), cfg.build_context_max)
        if not context.is_dir():
            raise UsageError(f"unable to prepare context: path {str(context)!r} not found")
        dfile = opts.dockerfile
        where = Path(dfile).name if dfile and dfile != "-" else "Dockerfile"
        if dfile == "-":
            text = df.decode(sys.stdin.buffer.read(df.MAX_BYTES + 1), where)
        else:
            path = df.locate(context, dfile)
            try:
                with open(path, "rb") as f:
                    data = f.read(df.MAX_BYTES + 1)
            except OSError as e:
                raise UsageError(f"unable to read the Dockerfile {str(path)!r}: {e.strerror}") from e
            text = df.decode(data, where)
        b = Builder(cfg, opts, out)
        b.where = where
        result = None
        try:
            with b.store.writing():  # no collection while the build's layers belong to no image yet
                result = b.build(context, text)
                for t in tags:
                    b.store.tag(t, result)
        finally:
            b.forget_steps(result)
    out(f"Successfully built {_short(result)}")
    for t in opts.tags:
        out(f"Successfully tagged {reference.parse(t).familiar()}")
    if opts.iidfile is not None:
        opts.iidfile.write_text(result)
    return result
