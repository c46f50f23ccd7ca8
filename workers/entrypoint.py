"""One stage attempt on Ray: ``python -m workers.entrypoint`` with the ticket in env ALIGN_TICKET.

The ticket is the attempt's :class:`~align.stage_launch.StageLaunch` as JSON, read once here.

The dispatcher submits this as a Ray job. It checks the stage's spec and data, tells the service it
started (a 409 here stops it before any compute), sends heartbeats from a thread for the whole attempt
(:mod:`workers.liveness`; a worker group that waits for resources past the schedule deadline fails the
attempt with ``unschedulable``), runs the stage on a Ray Train ``TorchTrainer``
(one rank per worker, see :mod:`workers.train_func`) and exits 0 once rank 0 has reported the artifact.
On an error it sends a "failed" report and exits 1; fenced off by the service (or its report token
expired) it exits 3 silently.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from pydantic import ValidationError

from align.stage_launch import StageLaunch
from workers.liveness import Liveness, PlacementWatch
from workers.report import Fenced, Reporter

logger = logging.getLogger("workers.entrypoint")

TICKET_ENV = "ALIGN_TICKET"
EXIT_FAILED = 1
EXIT_BAD_TICKET = 2
EXIT_FENCED = 3
# Environment the training ranks need wherever Ray places them: caches and compiled-op locations.
PASSED_ENV = (
    "ALIGN_CACHE_DIR", "TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR", "TOKENIZERS_PARALLELISM", "HF_HOME",
    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
)
# Ray Train settings this entrypoint starts with unless its environment sets them (Ray Train passes them on
# from here to its controller and workers). The controller polls the ranks every 0.5 s instead of 2 s, so
# an attempt ends soon after its ranks do. The preemption watcher, one more actor process per attempt,
# only logs node drains and records them for ``ray.train.get_preemption_info``, which align never reads:
# a preempted rank fails the attempt, and the dispatcher retries it from its last checkpoint.
RAY_TRAIN_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def run_name(launch: StageLaunch) -> str:
    """Ray Train run name, unique per attempt: a reused name would reload an earlier run's state."""
    return f"{launch.stage_run_id}-a{launch.attempt}"


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    text = os.environ.get(TICKET_ENV, "")
    try:
        launch = StageLaunch.model_validate_json(text)
    except ValidationError as error:
        return refuse_ticket(text, error)
    if launch.report is None or launch.stage_run_id is None:
        logger.error("the ticket in %s names no stage run or report endpoint", TICKET_ENV)
        return EXIT_BAD_TICKET
    reporter = Reporter(launch.report.url, launch.report.token, launch.stage_run_id, launch.attempt)
    try:
        run_attempt(launch, reporter)
        return 0
    except Exception as error:  # every error ends the attempt with a report
        fenced = next((cause for cause in causes(error) if isinstance(cause, Fenced)), None)
        if fenced is not None:  # a 409, or an expired report token
            logger.error("stopped: %s", fenced)
            return EXIT_FENCED
        return report_failure(reporter, classify(error, launch))
    finally:
        reporter.close()


def report_failure(reporter: Reporter, failure: dict[str, Any]) -> int:
    logger.error("stage attempt failed (%s): %s", failure["code"], failure["message"])
    try:
        reporter.failed(**failure)
    except Fenced:
        return EXIT_FENCED
    return EXIT_FAILED


def refuse_ticket(text: str, error: ValidationError) -> int:
    """A ticket that does not validate. When its spec alone is at fault (the spec rules changed since the
    job was accepted), the attempt fails for good with a ``bad_spec`` report naming the spec's field;
    otherwise there is nowhere sound to report to, and the entrypoint exits ``EXIT_BAD_TICKET``."""
    from align.spec import SpecError, parse_spec

    if all(problem["loc"][:1] == ("spec",) for problem in error.errors()):
        data = json.loads(text)  # the rest of the ticket validated: only the spec is in doubt
        report, stage_run_id = data.get("report"), data.get("stage_run_id")
        try:
            parse_spec(data.get("spec"))
        except SpecError as spec_error:
            if report is not None and stage_run_id is not None:
                reporter = Reporter(report["url"], report["token"], stage_run_id, data.get("attempt", 1))
                try:
                    return report_failure(reporter, classify(spec_error, None))
                finally:
                    reporter.close()
    logger.error("no usable ticket in %s: %s", TICKET_ENV, error)
    return EXIT_BAD_TICKET


def run_attempt(launch: StageLaunch, reporter: Reporter) -> None:
    """Check the stage, then run it on Ray Train; heartbeats go out all along (:mod:`workers.liveness`)."""
    watch = PlacementWatch(launch, on_timeout=lambda message: unschedulable(launch, message))
    with Liveness(launch, "starting", watch=watch):
        planned = check_stage(launch.spec, launch.index)
        reporter.heartbeat(0, planned, force=True)
        trainer = build_trainer(launch, planned)
        started = time.perf_counter()
        watch.begin()
        trainer.fit()
        logger.info("%s finished in %.1fs of Ray Train", run_name(launch), time.perf_counter() - started)


def unschedulable(launch: StageLaunch, message: str) -> None:
    """The worker group waited past the schedule deadline: fail the attempt for good and end this process
    (and with it the Ray job, its worker group and its placement group)."""
    assert launch.report is not None and launch.stage_run_id is not None
    reporter = Reporter(launch.report.url, launch.report.token, launch.stage_run_id, launch.attempt, deadline=30)
    code = report_failure(reporter, {"code": "unschedulable", "message": message, "field": "resources",
                                     "retryable": False})
    reporter.close()
    # From this (heartbeat) thread, with trainer.fit() still waiting in the main one: no ray.shutdown() here;
    # Ray ends the job's actors and placement group when it sees its driver gone.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def check_stage(job, index: int) -> int:
    """Load and check the stage's data (rendering a sample with a local base model's chat template) before
    Ray starts; returns the planned number of steps."""
    from align.preflight import chat_tokenizer, planned_steps

    return planned_steps(job.stages[index], job.stage_resources(index).num_workers, chat_tokenizer(job.base_model))


def build_trainer(launch: StageLaunch, planned_steps: int):
    """A TorchTrainer with one rank per worker; no Ray-level retries (the dispatcher retries attempts)."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from workers.train_func import train_func

    for name, value in RAY_TRAIN_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if not ray.is_initialized():
        started = time.perf_counter()
        # The cluster the dispatcher pinned (its own local Ray), else RAY_ADDRESS from the job submission.
        ray.init(address=os.environ.get("ALIGN_RAY_CLUSTER"))
        logger.info("joined Ray in %.1fs", time.perf_counter() - started)
    resources = launch.resources
    use_gpu = resources.gpus_per_worker > 0
    per_worker = {"CPU": resources.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    env = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
    return TorchTrainer(
        train_func,
        train_loop_config={"launch": launch.model_dump_json(), "total_steps": planned_steps},
        scaling_config=ScalingConfig(
            num_workers=resources.num_workers, use_gpu=use_gpu, resources_per_worker=per_worker
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name(launch),
            storage_path=str(launch.work_dir.resolve() / "ray"),
            failure_config=FailureConfig(max_failures=0),
            worker_runtime_env={"env_vars": env},
        ),
    )


def causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and what it wraps: chained exceptions and the workers' errors inside Ray Train's."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending.extend(getattr(current, "worker_failures", {}).values())
        # Ray Train wraps a worker's exception with its traceback text.
        pending.extend(getattr(current, name, None) for name in ("_base_exc", "controller_failure", "cause"))
        pending.extend([current.__cause__, current.__context__])


def classify(error: BaseException, launch: StageLaunch | None) -> dict[str, Any]:
    """The "failed" payload: errors in the user's spec, data, model (its chat template included), checkpoints
    or the workers' means to honour ``report_to`` are not retryable. ``launch`` names a data error's field;
    None when the ticket's spec did not validate."""
    from align.data.load import DataError, TemplateError
    from align.models.load import ModelError
    from align.spec import SpecError
    from align.stages.loop import MissingCheckpoint
    from align.tracking import TrackingError

    found = list(causes(error))
    for cause in found:
        if isinstance(cause, SpecError):
            return _failure("bad_spec", cause, cause.errors[0][0] if cause.errors else None)
        if isinstance(cause, TemplateError):
            return _failure("bad_template", cause, "base_model")
        if isinstance(cause, DataError):
            return _failure("bad_data", cause, _data_field(launch, cause.path) if launch else None)
        if isinstance(cause, ModelError):
            return _failure("bad_model", cause, "base_model")
        if isinstance(cause, MissingCheckpoint):
            return _failure("missing_checkpoint", cause, None)
        if isinstance(cause, TrackingError):
            return _failure("bad_tracking", cause, "report_to")
    # The worker's own exception says more than the Ray Train errors wrapped around it.
    wrappers = ("worker_failures", "_base_exc", "controller_failure")
    origin = next((c for c in found if not any(hasattr(c, name) for name in wrappers)), error)
    return {
        "code": "stage_error",
        "message": f"{type(origin).__name__}: {_text(origin)}",
        "field": None,
        "retryable": True,
    }


def _failure(code: str, error: BaseException, field: str | None) -> dict[str, Any]:
    return {"code": code, "message": _text(error), "field": field, "retryable": False}


def _text(error: BaseException) -> str:
    text = str(error)
    return text if len(text) <= 4000 else text[:4000] + " ..."


def _data_field(launch: StageLaunch, path: str) -> str:
    from align.data.stage_data import resolve_data_path

    eval_path = launch.spec.stages[launch.index].data.eval_path
    is_eval = eval_path and str(resolve_data_path(eval_path)) == str(path)
    return f"stages[{launch.index}].data.{'eval_path' if is_eval else 'path'}"


def exit_now(code: int) -> None:
    """End the process with ``code``: leave Ray as its exit handler would, flush the output, and skip the
    interpreter's teardown.

    :func:`main` has delivered (or logged) every report by then. Tearing down torch, transformers and
    Ray's modules took about 2 s more on a 2-core machine, and the attempt counts as ended only when
    this process has.
    """
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()  # the cluster learns that the job's driver is gone, as on a normal exit
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
