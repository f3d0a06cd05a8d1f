"""The usual alternative: a plain script, 50 threads, the official client's `run` per prompt,
each output written to disk. Failures are counted, not retried (as such scripts do)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import replicate
import requests


def run_baseline(base_url: str, token: str, model: str, prompts: list[str], folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    client = replicate.Client(api_token=token, base_url=base_url)
    http = requests.Session()

    def one(index: int) -> bool:
        try:
            output = client.run(model, input={"prompt": prompts[index]})
            url = output[0] if isinstance(output, list) else output
            (folder / f"{index}.webp").write_bytes(http.get(str(url), timeout=60).content)
            return True
        except Exception:  # the baseline's honest behaviour: a failure is a lost image
            return False

    with ThreadPoolExecutor(max_workers=50) as pool:
        done = list(pool.map(one, range(len(prompts))))
    return {"completed": sum(done), "total": len(prompts)}


def run_lean(base_url: str, token: str, model: str, prompts: list[str], folder: Path, concurrency: int) -> dict:
    """A lean client, for reference: `concurrency` threads, each a loop of one create held
    open (`Prefer: wait`) and one download written to disk; no journal, no names, no
    retries. What the machine and the emulator allow any client at this concurrency."""
    folder.mkdir(parents=True, exist_ok=True)
    url = f"{base_url}/v1/models/{model}/predictions"
    headers = {"Authorization": f"Bearer {token}", "Prefer": "wait=60"}
    pending = iter(range(len(prompts)))
    done: list[bool] = []

    def loop() -> None:
        http = requests.Session()
        for index in pending:  # one shared iterator: each prompt is taken once
            try:
                output = http.post(url, json={"input": {"prompt": prompts[index]}}, headers=headers,
                                   timeout=120).json()["output"]
                file_url = output[0] if isinstance(output, list) else output
                (folder / f"{index}.webp").write_bytes(http.get(file_url, timeout=60).content)
                done.append(True)
            except Exception:  # counted as not done, like the baseline
                done.append(False)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(loop)
    return {"completed": sum(done), "total": len(prompts)}
