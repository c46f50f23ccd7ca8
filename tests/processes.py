"""The local processes of a stage run's Ray jobs, found by the ticket that every process of such a job has in
its environment (``ALIGN_TICKET``, from the job's runtime env)."""

from __future__ import annotations

import psutil


def job_processes(stage_run_id: str) -> list[tuple[psutil.Process, str, str]]:
    """(process, command line, ticket) of every process whose ticket names ``stage_run_id``."""
    found = []
    for process in psutil.process_iter(["cmdline", "environ"]):
        try:
            cmdline = " ".join(process.info["cmdline"] or [])
            ticket = (process.info["environ"] or {}).get("ALIGN_TICKET") or ""
        except (psutil.Error, TypeError):
            continue
        if stage_run_id in ticket:
            found.append((process, cmdline, ticket))
    return found
