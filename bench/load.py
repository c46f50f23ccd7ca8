"""The API under load: ``POST /jobs`` and ``GET /jobs/{id}`` throughput and latency, on SQLite and on Postgres.

For each database the script starts the API alone (uvicorn, one process, no dispatcher) on a fresh, migrated
database, times the first ``POST /jobs`` after start on its own, then drives the API from a second process
on loopback: ``--concurrency`` requests in flight (httpx, asyncio), each phase bounded by ``--requests``
and ``--seconds``. It prints requests/s, p50 and p99 per phase, and how many answers were not 2xx::

    .venv/bin/python bench/load.py                       # both databases
    .venv/bin/python bench/load.py --databases postgres --profile load-post.txt

Beside each phase it prints the server process's CPU time per request (its own, not the database's):
1000 over it is what one core could serve with nothing else running. ``--profile FILE`` samples the server
with py-spy during the ``POST`` phase (all threads: sync routes run in a thread pool) and writes its flat
top functions to FILE. Postgres: ``ALIGN_BENCH_POSTGRES_URL``, default
``postgresql://postgres@127.0.0.1:5432/postgres`` (a database is created there and dropped afterwards).
Figures on a shared machine are rough: the driver, the server and the database compete for the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

REPO = harness.REPO
API_KEY = "align_bench_" + secrets.token_hex(8)
POSTGRES_ADMIN = os.environ.get("ALIGN_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def job_spec(data: Path, index: int) -> dict:
    return {"name": f"load-{index}", "base_model": "builtin:tiny",
            "stages": [{"type": "sft", "data": {"path": str(data / "sft.jsonl")}, "max_steps": 2},
                       {"type": "dpo", "data": {"path": str(data / "prefs.jsonl")}, "max_steps": 2}]}


# --- the driver (second process) --------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


async def drive(base: str, key: str, data: Path, which: str, concurrency: int, count: int, seconds: float) -> dict:
    """One phase: ``post`` creates jobs; ``get`` reads the jobs the first page of ``GET /jobs`` lists."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=60) as client:

        async def post(index: int) -> int:
            return (await client.post("/jobs", json=job_spec(data, index))).status_code

        if which == "post":
            return await phase(post, concurrency, count, seconds)
        job_ids = [job["id"] for job in (await client.get("/jobs", params={"limit": 100})).json()["data"]]

        async def get(index: int) -> int:
            return (await client.get(f"/jobs/{job_ids[index % len(job_ids)]}")).status_code

        return await phase(get, concurrency, count, seconds)


async def phase(call, concurrency: int, count: int, seconds: float) -> dict:
    """Run ``call(i)`` with ``concurrency`` in flight until ``count`` calls or ``seconds`` have passed."""
    latencies: list[float] = []
    failures: dict[str, int] = {}
    next_index = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal next_index
        while next_index < count and time.perf_counter() < deadline:
            index, next_index = next_index, next_index + 1
            started = time.perf_counter()
            try:
                status = await call(index)
            except Exception as error:  # a refused or timed-out connection counts as a failure, not a crash
                status = type(error).__name__
            latencies.append(time.perf_counter() - started)
            if not (isinstance(status, int) and status < 300):
                failures[str(status)] = failures.get(str(status), 0) + 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {"requests": len(latencies), "seconds": elapsed, "per_second": len(latencies) / elapsed,
            "p50_ms": 1000 * percentile(latencies, 0.50), "p99_ms": 1000 * percentile(latencies, 0.99),
            "failures": failures}


# --- the parent: databases and the server ------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_database(kind: str, work: Path) -> tuple[str, str | None]:
    """A migrated, empty database: (url, Postgres database to drop afterwards or None)."""
    from sqlalchemy import create_engine, text

    from services.db.session import normalize_url, upgrade

    if kind == "sqlite":
        url = f"sqlite:///{work / 'align.db'}"
        upgrade(url)
        return url, None
    name = f"align_bench_{secrets.token_hex(4)}"
    admin = create_engine(normalize_url(POSTGRES_ADMIN), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = POSTGRES_ADMIN.rsplit("/", 1)[0] + "/" + name
    upgrade(url)
    return url, name


def drop_database(name: str) -> None:
    from sqlalchemy import create_engine, text

    from services.db.session import normalize_url

    admin = create_engine(normalize_url(POSTGRES_ADMIN), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def start_server(url: str, work: Path, data: Path, port: int) -> tuple[subprocess.Popen, float]:
    """uvicorn with the API alone; returns the process and the seconds until ``/healthz`` answered."""
    import httpx

    env = harness.child_environment(threads=1)
    env.update(ALIGN_DATABASE_URL=url, ALIGN_RUN_DISPATCHER="false", ALIGN_BOOTSTRAP_API_KEY=API_KEY,
               ALIGN_REPORT_SECRET="bench", ALIGN_ARTIFACT_ROOT=str(work / "artifacts"),
               ALIGN_WORK_ROOT=str(work / "work"), ALIGN_DATA_ROOTS=json.dumps([str(data)]),
               ALIGN_MODEL_ROOTS=json.dumps([str(work)]))
    command = [sys.executable, "-m", "uvicorn", "--factory", "services.app:create_app", "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning", "--no-access-log"]
    started = time.perf_counter()
    server = subprocess.Popen(command, env=env, cwd=work, stdout=subprocess.DEVNULL,
                              stderr=(work / "server.log").open("w"))
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the API exited: {(work / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return server, time.perf_counter() - started
        except httpx.HTTPError:
            time.sleep(0.2)


def first_post(base: str, data: Path) -> float:
    import httpx

    started = time.perf_counter()
    response = httpx.post(f"{base}/jobs", json=job_spec(data, -1), headers={"Authorization": f"Bearer {API_KEY}"},
                          timeout=120)
    assert response.status_code == 201, response.text
    return time.perf_counter() - started


def profile(pid: int, seconds: float, output: Path) -> subprocess.Popen:
    """py-spy over every thread of ``pid`` for ``seconds``; a flat profile in ``output``."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    raw = output.with_suffix(".folded")
    return subprocess.Popen([py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
                             "--format", "raw", "--output", str(raw), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize_profile(raw: Path, output: Path, top: int = 40) -> None:
    """Folded stacks to two flat tables: where samples were (self) and what they were under (total)."""
    own: dict[str, int] = {}
    under: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [frame for frame in stack.split(";") if frame]
        if not frames or not count.isdigit():
            continue
        samples, total = int(count), total + int(count)
        own[frames[-1]] = own.get(frames[-1], 0) + samples
        for frame in set(frames):
            under[frame] = under.get(frame, 0) + samples
    lines = [f"{total} samples over all threads (idle pool threads included)", "", "self:"]
    lines += [f"{100 * n / total:6.1f}%  {frame}" for frame, n in sorted(own.items(), key=lambda x: -x[1])[:top]]
    lines += ["", "total (the frame or anything it called):"]
    lines += [f"{100 * n / total:6.1f}%  {frame}" for frame, n in sorted(under.items(), key=lambda x: -x[1])[:top]]
    output.write_text("\n".join(lines) + "\n")


def run_database(kind: str, args, root: Path) -> dict:
    work = root / kind
    data = work / "data"
    data.mkdir(parents=True)
    sft = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (data / "sft.jsonl").write_text((json.dumps(sft) + "\n") * 8)
    (data / "prefs.jsonl").write_text((json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n") * 8)
    url, dropped = make_database(kind, work)
    port = free_port()
    server, start_seconds = start_server(url, work, data, port)
    base = f"http://127.0.0.1:{port}"
    try:
        result = {"start_s": start_seconds, "first_post_s": first_post(base, data)}
        spy = profile(server.pid, args.seconds, Path(args.profile)) if args.profile else None
        for which in ("post", "get"):
            # The server's own CPU time per request: what one core could serve with nothing else on it.
            before = psutil.Process(server.pid).cpu_times()
            command = [sys.executable, str(Path(__file__).resolve()), "--drive", base, API_KEY, str(data), which,
                       str(args.concurrency), str(args.requests), str(args.seconds)]
            driven = subprocess.run(command, env=harness.child_environment(threads=1), capture_output=True,
                                    text=True, check=True)
            after = psutil.Process(server.pid).cpu_times()
            result[which] = json.loads(driven.stdout)
            used = (after.user - before.user) + (after.system - before.system)
            result[which]["server_cpu_ms"] = 1000 * used / max(1, result[which]["requests"])
        if spy is not None:
            spy.wait(args.seconds + 30)
            summarize_profile(Path(args.profile).with_suffix(".folded"), Path(args.profile))
        return result
    finally:
        server.terminate()
        server.wait(30)
        if dropped:
            drop_database(dropped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--databases", nargs="+", default=["sqlite", "postgres"], choices=["sqlite", "postgres"])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2000, help="per phase, at most")
    parser.add_argument("--seconds", type=float, default=20.0, help="per phase, at most")
    parser.add_argument("--profile", help="write py-spy's flat profile of the POST phase here")
    parser.add_argument("--drive", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        base, key, data, which, concurrency, count, seconds = args.drive
        print(json.dumps(asyncio.run(drive(base, key, Path(data), which, int(concurrency), int(count),
                                           float(seconds)))))
        return
    print(f"{harness.machine()}; load average {os.getloadavg()[0]:.1f} at start")
    print(f"concurrency {args.concurrency}, each phase at most {args.requests} requests or {args.seconds:g} s")
    with tempfile.TemporaryDirectory(prefix="align-load-") as root:
        for kind in args.databases:
            result = run_database(kind, args, Path(root))
            print(f"\n{kind}: API up in {result['start_s']:.1f} s; first POST /jobs {result['first_post_s']:.2f} s")
            for name in ("post", "get"):
                if name in result:
                    row = result[name]
                    label = "POST /jobs     " if name == "post" else "GET /jobs/{id} "
                    print(f"  {label} {row['requests']:6d} in {row['seconds']:5.1f} s  {row['per_second']:7.1f}/s  "
                          f"p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  "
                          f"server CPU {row['server_cpu_ms']:5.1f} ms/request  not 2xx: {row['failures'] or 0}")
    print(f"\nload average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
