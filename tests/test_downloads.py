"""The download path on its own, with `responses` standing in for the file host."""
from __future__ import annotations

import pytest
import requests
import responses

from gateway.engine.downloads import Downloader, DownloadError, new_session, sniff_extension
from model_functions import MODELS, outputs_of

URL = "https://replicate.delivery/abc/out-0.webp"
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 100
WEBP = b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\0" * 100


def downloader(max_bytes=10_000, attempts=3) -> Downloader:
    return Downloader(new_session(4), max_bytes, attempts, sleep=lambda s: None)


def deadline() -> float:
    import time
    return time.monotonic() + 30


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@responses.activate
def test_the_real_format_wins_over_the_url(tmp_path):
    responses.get(URL, body=PNG)
    path, ext = downloader().fetch(URL, tmp_path, deadline())
    assert ext == "png" and path.read_bytes() == PNG and path.name.startswith(".part-")


@pytest.mark.parametrize("head,url,ext", [
    (WEBP, "x", "webp"), (b"\xff\xd8\xff\xe0", "x", "jpg"), (b"GIF89a", "x", "gif"),
    (b"????", "https://h/out.jpeg", "jpg"), (b"????", "https://h/out.webp?sig=1", "webp"), (b"????", "h/o", "bin"),
])
def test_sniffing(head, url, ext):
    assert sniff_extension(head, url) == ext


@responses.activate
@pytest.mark.parametrize("status", [404, 403, 410])
def test_a_missing_file_fails_at_once_and_leaves_nothing(tmp_path, status):
    responses.get(URL, status=status)
    with pytest.raises(DownloadError, match=str(status)):
        downloader().fetch(URL, tmp_path, deadline())
    assert len(responses.calls) == 1 and leftovers(tmp_path) == []


@responses.activate
def test_transient_errors_are_retried(tmp_path):
    responses.get(URL, body=requests.ConnectionError("reset"))
    responses.get(URL, status=503)
    responses.get(URL, body=WEBP)
    path, ext = downloader().fetch(URL, tmp_path, deadline())
    assert ext == "webp" and len(responses.calls) == 3 and leftovers(tmp_path) == [path.name]


@responses.activate
def test_giving_up_leaves_nothing(tmp_path):
    for _ in range(3):
        responses.get(URL, body=requests.exceptions.ChunkedEncodingError("cut"))
    with pytest.raises(DownloadError, match="after 3 attempt"):
        downloader().fetch(URL, tmp_path, deadline())
    assert leftovers(tmp_path) == []


@responses.activate
def test_size_cap(tmp_path):
    responses.get(URL, body=WEBP + b"\0" * 20_000)
    with pytest.raises(DownloadError, match="10000-byte cap"):
        downloader().fetch(URL, tmp_path, deadline())
    assert leftovers(tmp_path) == [] and len(responses.calls) == 1  # a cap is not retried


@responses.activate
def test_declared_size_over_the_cap_is_refused_before_reading(tmp_path):
    responses.get(URL, body=WEBP, headers={"Content-Length": "99999999"}, auto_calculate_content_length=False)
    with pytest.raises(DownloadError, match="cap"):
        downloader().fetch(URL, tmp_path, deadline())
    assert leftovers(tmp_path) == []


@responses.activate
def test_empty_file_is_not_a_result(tmp_path):
    responses.get(URL, body=b"")
    with pytest.raises(DownloadError, match="empty"):
        downloader(attempts=2).fetch(URL, tmp_path, deadline())


def test_a_passed_deadline_fetches_nothing(tmp_path):
    with pytest.raises(DownloadError, match="deadline"):
        downloader().fetch(URL, tmp_path, 0.0)
    assert leftovers(tmp_path) == []


def test_single_file_output_is_not_iterated():
    """Iterating a single URL (or file) yields characters or byte chunks, not outputs."""
    assert outputs_of(MODELS["flux-kontext-max"], "https://h/out.png") == ["https://h/out.png"]
    assert outputs_of(MODELS["flux-dev"], ["https://h/1.webp", "https://h/2.webp"]) == [
        "https://h/1.webp", "https://h/2.webp"]
    assert outputs_of(MODELS["flux-dev"], None) == [] and outputs_of(MODELS["flux-dev"], []) == []
