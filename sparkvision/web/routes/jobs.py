"""``/api/jobs...``: the job kinds, and submitting, listing, following, cancelling and resuming jobs.

A submitted job's params are checked three ways before it is queued, each a 422 (or 403 for a
path) that names the field: the kind's pydantic schema, the library's own config check
(``Kind.check``) and the path rules (inputs must exist inside a data root, outputs must lie inside
one). The runner (:mod:`sparkvision.web.runner`) then runs it in the background.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from sparkvision.errors import ParamError
from sparkvision.web import browse
from sparkvision.web.jobs import FINAL_STATES, STATES, Job
from sparkvision.web.kinds import KINDS, Kind
from sparkvision.web.routes.errors import flags_to_fields, pydantic_message, validation_message
from sparkvision.web.routes.state import State, StateDep, require_token
from sparkvision.web.runner import read_metrics_history
from sparkvision.web.security import ApiError, Settings, safe_path
from sparkvision.web.uploads import read_body

RESUMABLE_STATES = ("interrupted", "failed", "cancelled")

router = APIRouter(tags=["jobs"])


class JobSubmit(BaseModel):
    kind: str = Field(description="One of GET /api/jobs/kinds.")
    params: dict[str, Any] = Field(default_factory=dict, description="Validated against the kind's schema.")


# The route reads its body itself (after the token check), so the schema is given here.
SUBMIT_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "content": {"application/json": {"schema": JobSubmit.model_json_schema()}},
        "required": True,
    }
}


def checked_params(kind_name: str, raw: dict[str, Any], settings: Settings) -> tuple[Kind, dict[str, Any]]:
    """``(kind, params)`` ready to queue: validated, checked by the library, paths resolved in the roots."""
    kind = KINDS.get(kind_name)
    if kind is None:
        raise ApiError(422, f"unknown job kind {kind_name!r}; choose from {', '.join(KINDS)}", "unknown_kind")
    why = kind.unavailable()
    if why:
        raise ApiError(422, why, "kind_unavailable")
    prefix = f"invalid {kind_name} parameters"
    try:
        params = kind.params.model_validate(raw)
    except ValidationError as e:
        raise ApiError(422, pydantic_message(e, prefix), "invalid_params") from None
    if kind.check is not None:
        try:
            kind.check(params)
        except ValidationError as e:  # a recipe (a pydantic dataclass) refused a value
            raise ApiError(422, pydantic_message(e, prefix), "invalid_params") from None
        except (ValueError, TypeError, KeyError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            msg = flags_to_fields(str(msg), kind.params.model_fields)
            raise ApiError(422, f"{prefix}: {msg}", "invalid_params") from None
    values = params.model_dump()
    for fname in (*kind.inputs, *kind.optional_inputs):
        if values.get(fname) is not None:
            values[fname] = safe_path(values[fname], settings.data_roots, must_exist=True, what=fname)
    for fname in kind.outputs:
        if values.get(fname) is not None:
            values[fname] = safe_path(values[fname], settings.data_roots, what=fname)
            if values[fname] in settings.data_roots:
                raise ApiError(
                    422, f"{fname} must be a directory inside a data root, not the root itself", "bad_path"
                )
    try:
        kind.preflight(kind.params.model_validate(values))  # inputs exist; no output destroys data
    except ParamError as e:
        raise ApiError(
            409 if "already holds data" in e.message else 422, f"{prefix}: {e}", "invalid_params"
        ) from None
    return kind, values


async def submitted(request: Request, settings: Settings) -> JobSubmit:
    """The submission in the request body, read only now: after the token check (the route's
    dependency), so an unauthenticated body is never read, and at most ``max_json_bytes`` of it."""
    raw = await read_body(request, settings.max_json_bytes)
    try:
        return JobSubmit.model_validate_json(raw)
    except ValidationError as e:
        raise ApiError(422, validation_message(list(e.errors(include_url=False))), "invalid_params") from None


def job_or_404(sv: State, job_id: str) -> Job:
    job = sv.store.get(job_id)
    if job is None:
        raise ApiError(404, f"no job with id {job_id!r}", "unknown_job")
    return job


@router.get("/api/jobs/kinds")
async def job_kinds():
    """Every job kind with its parameter schema and whether this build has it."""
    return {"kinds": [k.describe() for k in KINDS.values()]}


@router.post(
    "/api/jobs", status_code=201, dependencies=[Depends(require_token)], openapi_extra=SUBMIT_OPENAPI
)
async def submit_job(request: Request, sv: StateDep):
    """Queue a job; its params are validated against the kind's schema and paths against the roots."""
    body = await submitted(request, sv.settings)
    kind, values = checked_params(body.kind, body.params, sv.settings)
    job = sv.store.create(kind.name, values, values.get(kind.result_key) if kind.result_key else None)
    sv.runner.wake()
    return JSONResponse(job_or_404(sv, job.id).to_json(), status_code=201)


@router.get("/api/jobs")
async def list_jobs(
    sv: StateDep,
    state: str | None = Query(None, description="Only jobs in this state."),
    kind: str | None = Query(None),
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0),
):
    if state is not None and state not in STATES:
        raise ApiError(422, f"state {state!r} is not one of {', '.join(STATES)}", "invalid_params")
    jobs = sv.store.list(state=state, kind=kind, limit=limit, offset=offset)
    return {"jobs": [j.to_json() for j in jobs], "limit": limit, "offset": offset}


@router.get("/api/jobs/{job_id}")
async def get_job(job_id: str, sv: StateDep):
    """State, progress %, current metrics, log tail and where the results are."""
    return job_or_404(sv, job_id).to_json()


@router.post("/api/jobs/{job_id}/cancel", dependencies=[Depends(require_token)])
async def cancel_job(job_id: str, sv: StateDep):
    job = job_or_404(sv, job_id)
    if job.state in FINAL_STATES:
        raise ApiError(409, f"job {job_id} already {job.state}; nothing to cancel", "job_finished")
    new_state = sv.store.request_cancel(job_id)
    if new_state == "running":
        await run_in_threadpool(sv.runner.cancel, job_id)
    return job_or_404(sv, job_id).to_json()


@router.post("/api/jobs/{job_id}/resume", dependencies=[Depends(require_token)])
async def resume_job(job_id: str, sv: StateDep):
    """Queue an interrupted, failed or cancelled job again; training resumes from its checkpoint."""
    job = job_or_404(sv, job_id)
    if job.state not in RESUMABLE_STATES:
        raise ApiError(
            409,
            f"job {job_id} is {job.state}; only interrupted, failed or cancelled jobs resume",
            "not_resumable",
        )
    # The roots may have changed since the job was submitted (a restart with other --data-root):
    # its paths are checked again, as at submit.
    _, checked = checked_params(job.kind, sv.runner.resume_params(job.kind, job.params), sv.settings)
    params = checked
    sv.store.requeue(job_id, params)
    sv.store.append_log(job_id, "resumed" + (" from checkpoint" if params.get("resume") else ""))
    sv.runner.wake()
    return job_or_404(sv, job_id).to_json()


@router.get("/api/jobs/{job_id}/metrics")
async def job_metrics(job_id: str, sv: StateDep):
    """Per-epoch history (loss, accuracy, throughput) and the confusion matrix, when there are any."""
    job = job_or_404(sv, job_id)
    kind = KINDS.get(job.kind)
    out = job.params.get("out") if kind is not None and kind.reports_epochs else None
    model_dir = out or job.params.get("model_dir")
    history = read_metrics_history(out) if out else []
    if not history and isinstance(job.result, dict):
        history = job.result.get("history", []) or []
    evaluation = None
    if kind is not None and kind.evaluates and isinstance(job.result, dict):
        evaluation = job.result
    elif model_dir and os.path.isfile(os.path.join(model_dir, "evaluation.json")):
        evaluation = browse.read_json(os.path.join(model_dir, "evaluation.json"))
    confusion = None
    if evaluation and evaluation.get("confusion_matrix") is not None:
        confusion = {
            "class_names": evaluation.get("class_names"),
            "matrix": evaluation["confusion_matrix"],
            "accuracy": evaluation.get("accuracy"),
            "split": evaluation.get("split"),
        }
    return {"job": job_id, "kind": job.kind, "history": history, "confusion": confusion}


@router.get("/api/jobs/{job_id}/plan")
async def job_plan(job_id: str, sv: StateDep):
    """A plan job's ``plan.json``: the choice, the runners-up, why the rest were ruled out, and
    (with ``--run``) measured against predicted; also written when the target is unreachable."""
    out = plan_out(sv, job_id)
    data = browse.read_json(os.path.join(out, "plan.json")) if out else None
    if data is None:
        raise ApiError(404, f"job {job_id} has no plan yet", "no_plan")
    return data


@router.get("/api/jobs/{job_id}/curves.png")
async def job_plan_curves(job_id: str, sv: StateDep):
    """The fitted monotone curves over the profiled points (``curves.png`` of a plan job)."""
    out = plan_out(sv, job_id)
    path = os.path.join(out, "curves.png") if out else ""
    if not os.path.isfile(path):
        raise ApiError(404, f"job {job_id} has no curves yet", "no_plan")
    return FileResponse(path, media_type="image/png")


def plan_out(sv: State, job_id: str) -> str | None:
    """The output directory of a plan job, checked against the data roots again (they may have
    changed since it ran); None for a job of another kind."""
    job = job_or_404(sv, job_id)
    if job.kind != "plan" or not job.params.get("out"):
        return None
    return safe_path(job.params["out"], sv.settings.data_roots, what="out")
