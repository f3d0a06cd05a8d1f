"""A finished prediction's outputs, downloaded and placed under the names the client chose,
each with a provenance record beside it. Nothing partial is ever left behind."""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from gateway.engine.downloads import Downloader, DownloadError
from gateway.engine.files import PART_PREFIX, describe_data_uri, final_stems, place
from gateway.engine.items import GenerationItem, ItemStatus
from gateway.engine.models import ModelSpec, outputs_of
from gateway.engine.upstream import PredictionState


class ItemFailed(Exception):
    """An item cannot succeed: the message (safe to show a client) and an upstream status."""

    def __init__(self, message: str, status: int | None = None, invalid_fields: list | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.invalid_fields = message, status, invalid_fields


class OutputSaver:
    def __init__(self, downloader: Downloader) -> None:
        self._downloader = downloader

    def save(self, item: GenerationItem, spec: ModelSpec, state: PredictionState, deadline: float) -> None:
        """Download every output of a final prediction and place it; raise ItemFailed."""
        pid = state.id
        if state.status == "failed":
            raise ItemFailed(f"Generation failed: prediction {pid} failed: {state.error or 'no reason given'}")
        if state.status in ("canceled", "aborted"):
            raise ItemFailed(f"Generation failed: prediction {pid} was {state.status} upstream")
        urls = outputs_of(spec, state.output)
        if not urls:
            raise ItemFailed(f"Generation failed: prediction {pid} succeeded with no output")
        temps: list[tuple[Path, str]] = []
        try:
            for url in urls:
                temps.append(self._downloader.fetch(url, item.folder, deadline))
        except DownloadError as exc:
            raise ItemFailed(f"Generation failed: prediction {pid}: {exc}") from None
        finally:
            if len(temps) < len(urls):
                _discard(temps)
        self._place(item, spec, temps)

    def _place(self, item: GenerationItem, spec: ModelSpec, temps: list[tuple[Path, str]]) -> None:
        stems = final_stems(item.stem, len(temps))
        names = [f"{stem}.{ext}" for stem, (_, ext) in zip(stems, temps, strict=True)]
        item.timings["completed"] = time.time()
        digests = [_sha256(path) for path, _ in temps]
        with item.lock:
            if item.done.is_set():  # the request already answered (timed out, canceled): keep nothing
                _discard(temps)
                return
            try:
                _link_all(item.folder, temps, names)
            except FileExistsError:
                item.error, item.status = "Generation failed: an output name is already taken", 409
                item.state = ItemStatus.FAILED
            else:
                for name, digest in zip(names, digests, strict=True):
                    _write_provenance(item, spec, name, digest)
                item.files = [os.path.join(item.shown_folder, name) for name in names]
                item.state = ItemStatus.SUCCEEDED
            item.done.set()
        item.notify_done()


def _link_all(folder: Path, temps: list[tuple[Path, str]], names: list[str]) -> None:
    """Place every file or none: on a name clash the ones placed are taken back."""
    placed = []
    try:
        for (path, _), name in zip(temps, names, strict=True):
            place(path, folder / name)
            placed.append(name)
    except FileExistsError:
        _discard(temps)
        for name in placed:
            (folder / name).unlink(missing_ok=True)
        raise


def _discard(temps: list[tuple[Path, str]]) -> None:
    for path, _ in temps:
        path.unlink(missing_ok=True)


def _write_provenance(item: GenerationItem, spec: ModelSpec, name: str, digest: str) -> None:
    """`<name>.json` beside the image: what made it, when, and its SHA-256. A `data:` input
    is recorded by its type, size and SHA-256, not copied into every record."""
    record = {
        "file": name, "sha256": digest, "prompt": item.prompt, "model": spec.id,
        "replicate_model": spec.replicate_name, "prediction_id": item.prediction_id,
        "parameters": {k: describe_data_uri(v) for k, v in item.data.items() if k != "prompt"},
        "created_at": item.timings.get("created"), "completed_at": item.timings.get("completed"),
    }
    target = item.folder / (os.path.splitext(name)[0] + ".json")
    # A short temporary name: `.part-` + a name already at NAME_MAX would be too long.
    temp = target.with_name(f"{PART_PREFIX}{hashlib.sha256(name.encode()).hexdigest()[:16]}.json")
    temp.write_text(json.dumps(record, indent=2, ensure_ascii=False))
    os.replace(temp, target)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 16), b""):
            digest.update(block)
    return digest.hexdigest()
