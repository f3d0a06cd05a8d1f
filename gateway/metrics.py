"""Prometheus metrics of one app (`GET /metrics`), with prometheus-client.

Each app owns a `Metrics` with its own `CollectorRegistry` (no default registry: tests build
many apps in one process). Labels: `account` is the first 12 hex digits of the token's
SHA-256 (never the token), `model` the model's id; both are capped at MAX_LABEL_VALUES
distinct values per process (then `other`), so made-up tokens cannot grow the scrape.

Counters and histograms are fed by the engine as things happen (engine/observed.py); the
gauges (in flight, queued, creates in the window, limits) are read from the service when
scraped (`watch`). Under gunicorn the values live in `PROMETHEUS_MULTIPROC_DIR` (prepared
by `prepare_multiprocess_dir` in the master, see gunicorn.conf.py) and one scrape sums
every worker: counters and histograms of exited workers stay counted, their gauges go with
them (`mark_process_dead`); each worker refreshes its gauges every GAUGE_REFRESH_SECONDS.
"""
from __future__ import annotations

import glob
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

log = logging.getLogger(__name__)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
MAX_LABEL_VALUES = 500
OTHER = "other"
GAUGE_REFRESH_SECONDS = 1.0
PRICE_KINDS = ("per_run", "per_output", "per_second")
GENERATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
SHORT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Gauges read from the service, per account: (name, help, key in the service's reading).
ACCOUNT_GAUGES = (
    ("gateway_predictions_in_flight", "Predictions created upstream and not yet final", "in_flight"),
    ("gateway_items_queued", "Items waiting for a concurrency slot", "queued"),
    ("gateway_slots_in_use", "Concurrency slots held (a prediction, or its create being sent)", "slots_in_use"),
    ("gateway_creates_in_window", "Creates booked in the current rate window", "creates_in_window"),
)
LIMIT_GAUGES = (
    ("gateway_concurrency_limit", "Configured concurrent predictions per account", "concurrent_limit"),
    ("gateway_creates_per_window_limit", "Configured creates per rate window per account", "requests_per_minute"),
)

AccountsReading = Callable[[], Mapping[str, Mapping[str, int]]]
LimitsReading = Callable[[], Mapping[str, Any]]


def account_label(account_key: str) -> str:
    """The label of an account: a short prefix of its key (already a hash of the token)."""
    return account_key[:12]


class _Capped:
    """At most `limit` distinct label values; later ones are counted as OTHER."""

    def __init__(self, limit: int) -> None:
        self._limit, self._seen, self._lock = limit, set(), threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) >= self._limit:
                return OTHER
            self._seen.add(value)
        return value


class Metrics:
    def __init__(self, prices: Mapping[str, Mapping[str, float]] | None = None,
                 rate_window: float = 60.0) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        if self.multiprocess and not getattr(values.ValueClass, "_multiprocess", False):
            # prometheus-client picks its value store when first imported; this process
            # imported it before the directory was set (gunicorn's config imports the app).
            values.ValueClass = values.MultiProcessValue()
        self.registry = CollectorRegistry()
        self._prices = dict(prices or {})
        self._accounts, self._models = _Capped(MAX_LABEL_VALUES), _Capped(MAX_LABEL_VALUES)
        target = None if self.multiprocess else self.registry
        counter = lambda name, doc, labels: Counter(name, doc, labels, registry=target)  # noqa: E731
        histogram = lambda name, doc, labels, buckets: Histogram(  # noqa: E731
            name, doc, labels, buckets=buckets, registry=target)
        gauge = lambda name, doc, labels, mode: Gauge(  # noqa: E731
            name, doc, labels, registry=target, multiprocess_mode=mode)
        am, amc = ("account", "model"), ("account", "model", "status")
        self.creates = counter("gateway_upstream_creates", "Create attempts by upstream HTTP status "
                               "('unreachable': no answer)", amc)
        self.create_retries = counter("gateway_create_retries", "Creates sent again, by reason "
                                      "(throttled: a 429; fault: a 5xx or no answer)", (*am, "reason"))
        self.predictions = counter("gateway_predictions", "Predictions seen final upstream, by status", amc)
        self.items = counter("gateway_items", "Generation items by final status", amc)
        self.cancels = counter("gateway_cancels_sent", "Cancels sent upstream and accepted", am)
        self.downloads = counter("gateway_downloads", "Output files downloaded", am)
        self.download_bytes = counter("gateway_download_bytes", "Bytes of output files downloaded", am)
        self.download_failures = counter("gateway_download_failures", "Output files given up on", am)
        self.spend = counter("gateway_estimated_spend_dollars", "Estimated upstream spend (MODEL_PRICES)", am)
        self.jobs = counter("gateway_jobs", "Jobs (and synchronous requests) by final status", ("kind", "status"))
        self.webhooks = counter("gateway_webhook_deliveries", "Webhook deliveries by outcome (delivered, "
                                "or given up after WEBHOOK_ATTEMPTS)", ("outcome",))
        self.refusals = counter("gateway_validation_refusals", "Requests refused as invalid (400)", ("endpoint",))
        self.http = counter("gateway_http_requests", "HTTP requests answered", ("endpoint", "method", "status"))
        self.create_seconds = histogram("gateway_upstream_create_seconds", "Create call latency "
                                        "(with Prefer: wait it includes the generation)", ("model",),
                                        GENERATION_BUCKETS)
        self.prediction_seconds = histogram("gateway_prediction_seconds", "Prediction duration, created to "
                                            "final", ("model", "status"), GENERATION_BUCKETS)
        self.slot_wait_seconds = histogram("gateway_slot_wait_seconds", "Time items waited for a slot",
                                           ("model",), GENERATION_BUCKETS)
        self.item_seconds = histogram("gateway_item_seconds", "Item time, queued to final (files saved)",
                                      ("model", "status"), GENERATION_BUCKETS)
        self.download_seconds = histogram("gateway_download_seconds", "Time to download one output file",
                                          ("model",), SHORT_BUCKETS)
        self.http_seconds = histogram("gateway_http_request_seconds", "HTTP request duration", ("endpoint",),
                                      SHORT_BUCKETS)
        self._account_gauges = {key: gauge(name, doc, ("account",), "livesum") for name, doc, key in ACCOUNT_GAUGES}
        self._limit_gauges = {key: gauge(name, doc, (), "livemax") for name, doc, key in LIMIT_GAUGES}
        gauge("gateway_rate_window_seconds", "The rate window", (), "livemax").set(rate_window)
        if self.multiprocess:
            multiprocess.MultiProcessCollector(self.registry)
        self._readings: tuple[AccountsReading, LimitsReading] | None = None
        self._shown: set[str] = set()  # account labels that have gauge values
        self._gauge_lock = threading.Lock()
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    # -- labels ---------------------------------------------------------------------------
    def account(self, account_key: str) -> str:
        return self._accounts(account_label(account_key))

    def model(self, model: str) -> str:
        return self._models(model)

    # -- events the engine and the API report -----------------------------------------------
    def estimate_spend(self, account: str, model: str, status: str, seconds: float | None, outputs: int) -> None:
        """Add the estimated cost of one final prediction (labels already capped): per run
        and per output when it succeeded; per second of its run (created to final, an upper
        bound of the billed time) whatever its end."""
        price = self._prices.get(model)
        if not price:
            return
        dollars = (seconds or 0.0) * price.get("per_second", 0.0)
        if status == "succeeded":
            dollars += price.get("per_run", 0.0) + outputs * price.get("per_output", 0.0)
        if dollars > 0:
            self.spend.labels(account, model).inc(dollars)

    def request_answered(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.http.labels(endpoint, method, str(status)).inc()
        self.http_seconds.labels(endpoint).observe(seconds)
        if status == 400:
            self.refusals.labels(endpoint).inc()

    # -- gauges -------------------------------------------------------------------------------
    def watch(self, accounts: AccountsReading, limits: LimitsReading) -> None:
        """Where the gauges are read: per account key (in_flight, queued, slots_in_use,
        creates_in_window) and the limits (concurrent_limit, requests_per_minute)."""
        self._readings = (accounts, limits)

    def refresh(self, limits: bool = True) -> None:
        """Set the gauges from the service's current state (the limits only when asked:
        reading them may cost a call to Redis)."""
        if self._readings is None:
            return
        accounts, read_limits = self._readings
        totals: dict[str, dict[str, int]] = {}
        for key, reading in accounts().items():
            into = totals.setdefault(self.account(key), {})
            for name in self._account_gauges:
                into[name] = into.get(name, 0) + int(reading.get(name, 0))
        with self._gauge_lock:
            for label in self._shown - set(totals):  # gone (or idle and forgotten): show zero
                totals[label] = {}
            for label, reading in totals.items():
                for name, gauge in self._account_gauges.items():
                    gauge.labels(label).set(reading.get(name, 0))
            self._shown |= set(totals)
        if limits:
            reading = read_limits()
            for name, gauge in self._limit_gauges.items():
                gauge.set(reading.get(name, 0))

    def render(self) -> tuple[bytes, str]:
        """The scrape: every metric (of every worker under gunicorn), and its content type."""
        self.refresh()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def start(self) -> None:
        """Under gunicorn, keep this worker's gauges current for scrapes another worker answers."""
        if self.multiprocess and self._refresher is None:
            self._refresher = threading.Thread(target=self._refresh_loop, daemon=True, name="metrics-gauges")
            self._refresher.start()

    def stop(self) -> None:
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join(5)

    def _refresh_loop(self) -> None:
        while not self._stop.wait(GAUGE_REFRESH_SECONDS):
            try:
                self.refresh(limits=False)
            except Exception:  # a scrape must not lose its gauges to one bad reading
                log.exception("refreshing the metrics gauges failed")


def prepare_multiprocess_dir(environ: dict[str, str] | os._Environ = os.environ) -> tuple[str, bool]:
    """The directory the workers write their metrics to, emptied: the operator's
    PROMETHEUS_MULTIPROC_DIR, or a fresh temporary one (then set in `environ` for the
    workers). Returns (path, whether it was created here). Run once, in gunicorn's master,
    before any worker starts: values left by an earlier run would be counted again."""
    path = environ.get(MULTIPROC_ENV)
    if not path:
        path = environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="gateway-metrics-")
        return path, True
    os.makedirs(path, exist_ok=True)
    for stale in glob.glob(os.path.join(path, "*.db")):
        os.remove(stale)
    return path, False


def mark_process_dead(pid: int) -> None:
    """A worker exited: drop its live gauges (its counters and histograms stay counted)."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)
