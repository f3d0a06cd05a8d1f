"""Finding predictions whose create answer never reached us, in the upstream's own list.

A create can go through upstream while its answer is lost: the connection dropped after the
request was sent, the process died holding a `Prefer: wait` connection, or the service wants
to cancel a prediction whose create is still held open (its id is not known until the answer
comes). In each case the prediction is looked for in `GET /v1/predictions` (newest first) by
the exact input that was sent, among predictions created since the create was sent and not
already claimed by another item. This is the one place that matching is done.
"""
from __future__ import annotations

import json
from collections.abc import Hashable, Iterable
from typing import Any, Protocol

from gateway.engine.upstream import PredictionState

# The upstream stamps `created_at` with its own clock; ours may be behind or ahead of it.
# Looking this much further back than the moment the create was sent absorbs that skew
# (a few seconds in practice) with a wide margin; the cost is reading a page more.
CLOCK_SKEW_SECONDS = 30.0


class PredictionLister(Protocol):
    def recent_since(self, since: float, max_pages: int = ...) -> list[dict[str, Any]]: ...


def _canonical(value: Any) -> Any:
    """Numbers compared by value (the upstream may echo 3.0 as 3), keys in order."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def input_key(data: Any) -> str:
    """A hashable form of an upstream input, equal for inputs the upstream treats as equal."""
    return json.dumps(_canonical(data), sort_keys=True, ensure_ascii=False)


def find_lost_creates(lister: PredictionLister, wanted: Iterable[tuple[Hashable, dict[str, Any]]],
                      since: float, claimed: set[str], only_running: bool = False,
                      max_pages: int = 10) -> dict[Hashable, PredictionState]:
    """Match each `(key, input)` of `wanted` to an upstream prediction created after `since`
    (wall time, less CLOCK_SKEW_SECONDS) with exactly that input and an id not in `claimed`.

    Several items with the same input take the matching predictions oldest first, one each.
    With `only_running`, finished predictions are skipped (looking for a create still held
    open: an older finished prediction with the same input is not it). One read of the list
    serves every wanted item. Raises UpstreamError or httpx errors if the list cannot be read.
    """
    wanted = list(wanted)
    if not wanted:
        return {}
    pool: dict[str, list[dict[str, Any]]] = {}
    for found in reversed(lister.recent_since(since - CLOCK_SKEW_SECONDS, max_pages=max_pages)):
        state = PredictionState.from_json(found)
        if state.id in claimed or (only_running and state.final):
            continue
        pool.setdefault(input_key(found.get("input")), []).append(found)
    matched: dict[Hashable, PredictionState] = {}
    for key, data in wanted:
        candidates = pool.get(input_key(data))
        if candidates:
            matched[key] = PredictionState.from_json(candidates.pop(0))
    return matched
