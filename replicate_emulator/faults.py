"""Fault settings of the emulator: what can go wrong, how often, and the per-prompt markers.

Every setting can be given at start (flag `--set name=value` or env `EMULATOR_<NAME>`) and
changed at run time with `PATCH /_emulator/faults`. Markers written into a prompt force a
fault for that prediction alone, which keeps tests deterministic:
`[[fail]]`, `[[hang]]`, `[[5xx]]`, `[[429]]`, `[[drop]]`, `[[404]]`, `[[truncate]]`,
`[[latency=1.5]]`, and the odd endings `[[abort]]`, `[[cancel]]`, `[[empty]]` (succeeded
with no output) and `[[early_output]]` (output shown while still `processing`).
"""
from __future__ import annotations

import dataclasses
import math
import random
import re
from typing import Any

MARKER = re.compile(r"\[\[(\w+)(?:=([0-9.]+))?\]\]")
LATENCY_KINDS = ("fixed", "uniform", "longtail")


@dataclasses.dataclass
class Faults:
    latency: str = "fixed"          # fixed | uniform | longtail (log-normal)
    latency_s: float = 0.2          # the fixed value, or the median of longtail
    latency_min_s: float = 0.1      # uniform lower bound
    latency_max_s: float = 1.0      # uniform upper bound; cap of longtail
    latency_sigma: float = 1.0      # longtail spread
    start_delay_s: float = 0.0      # time a prediction spends in `starting`
    fail_rate: float = 0.0          # prediction ends `failed`
    hang_rate: float = 0.0          # prediction never finishes (until canceled)
    create_5xx_rate: float = 0.0    # create answers 500/502/503, nothing created
    create_429_rate: float = 0.0    # create answers 429 regardless of the window (a storm)
    storm_retry_after_s: int = 1    # Retry-After of storm 429s
    drop_rate: float = 0.0          # create's connection dropped after the prediction exists
    output_404_rate: float = 0.0    # an output file that is never there
    truncate_rate: float = 0.0      # a download cut short (per request)
    download_bytes_per_s: float = 0.0  # 0: unthrottled
    output_ttl_s: float = 3600.0    # outputs deleted (404, data_removed) after this
    create_limit: int = 600         # creates per window per token
    other_limit: int = 3000         # other API calls per window per token
    window_s: float = 60.0          # the rate-limit window
    cancel_after_min_s: float = 5.0  # shortest Cancel-After accepted, as on Replicate

    def update(self, changes: dict[str, Any]) -> None:
        """Apply `changes`, all or nothing; raises ValueError naming a bad key or value."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        staged = {}
        for key, value in changes.items():
            if key not in fields:
                raise ValueError(f"unknown fault setting {key!r}; known: {sorted(fields)}")
            staged[key] = _coerce(key, fields[key].type, value)
        for key, value in staged.items():
            setattr(self, key, value)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def sample_latency(self, rng: random.Random) -> float:
        if self.latency == "uniform":
            return rng.uniform(self.latency_min_s, self.latency_max_s)
        if self.latency == "longtail":
            value = self.latency_s * math.exp(rng.gauss(0.0, self.latency_sigma))
            return min(value, self.latency_max_s)
        return self.latency_s


def _coerce(key: str, kind: str, value: Any) -> Any:
    try:
        if kind == "str":
            if value not in LATENCY_KINDS:
                raise ValueError
            return value
        number = int(value) if kind == "int" else float(value)
    except (TypeError, ValueError):
        raise ValueError(f"bad value {value!r} for {key}") from None
    if number < 0 or (key.endswith("_rate") and number > 1):
        raise ValueError(f"bad value {value!r} for {key}")
    return number


def markers(prompt: Any) -> dict[str, str]:
    """The `[[name]]` / `[[name=value]]` markers in a prompt."""
    if not isinstance(prompt, str):
        return {}
    return {m.group(1): m.group(2) or "" for m in MARKER.finditer(prompt)}


def decide(rng: random.Random, rate: float, marks: dict[str, str], name: str) -> bool:
    return name in marks or (rate > 0 and rng.random() < rate)
