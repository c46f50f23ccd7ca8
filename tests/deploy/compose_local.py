"""Runs the services of a compose file as local processes, as Compose would run their containers, without Docker.

What Compose does and this does too:
- `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`, `${VAR?error}`, `${VAR:+alt}` and `$$` are
  interpolated from the env file (`.env`), which the caller's ``overrides`` beat, as the shell's variables do;
- a container's environment is the image's `ENV`, then `env_file`, then `environment`;
- a string `command` is split like a shell's words, not run by a shell; `CMD` checks are run directly,
  `CMD-SHELL` checks by `sh -c`;
- services start in `depends_on` order, each waiting for its conditions (`service_started`, `service_healthy`,
  `service_completed_successfully`); `deploy.replicas` processes per service; profiles are left out.

What stands in for containers:
- a service's host name is 127.0.0.1, and each port it `expose`s is a free local port (``ports``), written
  into every `host:port` that names it and into the service's own command, check and environment;
- `0.0.0.0` binds 127.0.0.1;
- a volume's mount point is a local folder (``volumes``), written into every path under it;
- each container's `/tmp` is a folder of its own (``RAY_TMPDIR`` and ``TMPDIR`` point there), as Ray keeps
  its session and cluster address there;
- ``external`` services (Postgres: the machine's server) are not started; their checks still run.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml
from dotenv import dotenv_values

_VARIABLE = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_]\w*))")


def interpolate(text: str, variables: dict[str, str]) -> str:
    """One string, interpolated as the compose specification says."""

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        if match.group("plain"):
            return variables.get(match.group("plain"), "")
        expression = match.group("braced")
        name, operator, argument = re.fullmatch(r"(\w+)(:?[-?+]|)(.*)", expression, re.S).groups()
        value, empty_counts = variables.get(name), operator.startswith(":")
        missing = value is None or (empty_counts and value == "")
        if operator.endswith("-"):
            return interpolate(argument, variables) if missing else value
        if operator.endswith("?"):
            if missing:
                raise ValueError(f"${{{expression}}}: {argument or name + ' is required'}")
            return value
        if operator.endswith("+"):
            return "" if missing else interpolate(argument, variables)
        return value or ""

    return _VARIABLE.sub(substitute, text)


def _interpolate_tree(node, variables: dict[str, str]):
    if isinstance(node, str):
        return interpolate(node, variables)
    if isinstance(node, list):
        return [_interpolate_tree(item, variables) for item in node]
    if isinstance(node, dict):
        return {key: _interpolate_tree(value, variables) for key, value in node.items()}
    return node


def _words(command) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(word) for word in command]


def _environment(section) -> dict[str, str]:
    if isinstance(section, list):
        return dict(item.split("=", 1) for item in section)
    return {key: "" if value is None else str(value) for key, value in (section or {}).items()}


@dataclass
class Process:
    service: str
    popen: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class ComposeStack:
    """``compose_file`` with ``env_file`` as its `.env`; ``image_env`` is the image's `ENV`; ``external``
    services are already running; ``path`` is prepended to every process's PATH (where `align`, `ray` and
    `python` are installed)."""

    compose_file: Path
    env_file: Path
    root: Path
    image_env: dict[str, str]
    volumes: dict[str, Path]
    ports: dict[tuple[str, int], int]
    external: set[str]
    overrides: dict[str, str] = field(default_factory=dict)
    path: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: list[Process] = field(default_factory=list)
    tmp_dirs: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.variables = {k: v or "" for k, v in dotenv_values(self.env_file).items()} | self.overrides
        self.spec = _interpolate_tree(yaml.safe_load(self.compose_file.read_text()), self.variables)
        self.services = {name: s for name, s in self.spec["services"].items() if not s.get("profiles")}

    # -- what each service becomes here ------------------------------------------------------------------
    def local(self, service: str, text: str) -> str:
        """``text`` with host names, the service's own ports, bind-all addresses and volume paths made local."""
        for (name, port), local_port in self.ports.items():
            text = re.sub(rf"\b{re.escape(name)}:{port}\b", f"127.0.0.1:{local_port}", text)
            if name == service:
                text = re.sub(rf"(?<![\d.]){port}(?!\d)", str(local_port), text)
        text = text.replace("0.0.0.0", "127.0.0.1")
        for mount in self.spec["services"][service].get("volumes", []):
            volume, _, target = mount.partition(":")
            text = re.sub(rf"(?<![\w/]){re.escape(target)}(?=/|$|[\s\"',\]])", str(self.volumes[volume]), text)
        return text

    def environment(self, service: str) -> dict[str, str]:
        spec = self.services[service]
        env = dict(self.image_env)
        for entry in spec.get("env_file", []):
            path = entry["path"] if isinstance(entry, dict) else entry
            file = self.compose_file.parent / path
            env |= {k: v or "" for k, v in dotenv_values(file if file.name != ".env" else self.env_file).items()}
        env |= _environment(spec.get("environment"))
        env = {key: self.local(service, value) for key, value in env.items()}
        if service not in self.tmp_dirs:  # under /tmp, short: Ray's socket paths must stay under 107 bytes
            self.tmp_dirs[service] = Path(tempfile.mkdtemp(prefix=f"{service[:8]}-", dir="/tmp"))
        tmp = self.tmp_dirs[service]
        base = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "USER", "LOGNAME")}
        return base | self.extra_env | env | {"PATH": f"{self.path}{os.pathsep}{os.environ['PATH']}",
                                              "RAY_TMPDIR": str(tmp), "TMPDIR": str(tmp)}

    def command(self, service: str) -> list[str]:
        return [self.local(service, word) for word in _words(self.services[service]["command"])]

    # -- running -------------------------------------------------------------------------------------------
    def start_order(self) -> list[str]:
        order: list[str] = []

        def visit(name: str, seen: tuple[str, ...] = ()) -> None:
            assert name not in seen, f"depends_on cycle: {' -> '.join((*seen, name))}"
            for dependency in self.services[name].get("depends_on", {}):
                visit(dependency, (*seen, name))
            if name not in order:
                order.append(name)

        for name in self.services:
            visit(name)
        return order

    def start(self, service: str) -> list[Process]:
        replicas = int(self.services[service].get("deploy", {}).get("replicas", 1))
        started = []
        for replica in range(1, replicas + 1):
            log = self.root / f"{service}-{replica}.log"
            with open(log, "wb") as out:
                popen = subprocess.Popen(self.command(service), env=self.environment(service), cwd=self.root,
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
            started.append(Process(service, popen, log))
        self.processes += started
        return started

    def healthy(self, service: str) -> bool:
        check = self.services[service].get("healthcheck")
        assert check, f"{service} has no healthcheck, yet a service waits for it to be healthy"
        kind, *words = check["test"] if isinstance(check["test"], list) else ["CMD-SHELL", check["test"]]
        env = self.environment(service)
        command = ["sh", "-c", self.local(service, words[0])] if kind == "CMD-SHELL" else [
            self.local(service, w) for w in words]
        result = subprocess.run(command, env=env, capture_output=True, timeout=30, check=False)
        return result.returncode == 0

    def wait_for(self, service: str, condition: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        mine = [p for p in self.processes if p.service == service]
        while time.monotonic() < deadline:
            for process in mine:
                code = process.popen.poll()
                if condition == "service_completed_successfully" and code is not None:
                    assert code == 0, f"{service} exited {code}:\n{process.output()[-4000:]}"
                elif code is not None:
                    raise AssertionError(f"{service} exited {code}:\n{process.output()[-4000:]}")
            if condition == "service_completed_successfully" and all(p.popen.poll() == 0 for p in mine):
                return
            if condition == "service_healthy" and self.healthy(service):
                return
            if condition == "service_started":
                return
            time.sleep(1)
        logs = "\n".join(p.output()[-3000:] for p in mine)
        raise AssertionError(f"{service} not {condition} after {timeout:.0f} s:\n{logs}")

    def up(self, timeout: float = 180) -> dict[str, float]:
        """Start every service in order, each after its dependencies met their conditions; returns the
        seconds each service took until it was ready."""
        timings = {}
        for service in self.start_order():
            for dependency, rule in self.services[service].get("depends_on", {}).items():
                self.wait_for(dependency, rule.get("condition", "service_started"), timeout)
            begun = time.monotonic()
            if service in self.external:
                self.wait_for(service, "service_healthy", timeout)
            else:
                self.start(service)
                if not self.services[service].get("healthcheck", {"disable": True}).get("disable"):
                    self.wait_for(service, "service_healthy", timeout)
            timings[service] = round(time.monotonic() - begun, 1)
        return timings

    def down(self, timeout: float = 30) -> None:
        """SIGTERM every process started (and everything they started, found before the first signal),
        then SIGKILL what is left; no process of the stack outlives this."""
        family = []
        for process in self.processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                family += psutil.Process(process.popen.pid).children(recursive=True)
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.popen.pid, signal.SIGTERM)
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.popen.wait(timeout)
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.popen.pid, signal.SIGKILL)
            process.popen.wait()
        family += [p for p in psutil.process_iter(["cmdline"])
                   if any(str(tmp) in arg for tmp in self.tmp_dirs.values() for arg in (p.info["cmdline"] or []))]
        _, alive = psutil.wait_procs(family, timeout=5)
        for leftover in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                leftover.kill()
        psutil.wait_procs(alive, timeout=10)
        for tmp in self.tmp_dirs.values():
            shutil.rmtree(tmp, ignore_errors=True)
