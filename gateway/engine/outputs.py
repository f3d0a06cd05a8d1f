"""A finished prediction's outputs, downloaded and placed under the names the client chose,
each with a provenance record beside it. Nothing partial is ever left behind."""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from gateway.engine.downloads import Downloader, DownloadError
from gateway.engine.files import (
    LONGEST_EXTENSION,
    NAME_MAX_BYTES,
    PART_PREFIX,
    describe_data_uri,
    final_stems,
    place,
)
from gateway.engine.items import GenerationItem, ItemStatus
from gateway.engine.models import ModelSpec, has_data, output_files
from gateway.engine.observed import ItemObserver
from gateway.engine.upstream import PredictionState


class ItemFailed(Exception):
    """An item cannot succeed: the message (safe to show a client) and an upstream status."""

    def __init__(self, message: str, status: int | None = None, invalid_fields: list | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.invalid_fields = message, status, invalid_fields


class OutputSaver:
    def __init__(self, downloader: Downloader) -> None:
        self._downloader = downloader

    def save(self, item: GenerationItem, spec: ModelSpec, state: PredictionState, deadline: float,
             observer: ItemObserver | None = None) -> None:
        """Download every file of a final prediction's output (one URL, a list, an object of
        URLs) and place it; keep a non-file output (text, JSON) for the answer and the
        provenance record. Raise ItemFailed."""
        observer = observer or ItemObserver.unobserved()  # counts the downloads
        pid = state.id
        if state.status == "failed":
            raise ItemFailed(f"Generation failed: prediction {pid} failed: {state.error or 'no reason given'}")
        if state.status in ("canceled", "aborted"):
            raise ItemFailed(f"Generation failed: prediction {pid} was {state.status} upstream")
        files = output_files(state.output)
        data = state.output if has_data(state.output) else None
        if not files and data is None:
            raise ItemFailed(f"Generation failed: prediction {pid} succeeded with no output")
        if data is not None and len(json.dumps(data, ensure_ascii=False).encode()) > self._downloader.max_bytes:
            raise ItemFailed(f"Generation failed: prediction {pid}: its output is larger than the "
                             f"{self._downloader.max_bytes}-byte cap (MAX_DOWNLOAD_BYTES)")
        stems = output_stems(item.stem, [key for key, _ in files])
        temps: list[tuple[Path, str]] = []
        try:
            for _, url in files:
                temps.append(observer.download(self._downloader.fetch, url, item.folder, deadline))
        except DownloadError as exc:
            raise ItemFailed(f"Generation failed: prediction {pid}: {exc}") from None
        finally:
            if len(temps) < len(files):
                _discard(temps)
        self._place(item, spec, temps, stems, data)

    def _place(self, item: GenerationItem, spec: ModelSpec, temps: list[tuple[Path, str]], stems: list[str],
               data: Any) -> None:
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
                    _write_provenance(item, spec, name, digest, data)
                if not names:  # text or JSON only: its record is the one file
                    item.folder.mkdir(parents=True, exist_ok=True)
                    _write_provenance(item, spec, f"{item.stem}.json", None, data)
                item.files = [os.path.join(item.shown_folder, name) for name in names]
                item.output = data
                item.state = ItemStatus.SUCCEEDED
            item.done.set()
        item.notify_done()


def output_stems(stem: str, keys: list[str | None]) -> list[str]:
    """The file name (without extension) of each output file, index-matched: `name` for one
    file, `name_1` ... `name_N` for a list, `name_<key>` for the files of an object output.
    400-style checks ran on `name` before anything was created; a key is made safe here."""
    if all(key is None for key in keys):
        return final_stems(stem, len(keys))
    stems = [f"{stem}_{_safe_key(key, index)}" for index, key in enumerate(keys, 1)]
    too_long = [s for s in stems if len(s.encode("utf-8")) + LONGEST_EXTENSION > NAME_MAX_BYTES]
    if too_long:
        raise ItemFailed(f"Generation failed: the output name {too_long[0][:80]!r}... is longer than "
                         f"{NAME_MAX_BYTES} bytes with its extension; choose a shorter custom name")
    return stems


def _safe_key(key: str | None, index: int) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "_", key or "")[:64].strip("_")
    return cleaned or str(index)


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


def _write_provenance(item: GenerationItem, spec: ModelSpec, name: str, digest: str | None, data: Any) -> None:
    """`<name>.json` beside the file: what made it, when, and its SHA-256; a non-file output
    (text, JSON) is recorded whole. A `data:` input is recorded by its type, size and
    SHA-256, not copied into every record."""
    record = {
        "file": None if digest is None else name, "sha256": digest, "prompt": item.prompt, "model": spec.id,
        "replicate_model": spec.replicate_name, "version": spec.run_target.version,
        "prediction_id": item.prediction_id,
        "parameters": {k: describe_data_uri(v) for k, v in item.data.items() if k != "prompt"},
        "created_at": item.timings.get("created"), "completed_at": item.timings.get("completed"),
    }
    if data is not None:
        record["output"] = data
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
