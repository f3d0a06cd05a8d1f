"""The per-app state, in one typed place: what `create_app` builds and the routes use."""
from __future__ import annotations

import dataclasses

from flask import Flask, current_app

from gateway.config import Settings
from gateway.engine.service import GenerationService
from gateway.jobs.manager import JobManager
from gateway.redaction import Redactor
from gateway.sync_gate import SyncRequestGate

EXTENSION = "gateway"


@dataclasses.dataclass(frozen=True)
class GatewayState:
    settings: Settings
    redactor: Redactor
    service: GenerationService
    jobs: JobManager
    sync_gate: SyncRequestGate


def gateway_state(app: Flask | None = None) -> GatewayState:
    """The state of `app` (default: the app handling the current request)."""
    return (app or current_app).extensions[EXTENSION]
