"""The app factory: builds the store, clients and services once, and wires the routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from corral import __version__
from corral.agents.protocols import ShieldFactory, Tool
from corral.api.errors import ERROR_RESPONSES
from corral.auth import BearerAuthMiddleware
from corral.config import Settings
from corral.content import ContentFetcher, FetchPolicy
from corral.errors import (
    BackendUnavailable,
    CapabilityUnavailable,
    CorralError,
    http_status_for,
    retry_after_s,
)
from corral.job_tokens import JobTokens
from corral.memory.types import BankSettings, Retriever
from corral.observability.context import REQUEST_ID_HEADER, current
from corral.observability.metrics import ApiMetrics
from corral.observability.middleware import ObservabilityMiddleware
from corral.ray_jobs import JobLauncher
from corral.routes import all_routers
from corral.routes import dashboard as dashboard_routes
from corral.routes import internal_jobs as internal_routes
from corral.routes import jobs as jobs_routes
from corral.routes import memory_banks as memory_routes
from corral.routes import models as models_routes
from corral.routes import openai as openai_routes
from corral.routes import ops as ops_routes
from corral.routes import synthetic_data_generation as sdg_routes
from corral.services.admission import AdmissionLimits, Admitter, ClusterResources
from corral.services.agents import AgentLimits, AgentService
from corral.services.container import Services
from corral.services.datasets import DatasetService
from corral.services.fine_tuning import LaunchPlanner, TrainingDefaults
from corral.services.inference import InferenceService, ModelRouter, NoModels
from corral.services.job_reports import JobReports
from corral.services.jobs import JobsService
from corral.services.lease import Lease
from corral.services.memory_banks import MemoryBankService
from corral.services.models import ModelService
from corral.services.openai_compat import ModelNames, OpenAIService
from corral.services.post_training import PostTrainingService
from corral.services.readiness import build_readiness
from corral.services.reconciler import PeriodicReconciler, Reconciler
from corral.services.reward_scoring import RewardScoringService
from corral.services.synthetic_data import SyntheticDataLimits, SyntheticDataService
from corral.sessions import SessionCookies
from corral.storage import Storage
from corral.store.db import Database
from corral.vector_index import VectorIndex

log = logging.getLogger(__name__)


def fetch_policy(settings: Settings) -> FetchPolicy:
    return FetchPolicy(
        allowed_roots=settings.resolved_dataset_roots,
        max_bytes=settings.fetch_max_bytes,
        timeout_s=settings.fetch_timeout_s,
        allow_http=settings.fetch_allow_http,
        ca_bundle=settings.fetch_ca_bundle,
    )


def build_services(
    settings: Settings,
    *,
    database: Database,
    fetcher: ContentFetcher,
    model_router: ModelRouter | None,
    models: ModelService | None = None,
    launcher: JobLauncher | None = None,
    cluster_resources: ClusterResources | None = None,
    admitter: Admitter | None = None,
    retriever: Retriever | None = None,
    tools: Mapping[str, Tool] | None = None,
    shields: ShieldFactory | None = None,
    vector_index: VectorIndex | None = None,
) -> Services:
    """`retriever`, `tools` and `shields` are the agents' memory banks (by default the
    memory bank service, when there is a `vector_index`), server-run tools (by name) and
    shield builder; without them agents that need them are refused (422). `admitter`
    queues jobs until they fit (services/admission.py)."""
    router = model_router or (models.resolver if models is not None else NoModels())
    names = models if models is not None else router
    storage = Storage.from_settings(settings)
    datasets = DatasetService(database=database, fetcher=fetcher, storage=storage)
    planner = (
        LaunchPlanner(
            datasets=datasets,
            models=models,
            defaults=TrainingDefaults.from_settings(settings),
            storage=storage,
        )
        if models is not None and launcher is not None
        else None
    )
    jobs = JobsService(database=database, launcher=launcher, storage=storage, admitter=admitter)
    memory_banks = (
        MemoryBankService(
            database=database,
            index=vector_index,
            models=router,
            defaults=BankSettings(
                embedding_model=settings.memory_embedding_model,
                chunk_tokens=settings.memory_chunk_tokens,
                overlap_tokens=settings.memory_chunk_overlap_tokens,
            ),
            max_document_bytes=settings.memory_max_document_bytes,
        )
        if vector_index is not None
        else None
    )
    return Services(
        datasets=datasets,
        jobs=jobs,
        post_training=PostTrainingService(
            database=database, jobs=jobs, planner=planner, storage=storage
        ),
        inference=InferenceService(router=router),
        openai=OpenAIService(router=router, names=names if isinstance(names, ModelNames) else None),
        reward_scoring=RewardScoringService(router=router),
        models=models,
        memory_banks=memory_banks,
        synthetic_data=SyntheticDataService(
            models=models.resolver if models is not None else None,
            apps=models.deployer if models is not None else None,
            jobs=jobs,
            storage=storage,
            limits=SyntheticDataLimits.from_settings(settings),
        ),
        agents=AgentService(
            database=database,
            router=router,
            retriever=retriever if retriever is not None else memory_banks,
            tools=tools,
            shields=shields,
            limits=AgentLimits.from_settings(settings),
        ),
        readiness=build_readiness(
            database=database,
            timeout_s=settings.readiness_timeout_s,
            has_ray=models is not None,
            cluster_resources=cluster_resources,
            launcher=launcher,
            vector_index=vector_index,
        ),
        job_reports=JobReports(database=database),
    )


def create_app(
    settings: Settings,
    *,
    database: Database | None = None,
    fetcher: ContentFetcher | None = None,
    model_router: ModelRouter | None = None,
    models: ModelService | None = None,
    launcher: JobLauncher | None = None,
    cluster_resources: ClusterResources | None = None,
    available_resources: ClusterResources | None = None,
    retriever: Retriever | None = None,
    tools: Mapping[str, Tool] | None = None,
    shields: ShieldFactory | None = None,
    vector_index: VectorIndex | None = None,
    job_tokens: JobTokens | None = None,
) -> FastAPI:
    """The API server. `database` and `fetcher` are built from `settings` unless given;
    the database must already be at the latest migration (`corral db upgrade`).
    `models` is the models service (its resolver also routes inference); without it,
    or a `model_router`, the server has no Ray connection and inference answers 501.
    `launcher` submits fine-tuning jobs to Ray (with `models`, which locates the weights);
    with it, unfinished jobs are settled against Ray at start-up and periodically.
    `cluster_resources` and `available_resources` (`ray.cluster_resources`,
    `ray.available_resources`) let admission refuse a job the cluster can never run and
    queue one that does not fit yet (docs/admission.md); without both every job is
    handed to Ray at once. With a launcher, the reconciler and admission run only while
    this replica holds the store's lease, so several replicas may serve one database.
    `retriever`, `tools` and `shields` serve the agents (see `build_services`).
    `vector_index` holds memory banks' chunks (Milvus); without it the memory bank routes
    answer 501. `job_tokens` checks running jobs' credentials on the internal routes
    (by default from `settings`: the launcher must make tokens under the same secret)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = database if database is not None else Database(settings.resolved_database_url)
        lease = Lease(db, ttl_s=settings.resolved_lease_ttl_s) if launcher is not None else None
        admitter = (
            Admitter(
                database=db,
                launcher=launcher,
                totals=cluster_resources,
                available=available_resources,
                limits=AdmissionLimits.from_settings(settings),
                lease=lease,
            )
            if launcher is not None
            and cluster_resources is not None
            and available_resources is not None
            else None
        )
        app.state.services = build_services(
            settings,
            database=db,
            fetcher=fetcher or ContentFetcher(fetch_policy(settings)),
            model_router=model_router,
            models=models,
            launcher=launcher,
            cluster_resources=cluster_resources,
            admitter=admitter,
            retriever=retriever,
            tools=tools,
            shields=shields,
            vector_index=vector_index,
        )
        periodic = None
        if launcher is not None:
            periodic = PeriodicReconciler(
                Reconciler(database=db, launcher=launcher),
                interval_s=settings.reconcile_interval_s,
                lease=lease,
                admitter=admitter,
            )
            try:  # before the first request is served
                for settled in periodic.run_once() or ():
                    if settled.action not in ("left", "queued"):
                        log.info("job %s: %s at start-up", settled.job_key, settled.action)
            except BackendUnavailable as exc:  # the periodic passes try again
                log.warning("jobs not settled at start-up: %s", exc)
            except Exception:  # never a reason not to serve; the periodic passes try again
                log.exception("jobs not settled at start-up")
            periodic.start()
        try:
            yield
        finally:
            if periodic is not None:
                periodic.stop()
            if database is None:
                db.dispose()

    app = FastAPI(
        title="Corral — Llama Stack API",
        version=__version__,
        description="The Llama Stack draft API (v0.0.1) served on Ray.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = ApiMetrics()
    app.state.job_tokens = job_tokens or JobTokens.from_settings(settings)
    # The jobs dashboard's sign-in: only where there are keys to sign in with.
    app.state.sessions = SessionCookies.from_settings(settings) if settings.bearer_keys else None
    app.add_middleware(BearerAuthMiddleware, keys=settings.bearer_keys, sessions=app.state.sessions)
    # Outside the key check, so that refused requests are counted and carry an id too.
    app.add_middleware(ObservabilityMiddleware, metrics=app.state.metrics)
    for router in all_routers():
        app.include_router(router, responses=ERROR_RESPONSES)
    # Corral's own /models, job and generation-job routes (tagged "Corral") and the
    # OpenAI-compatible /v1 (not in the OpenAPI document): served beside the spec's
    # operations, not part of them.
    app.include_router(models_routes.router, responses=ERROR_RESPONSES)
    app.include_router(jobs_routes.router, responses=ERROR_RESPONSES)
    app.include_router(memory_routes.corral_router, responses=ERROR_RESPONSES)
    app.include_router(sdg_routes.jobs_router, responses=ERROR_RESPONSES)
    app.include_router(openai_routes.router)
    app.include_router(ops_routes.router)  # /health, /ready, /metrics
    app.include_router(dashboard_routes.router)  # the jobs dashboard (HTML, not in the doc)
    app.include_router(internal_routes.router)  # running jobs only (docs/job_credentials.md)

    app.add_exception_handler(CorralError, _corral_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    return app


def error_body(code: str, message: str, **extra: object) -> dict[str, object]:
    return {"error": {"code": code, "message": message, **extra}}


async def _corral_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CorralError)
    extra: dict[str, object] = {}
    headers: dict[str, str] = {}
    if isinstance(exc, CapabilityUnavailable):
        extra["capability"] = exc.capability
    retry_after = retry_after_s(exc)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return JSONResponse(
        error_body(exc.code, exc.message, **extra),
        status_code=http_status_for(exc),
        headers=headers,
    )


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = [
        {
            "location": [str(part) for part in err.get("loc", ())],
            "message": err.get("msg", ""),
            "type": err.get("type", ""),
        }
        for err in exc.errors()
    ]
    summary = "; ".join(f"{'.'.join(p['location'])}: {p['message']}" for p in problems)
    return JSONResponse(
        error_body("validation_error", f"invalid request: {summary}", problems=problems),
        status_code=422,
    )


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own errors (no such route, method not allowed, a body that is not JSON)
    in the same shape as every other error."""
    assert isinstance(exc, StarletteHTTPException)
    code = "not_found" if exc.status_code == 404 else "http_error"
    return JSONResponse(
        error_body(code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers
    )


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    context = current()  # the request's, kept for this handler (corral.observability)
    headers = {REQUEST_ID_HEADER: context.request_id} if context and context.request_id else {}
    return JSONResponse(
        error_body("internal", "internal server error"), status_code=500, headers=headers
    )
