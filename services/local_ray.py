"""The embedded Ray of ``align serve``: a single-node cluster that belongs to this service alone.

Two services on one host must never share a cluster. Ray's "auto" address resolves to the newest
cluster on the host (through ``/tmp/ray/ray_current_cluster``), so a second ``align serve`` used to
capture the stages of the first. Here each service starts its head with ``ray start --head --block``
as a child process, with its own temp dir and explicit free ports; the head writes its address into
that temp dir, where the Jobs API's supervisor looks it up, and the dispatcher pins the GCS address in
every job's runtime env (``ALIGN_RAY_CLUSTER``, read by ``workers.entrypoint``).

A start that fails (the dashboard sometimes does not come up under load) is retried on fresh ports;
after the last attempt :class:`LocalRayError` says in one line what happened and what to do.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from align.ports import free_port

START_ATTEMPTS = 3
START_TIMEOUT_SECONDS = 90.0
STOP_TIMEOUT_SECONDS = 30.0
CLUSTER_ENV_VAR = "ALIGN_RAY_CLUSTER"
"""The GCS address (``host:port``) a job's entrypoint must join; set in every job's runtime env."""
PORT_FLAGS = ("port", "dashboard-port", "node-manager-port", "object-manager-port", "ray-client-server-port",
              "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
              "metrics-export-port")


class LocalRayError(RuntimeError):
    """The local Ray did not start; the message is one line that says what to do."""


@dataclass
class LocalRay:
    """A running head started by :func:`start`; :meth:`stop` ends it and every process it started."""

    process: subprocess.Popen
    temp_dir: Path
    ports: dict[str, int]
    log_path: Path
    stopped: bool = field(default=False, init=False)

    @property
    def gcs_address(self) -> str:
        """``host:port`` of the head's GCS, as the head wrote it into its own temp dir."""
        return _cluster_file(self.temp_dir).read_text().strip()

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard-port']}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """SIGTERM the head's process group, then SIGKILL what is left of it.

        ``ray start --block`` leads a session of its own, and the head's processes (GCS, raylet,
        dashboard) are in its group. The leader stops them on SIGTERM before it exits, but it may have
        exited already (a failed start, a dead raylet) or may not finish in ``timeout``: whatever of
        the group is left then is killed. (Ray's workers have groups of their own; the raylet ends
        them.) A second call does nothing: the group's id may belong to someone else by then.
        """
        if self.stopped:
            return
        self.stopped = True
        group = self.process.pid  # start_new_session: the leader's pid is the group's id
        _signal_group(group, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        _signal_group(group, signal.SIGKILL)
        self.process.wait()


def temp_dir_for(home: Path) -> Path:
    """A short temp dir unique to ``home`` (the service's ALIGN_HOME).

    Ray puts unix sockets under ``<temp dir>/session_<date>_<pid>/sockets/``, and a socket path must
    stay under ~107 bytes, so the dir lives under /tmp with a name derived from the home folder.
    """
    digest = hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:12]
    return Path("/tmp") / f"align-ray-{digest}"


def start(home: Path, num_cpus: int | None = None, attempts: int = START_ATTEMPTS,
          timeout: float = START_TIMEOUT_SECONDS, pick_ports=None) -> LocalRay:
    """Start this service's own Ray head; retried on fresh ports, :class:`LocalRayError` after ``attempts``.

    ``pick_ports(attempt)`` gives the ports of one attempt (default: free ports on 127.0.0.1).
    """
    temp_dir = temp_dir_for(home)
    logs = home / "ray"
    logs.mkdir(parents=True, exist_ok=True)
    pick_ports = pick_ports or (lambda _attempt: {flag: free_port() for flag in PORT_FLAGS})
    failures: list[str] = []
    for attempt in range(1, attempts + 1):
        ports = pick_ports(attempt)
        log_path = logs / f"start-{attempt}.log"
        # The temp dir is the same on every start: an address left by an earlier head must not pass for ours.
        _cluster_file(temp_dir).unlink(missing_ok=True)
        process = _launch(temp_dir, ports, num_cpus, log_path)
        ray = LocalRay(process, temp_dir, ports, log_path)
        problem = _wait_until_up(ray, timeout)
        if problem is None:
            return ray
        ray.stop()
        failures.append(f"attempt {attempt}: {problem} (log: {log_path})")
    raise LocalRayError(
        f"the local Ray did not start ({attempts} tries; last: {failures[-1]}); free some memory and CPU "
        "and run `align serve` again, or set ALIGN_RAY_ADDRESS to a running cluster's jobs API"
    )


def _launch(temp_dir: Path, ports: dict[str, int], num_cpus: int | None, log_path: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
               f"--temp-dir={temp_dir}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
               "--disable-usage-stats", *(f"--{flag}={port}" for flag, port in ports.items())]
    if num_cpus is not None:
        command.append(f"--num-cpus={num_cpus}")
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))
    # Stopping the service stops its stages anyway (the dispatcher retries them): no 30 s drain.
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    env.pop("RAY_ADDRESS", None)  # a head of its own, whatever the caller's environment names
    # The head's processes find this interpreter's packages (the workers run `<python> -m workers...`).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    with open(log_path, "wb") as log:
        # Its own session: a Ctrl-C at the terminal reaches the service, which then stops the head.
        # preexec_fn only makes one foreign call, to a libc loaded beforehand.
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, preexec_fn=_die_with_parent, start_new_session=True)  # noqa: PLW1509


def _cluster_file(temp_dir: Path) -> Path:
    """Where the head writes its GCS address (``host:port``)."""
    return temp_dir / "ray_current_cluster"


def _signal_group(group: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # nothing of the group is left
        os.killpg(group, signum)


_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the service dies, so no orphaned cluster stays behind."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _wait_until_up(ray: LocalRay, timeout: float) -> str | None:
    """None once the head's Jobs API answers and the head wrote its own GCS address (the port we gave
    it), else why not: the start exited, or it took too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not ray.alive():
            return f"`ray start` exited with {ray.process.returncode}: {_last_error(ray.log_path)}"
        try:
            with urllib.request.urlopen(f"{ray.dashboard_url}/api/version", timeout=2) as answer:
                up = answer.status == 200
            if up and _names_port(_cluster_file(ray.temp_dir), ray.ports["port"]):
                return None
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return f"its jobs API at {ray.dashboard_url} did not answer in {timeout:.0f} s"


def _names_port(cluster_file: Path, port: int) -> bool:
    """Whether ``cluster_file`` holds an address ``host:<port>`` (False while it does not exist yet)."""
    try:
        return cluster_file.read_text().strip().rpartition(":")[2] == str(port)
    except FileNotFoundError:
        return False


def _last_error(log_path: Path) -> str:
    """The most telling line of a failed start's log (Ray prints a long traceback)."""
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    for marker in ("Failed to start the dashboard", "Error", "error"):
        found = [line for line in lines if marker in line]
        if found:
            return found[-1][:200]
    return lines[-1][:200] if lines else "no output"
