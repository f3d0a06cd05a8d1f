"""`make run`: start the service under gunicorn, as in production.

With no REPLICATE_API_TOKEN configured (environment or .env), it runs a DEMO instead: the
bundled Replicate emulator on 127.0.0.1:5099 as the upstream, a demo token, and the admin
key `demo-admin-key` unless one is set. Nothing in demo mode reaches Replicate or costs money.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import urllib.request

from app import read_environment

log = logging.getLogger("serve")
GUNICORN = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"]
DEMO_BANNER = """
==========================================================================
 DEMO MODE: no REPLICATE_API_TOKEN is configured, so the service runs
 against the bundled Replicate EMULATOR at {emulator}. Images are
 synthetic stand-ins. Set REPLICATE_API_TOKEN (see .env.example) to use
 the real Replicate.
   curl -s localhost:{port}/health
   curl -s -X POST localhost:{port}/generate -H 'X-Admin-API-Key: {admin}' \\
        -H 'Content-Type: application/json' \\
        -d '{{"model_name": "flux-dev", "prompt": "A red sports car"}}'
==========================================================================
"""


def _wait_until_up(url: str, seconds: float = 15.0) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the emulator did not answer at {url}")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    env = read_environment()
    if env.get("REPLICATE_API_TOKEN", "").strip():
        os.execv(sys.executable, GUNICORN)
    port = os.environ.get("EMULATOR_PORT", "5099")
    emulator = subprocess.Popen([sys.executable, "-m", "replicate_emulator", "--port", port,
                                 "--set", "latency=uniform", "--set", "latency_min_s=1",
                                 "--set", "latency_max_s=3"])
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_until_up(f"{base}/_emulator/health")
        admin = env.get("CONCURRENT_DOCKER_ADMIN_API_KEY") or "demo-admin-key"
        demo_env = {**os.environ, "REPLICATE_BASE_URL": base, "REPLICATE_API_TOKEN": "r8_demo_token_emulator",
                    "CONCURRENT_DOCKER_ADMIN_API_KEY": admin}
        log.warning(DEMO_BANNER.format(emulator=base, port=env.get("FLASK_PORT", "5003"), admin=admin))
        return subprocess.call(GUNICORN, env=demo_env)
    except KeyboardInterrupt:
        return 0
    finally:
        emulator.terminate()
        emulator.wait(10)


if __name__ == "__main__":
    sys.exit(main())
