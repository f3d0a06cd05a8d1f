"""Property-based: arbitrary JSON at every endpoint never yields a 500, a traceback, or a
file outside OUTPUT_DIR, and the service keeps answering /health."""
from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import ADMIN, USER_TOKEN

SCALARS = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True) | st.text(max_size=30)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
                    max_leaves=12)
FIELDS = st.sampled_from(["model_name", "prompt", "prompts", "custom_filename", "custom_filenames", "aspect_ratio",
                          "num_outputs", "output_format", "input_image", "seed", "guidance", "megapixels",
                          "concurrent_limit", "requests_per_minute", "safety_tolerance"])
MODEL = st.sampled_from(["flux-dev", "flux-kontext-max", "qwen-image", "qwen/qwen-image", "", "../x"])
BODIES = JSON | st.dictionaries(FIELDS, JSON, max_size=6) | st.builds(
    lambda model, extra: {"model_name": model, **extra}, MODEL, st.dictionaries(FIELDS, JSON, max_size=5))
PATHS = st.sampled_from(["/generate", "/generate-batch", "/configure", "/health", "/status", "/models"])
HEADERS = st.sampled_from([ADMIN, {"X-Replicate-API-Key": USER_TOKEN}, {}, {"X-Admin-API-Key": "x"}])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=PATHS, body=BODIES, headers=HEADERS, method=st.sampled_from(["POST", "GET", "PUT"]))
def test_arbitrary_json_never_breaks_the_service(service, emu, tmp_path, path, body, headers, method):
    raw = json.dumps(body)  # NaN and Infinity stay in, as a hostile client may send them
    r = service.http.request(method, service.url + path, data=raw,
                             headers={**headers, "Content-Type": "application/json"}, timeout=60)
    assert r.status_code < 500 or r.status_code in (502, 503, 504), (r.status_code, r.text)
    assert r.headers["Content-Type"].startswith("application/json")
    assert "Traceback" not in r.text and 'File "' not in r.text
    output = tmp_path / "output"
    for found in tmp_path.rglob("*"):
        assert found == output or output in found.parents
    if path == "/configure" and r.status_code == 200:  # keep later examples fast
        service.post("/configure", {"concurrent_limit": 60, "requests_per_minute": 600}, ADMIN)
    assert service.get("/health").json()["status"] == "healthy"
