"""The per-app state, in one typed place: what `create_app` builds and the routes use."""
from __future__ import annotations

import dataclasses

from flask import Flask, current_app

from gateway.config import Settings
from gateway.engine.registry import ModelCatalog
from gateway.engine.service import GenerationService
from gateway.jobs.manager import JobManager
from gateway.metrics import Metrics
from gateway.readiness import Readiness
from gateway.redaction import Redactor
from gateway.signing import FileSigner
from gateway.sync_gate import SyncRequestGate

EXTENSION = "gateway"


@dataclasses.dataclass(frozen=True)
class GatewayState:
    settings: Settings
    redactor: Redactor
    service: GenerationService
    jobs: JobManager
    sync_gate: SyncRequestGate
    signer: FileSigner              # signed /files/... links
    models: ModelCatalog            # which model a request names, and its schema
    metrics: Metrics = dataclasses.field(default_factory=Metrics)        # GET /metrics
    readiness: Readiness = dataclasses.field(default_factory=Readiness)  # GET /ready


def gateway_state(app: Flask | None = None) -> GatewayState:
    """The state of `app` (default: the app handling the current request)."""
    return (app or current_app).extensions[EXTENSION]
