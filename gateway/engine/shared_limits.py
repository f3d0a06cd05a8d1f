"""One account's limits shared on Redis by every worker and replica of the gateway.

The in-process `SlotPool` / `RateWindow` / `Pacer` hold an account's limits exactly only in
one process; N gunicorn workers on M replicas would each admit the whole limit. Here the
same rules run as Lua scripts inside Redis, so every process sees one pool, one window and
one pause per account:

- concurrency: a sorted set of leases (holder -> expiry). A lease that is not renewed
  expires by itself, so a crashed process never keeps its slots (counters would leak).
- creates: a sorted set of booked start times, booked by the same rules as
  `RateWindow.reserve` (sliding window plus margin, a pause after a 429, an adaptive
  "effective" rate spread evenly while the upstream throttles).
- admission checks the lease, the fair queue and the window and books both in ONE script,
  so a request refused for concurrency never consumes rate quota (`acquire_many` admits
  several queued items of one caller in its turn, as many as slots are free; `acquire` one).
- a running holder whose lease lapsed (Redis away longer than a lease, or back empty) takes
  it again (`reclaim_many`); new default limits (`set_defaults`, from /configure) wake the
  queue (`defaults_changed`).
- waiting is fair across processes: a ticket (INCR) in a queue with a heartbeat; only the
  first live ticket may be admitted; whoever frees a slot pushes a wake-up to that ticket's
  own list, on which its owner blocks (`BLPOP`, 0.5 s safety net), so nobody busy-polls.
- every script reads Redis's clock (`TIME`), never the caller's: replicas' clocks may differ.
- fail closed: any Redis error surfaces as `SharedLimitsUnavailable`, never a silent
  fall-back to per-process limits (which would over-admit N x M times).

Keys of one account share one hash tag, `<prefix>:{acct:<account>}:...`, so one Redis
Cluster node runs each script. `account` must already be a digest of the token.

Exceptions: `SharedLimitsError` is the base of `SharedLimitsUnavailable` (Redis failed or
unreachable), `AdmissionTimeout` (no slot within the timeout) and `DeadlineTooSoon` (the
window's earliest start would come after the caller's deadline; nothing was booked).
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

WAKE_POLL_SECONDS = 0.5      # a waiter re-checks at least this often, even without a wake-up
HEARTBEAT_SECONDS = 5.0      # a waiter's ticket dies this long after its last check
IDLE_TTL_SECONDS = 86400     # an account's keys (its /configure overrides too) go after a day unused
DEFAULT_TIMEOUT = 2.0        # connect and socket timeout: callers never hang on a dead Redis


class SharedLimitsError(Exception):
    """Base of the errors of this module."""


class SharedLimitsUnavailable(SharedLimitsError):
    """Redis could not be reached or failed: nothing may be admitted (fail closed)."""


class AdmissionTimeout(SharedLimitsError):
    """No slot became free for this caller within its timeout."""


class DeadlineTooSoon(SharedLimitsError):
    """The earliest allowed create start would come after the caller's deadline; nothing
    was booked. `earliest_delay` is that start, in seconds from now (None if not asked)."""

    def __init__(self, message: str, earliest_delay: float | None = None) -> None:
        super().__init__(message)
        self.earliest_delay = earliest_delay


_CREDENTIALS = re.compile(r"(?i)(\w+://)[^@/\s]*@|(password\s*[=:]\s*)\S+")


def _redacted(text: str) -> str:
    """Masks credentials in a URL (`redis://user:pw@host`) or a `password=` pair."""
    return _CREDENTIALS.sub(lambda m: f"{m.group(1)}***@" if m.group(1) else f"{m.group(2)}***", text)


@contextlib.contextmanager
def _unavailable_on_redis_error(action: str) -> Iterator[None]:
    try:
        yield
    except redis.exceptions.RedisError as exc:
        raise SharedLimitsUnavailable(
            f"Redis is unavailable for the shared account limits ({action}: "
            f"{type(exc).__name__}: {_redacted(str(exc))})") from exc


def connect(url: str, timeout: float = DEFAULT_TIMEOUT) -> redis.Redis:
    """A client for `REDIS_URL` with short timeouts and no retries, so a dead or hung Redis
    surfaces within about `timeout` seconds instead of after redis-py's backoff (a retried
    script could also run twice). Stale pooled connections are replaced on checkout, so
    the first call after a Redis restart works."""
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                retry=Retry(NoBackoff(), 0), decode_responses=True)


def ping(client: redis.Redis) -> None:
    """Raise `SharedLimitsUnavailable` unless Redis answers (for start-up checks)."""
    with _unavailable_on_redis_error("ping"):
        client.ping()


# --- Lua ---------------------------------------------------------------------------------
# KEYS: leases, window, config, queue, order, seq, refused. ARGV[1..8]: lease seconds, window,
# margin, default concurrent limit, default requests per minute, wake-key prefix, idle TTL
# (ms), heartbeat seconds; each script's own arguments follow from ARGV[9].
# `queue` holds live tickets -> heartbeat expiry; `order` the same tickets -> ticket number
# (their FIFO order); a ticket missing from `queue` is dead and is dropped from `order`
# when it reaches the front. Wake-up lists `<prefix>:{acct:..}:wake:<ticket>` share the
# account's hash tag, so they live on the same cluster node as the declared keys.
_PRELUDE = """
if redis.replicate_commands then redis.replicate_commands() end
local LEASES, WINDOW, CONFIG, QUEUE, ORDER, SEQ, REFUSED =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local lease_s, span = tonumber(ARGV[1]), tonumber(ARGV[2]) + tonumber(ARGV[3])
local default_conc, default_rpm = tonumber(ARGV[4]), tonumber(ARGV[5])
local wake_prefix, ttl_ms, beat_s = ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000

local function fmt(x) return string.format('%.6f', x) end

local function limits()
  local c = redis.call('HMGET', CONFIG, 'concurrent_limit', 'requests_per_minute',
                       'effective_limit', 'paused_until')
  local conc = tonumber(c[1]) or default_conc
  local rpm = tonumber(c[2]) or default_rpm
  return conc, rpm, math.min(tonumber(c[3]) or rpm, rpm), tonumber(c[4]) or 0
end

local function live_leases()
  redis.call('ZREMRANGEBYSCORE', LEASES, '-inf', now)
  return redis.call('ZCARD', LEASES)
end

local function head()
  redis.call('ZREMRANGEBYSCORE', QUEUE, '-inf', now)
  while true do
    local first = redis.call('ZRANGE', ORDER, 0, 0)[1]
    if not first or redis.call('ZSCORE', QUEUE, first) then return first end
    redis.call('ZREM', ORDER, first)
    redis.call('DEL', wake_prefix .. first)
  end
end

local function drop_ticket(ticket)
  redis.call('ZREM', QUEUE, ticket)
  redis.call('ZREM', ORDER, ticket)
  redis.call('DEL', wake_prefix .. ticket)
end

-- A slot is free: wake the first live waiter (one wake-up at most per ticket).
local function wake_head(conc)
  if live_leases() >= conc then return end
  local first = head()
  if first then
    local key = wake_prefix .. first
    redis.call('RPUSH', key, '1')
    redis.call('LTRIM', key, 0, 0)
    redis.call('PEXPIRE', key, math.floor(beat_s * 2000))
  end
end

local function touch()
  for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], ttl_ms) end
end

-- RateWindow.reserve's rule: the earliest start the window allows.
local function earliest_start(rpm, eff, paused)
  redis.call('ZREMRANGEBYSCORE', WINDOW, '-inf', now - span)
  local start = math.max(now, paused)
  local count = redis.call('ZCARD', WINDOW)
  if count == 0 then return start end
  local last = tonumber(redis.call('ZRANGE', WINDOW, -1, -1, 'WITHSCORES')[2])
  start = math.max(start, last)
  if count >= eff then
    start = math.max(start, tonumber(redis.call('ZRANGE', WINDOW, -eff, -eff, 'WITHSCORES')[2]) + span)
  end
  if eff < rpm then
    -- Adapted to a throttling upstream: spread starts evenly (it allows no bursts).
    start = math.max(start, last + span / eff)
  end
  return start
end

local function book(start)
  redis.call('ZADD', WINDOW, start, tostring(redis.call('INCR', SEQ)))
end

-- Is it `ticket`'s turn ('' = just arrived) with a slot free? -> ticket, live leases; or, when
-- not, the caller's ticket (new, or refreshed) in the queue and nil.
local function turn(ticket, conc)
  local leases = live_leases()
  local first = head()
  if ticket ~= '' and not redis.call('ZSCORE', QUEUE, ticket) then
    drop_ticket(ticket)   -- its heartbeat lapsed: it lost its place and queues again
    ticket = ''
  end
  local mine = (ticket == '' and not first) or (ticket ~= '' and first == ticket)
  if mine and leases < conc then return ticket, leases end
  if ticket == '' then
    ticket = tostring(redis.call('INCR', SEQ))
    redis.call('ZADD', ORDER, tonumber(ticket), ticket)
  end
  redis.call('ZADD', QUEUE, now + beat_s, ticket)
  touch()
  return ticket, nil
end
"""

# ARGV[9] ticket ('' = just arrived), ARGV[10] n, then n triples (holder, latest delay or '',
# '0' = lease only). In the caller's turn, as many holders as there are free slots, in order,
# are admitted in one step: each takes a lease and (unless lease only) books its create start,
# or is refused ('late' past its latest delay: nothing booked; 'held' if it holds a lease).
# A first holder that already holds a lease is refused at once, without waiting for a turn.
# 'done' always means the caller's ticket is gone.
# -> {'wait', ticket} | {'done', adapting ('1': the effective rate is below the limit), one
#     entry per holder handled: delay | 'late:<earliest>' | 'held'}
_ADMIT_MANY = _PRELUDE + """
local conc, rpm, eff, paused = limits()
live_leases()
if redis.call('ZSCORE', LEASES, ARGV[11]) then
  if ARGV[9] ~= '' then drop_ticket(ARGV[9]); wake_head(conc) end
  return {'done', eff < rpm and '1' or '0', 'held'}
end
local ticket, leases = turn(ARGV[9], conc)
if not leases then return {'wait', ticket} end
local out = {'done', eff < rpm and '1' or '0'}
for i = 0, tonumber(ARGV[10]) - 1 do
  if leases >= conc then break end
  local holder, latest, books = ARGV[11 + 3 * i], ARGV[12 + 3 * i], ARGV[13 + 3 * i] ~= '0'
  local start = now
  if books then start = earliest_start(rpm, eff, paused) end
  if redis.call('ZSCORE', LEASES, holder) then
    out[#out + 1] = 'held'
  elseif books and latest ~= '' and start > now + tonumber(latest) then
    out[#out + 1] = 'late:' .. fmt(start - now)
  else
    redis.call('ZADD', LEASES, now + lease_s, holder)
    if books then book(start) end
    leases = leases + 1
    out[#out + 1] = fmt(start - now)
  end
end
if ticket ~= '' then drop_ticket(ticket) end
wake_head(conc)   -- a slot may still be free: the next waiter's turn
touch()
return out
"""

# ARGV[9] latest delay ('' = none) -> {'ok', delay} | {'late', earliest delay}
_RESERVE = _PRELUDE + """
local conc, rpm, eff, paused = limits()
local start = earliest_start(rpm, eff, paused)
if ARGV[9] ~= '' and start > now + tonumber(ARGV[9]) then return {'late', fmt(start - now)} end
book(start)
touch()
return {'ok', fmt(start - now)}
"""

# ARGV[9..] holders -> the holders whose lease had expired (lost)
_RENEW = _PRELUDE + """
live_leases()
local lost = {}
for i = 9, #ARGV do
  if redis.call('ZSCORE', LEASES, ARGV[i]) then
    redis.call('ZADD', LEASES, 'XX', now + lease_s, ARGV[i])
  else
    lost[#lost + 1] = ARGV[i]
  end
end
touch()
return lost
"""

# ARGV[9..] holders still running whose lease lapsed (Redis was away longer than a lease, or
# restarted empty): they hold their slot again, so the count stays the truth -> how many
_RECLAIM = _PRELUDE + """
live_leases()
local added = 0
for i = 9, #ARGV do
  if not redis.call('ZSCORE', LEASES, ARGV[i]) then added = added + 1 end
  redis.call('ZADD', LEASES, now + lease_s, ARGV[i])
end
touch()
return added
"""

# ARGV[9] holder -> 1 if it held a lease
_RELEASE = _PRELUDE + """
local removed = redis.call('ZREM', LEASES, ARGV[9])
wake_head((limits()))
return removed
"""

# ARGV[9] ticket: a waiter gives up its place
_LEAVE = _PRELUDE + """
drop_ticket(ARGV[9])
wake_head((limits()))
return 1
"""

# ARGV[9] retry-after seconds ('' = 1 s) -> {pause seconds, effective limit}
_THROTTLED = _PRELUDE + """
local conc, rpm, eff, paused = limits()
paused = math.max(paused, now + (tonumber(ARGV[9]) or 1.0))
redis.call('ZADD', REFUSED, now, tostring(redis.call('INCR', SEQ)))
redis.call('ZREMRANGEBYSCORE', REFUSED, '-inf', now - span)
local attempts = redis.call('ZCOUNT', WINDOW, string.format('(%.6f', now - span), now)
local refused = redis.call('ZCARD', REFUSED)
-- Most of the window's attempts refused (low-credit mode): take what passed as the rate.
if refused * 2 > attempts then eff = math.max(1, math.min(eff, attempts - refused)) end
redis.call('HSET', CONFIG, 'paused_until', fmt(paused))
if eff < rpm then redis.call('HSET', CONFIG, 'effective_limit', eff)
else redis.call('HDEL', CONFIG, 'effective_limit') end
touch()
return {fmt(paused - now), eff}
"""

# -> the effective limit after recovering about a tenth
_SUCCEEDED = _PRELUDE + """
local conc, rpm, eff = limits()
if eff < rpm then eff = math.min(rpm, eff + math.max(1, math.floor(eff / 10))) end
if eff < rpm then redis.call('HSET', CONFIG, 'effective_limit', eff)
else redis.call('HDEL', CONFIG, 'effective_limit') end
touch()
return eff
"""

# ARGV[9] concurrent limit ('' = keep), ARGV[10] requests per minute ('' = keep)
_CONFIGURE = _PRELUDE + """
if ARGV[9] ~= '' then redis.call('HSET', CONFIG, 'concurrent_limit', ARGV[9]) end
if ARGV[10] ~= '' then
  redis.call('HSET', CONFIG, 'requests_per_minute', ARGV[10])
  redis.call('HDEL', CONFIG, 'effective_limit')   -- as RateWindow.set_limit
end
touch()
wake_head((limits()))   -- a raised limit admits the queue at once (each admission wakes the next)
return 1
"""

# ARGV[9] '1' if the rate changed. The defaults (ARGV[4], ARGV[5]) changed: a new rate resets
# the adaptive one (as RateWindow.set_limit), a raised limit admits the queue at once.
_DEFAULTS_CHANGED = _PRELUDE + """
if ARGV[9] == '1' then redis.call('HDEL', CONFIG, 'effective_limit') end
wake_head((limits()))
return 1
"""

# -> {slots in use, waiting, creates in window, concurrent, rpm, effective, pause seconds}
_STATUS = _PRELUDE + """
local conc, rpm, eff, paused = limits()
return {redis.call('ZCOUNT', LEASES, '(' .. fmt(now), '+inf'),
        redis.call('ZCOUNT', QUEUE, '(' .. fmt(now), '+inf'),
        redis.call('ZCOUNT', WINDOW, '(' .. fmt(now - span), '+inf'),
        conc, rpm, eff, fmt(math.max(0, paused - now))}
"""

# ARGV[9] interval seconds -> delay until this read's turn (Pacer.reserve, shared)
_PACE_READ = _PRELUDE + """
local start = math.max(now, tonumber(redis.call('HGET', CONFIG, 'next_read')) or now)
redis.call('HSET', CONFIG, 'next_read', fmt(start + tonumber(ARGV[9])))
touch()
return fmt(start - now)
"""

_SCRIPTS = {"admit_many": _ADMIT_MANY, "reserve": _RESERVE, "renew": _RENEW, "reclaim": _RECLAIM,
            "release": _RELEASE, "defaults_changed": _DEFAULTS_CHANGED,
            "leave": _LEAVE, "throttled": _THROTTLED, "succeeded": _SUCCEEDED,
            "configure": _CONFIGURE, "status": _STATUS, "pace_read": _PACE_READ}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _positive_int(name: str, value: int | None) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number of at least 1")
    return str(value)


def _optional_seconds(value: float | None) -> str:
    """'' for None (no bound / the default); a finite number of seconds otherwise."""
    if value is None:
        return ""
    if not math.isfinite(value):
        raise ValueError("seconds must be a finite number (or None)")
    return repr(float(value))


class RedisAccountLimits:
    """The concurrency pool, create window, pause and read pacer of one account, on Redis.

    `concurrent_limit` / `requests_per_minute` apply while the account's Redis config holds
    none (`configure` stores one, in force for every process). Thread-safe: share one
    instance (and one client) among a process's threads. Every method raises
    `SharedLimitsUnavailable` when Redis fails.
    """

    def __init__(self, client: redis.Redis, account: str, prefix: str, lease_seconds: float = 30,
                 window: float = 60, margin: float = 0.5, *, concurrent_limit: int = 60,
                 requests_per_minute: int = 600, reads_per_minute: int = 2700,
                 heartbeat_seconds: float = HEARTBEAT_SECONDS,
                 wake_poll: float = WAKE_POLL_SECONDS) -> None:
        for name, value in (("account", account), ("prefix", prefix)):
            if not value or any(c in value for c in "{}\r\n "):
                raise ValueError(f"{name} must be non-empty, without braces, spaces or newlines")
        if account.startswith("r8_"):
            raise ValueError("account must be a digest of the token, never the token itself")
        if lease_seconds <= 0 or window <= 0 or margin < 0 or heartbeat_seconds <= 0 or wake_poll <= 0:
            raise ValueError("lease_seconds, window, heartbeat_seconds and wake_poll must be "
                             "positive, margin at least 0")
        if wake_poll * 2 > heartbeat_seconds:  # a waiter must refresh its ticket in time
            raise ValueError("heartbeat_seconds must be at least twice wake_poll")
        self.account, self.prefix = account, prefix
        self.lease_seconds, self.window, self.margin = float(lease_seconds), float(window), float(margin)
        self.wake_poll = float(wake_poll)
        self._read_interval = self.window / _reads(reads_per_minute)
        base = f"{prefix}:{{acct:{account}}}"
        self.keys = [f"{base}:{name}" for name in
                     ("leases", "window", "config", "queue", "order", "seq", "refused")]
        self._wake_prefix = f"{base}:wake:"
        self._heartbeat = float(heartbeat_seconds)
        self._common: list[str] = []
        self.set_defaults(concurrent_limit, requests_per_minute)
        self._client = client
        # The effective rate was below the limit at the last admission (a throttling upstream):
        # only then does a success need telling (`succeeded`).
        self.adapting = True
        self._scripts = {name: client.register_script(src) for name, src in _SCRIPTS.items()}

    def set_defaults(self, concurrent_limit: int, requests_per_minute: int) -> None:
        """The limits in force while the account's Redis config holds none (see `configure`),
        for this instance's next calls; `defaults_changed` then tells Redis's waiters."""
        self._common = [repr(self.lease_seconds), repr(self.window), repr(self.margin),
                        _positive_int("concurrent_limit", concurrent_limit),
                        _positive_int("requests_per_minute", requests_per_minute),
                        self._wake_prefix, str(IDLE_TTL_SECONDS * 1000), repr(self._heartbeat)]

    def _run(self, name: str, *args: str) -> Any:
        with _unavailable_on_redis_error(name):
            return self._scripts[name](keys=self.keys, args=[*self._common, *args])

    # -- concurrency + window, admitted together ---------------------------------------
    def acquire(self, holder: str, latest_delay: float | None, timeout: float, *, book_create: bool = True,
                keep_waiting: Callable[[], bool] | None = None) -> float:
        """Wait (fairly, in ticket order across all processes) for a slot, then hold a lease
        for `holder` and book one create start in the window; return the delay until that
        start. The lease lasts `lease_seconds`: `renew` it (see `LeaseKeeper`) and
        `release` it. Raises `AdmissionTimeout` when no slot came within `timeout` seconds
        (0 = one try) or `keep_waiting()` (asked before each wait) returned False,
        `DeadlineTooSoon` when the booked start would come more than `latest_delay` seconds
        after the call, or that deadline passed while waiting (nothing booked either way),
        `ValueError` if `holder` already holds a lease here (at once, without waiting for a
        slot). With `book_create=False` only the lease is taken (the prediction exists
        already) and 0 is returned. The caller's queue ticket is removed on every exit.
        This is `acquire_many` with one request."""
        result = self.acquire_many([(holder, latest_delay, book_create)], timeout, keep_waiting=keep_waiting)[0]
        if isinstance(result, Exception):
            raise result
        return result

    def acquire_many(self, requests: Sequence[tuple[str, float | None, bool]], timeout: float, *,
                     keep_waiting: Callable[[], bool] | None = None) -> list[float | Exception]:
        """`acquire` for several holders of one caller in one turn: `requests` are
        (holder, latest_delay, book_create). Once it is the caller's turn, as many of them, in
        order, as there are free slots are admitted in one atomic step, so a burst of freed
        slots costs one wake-up per process instead of one per item. Returns one result per
        request handled (a prefix of `requests`, at least one): the delay until its booked
        start (0 for a lease only), or, for one not admitted, a `DeadlineTooSoon` (its start
        would come after its latest delay, or the first one's deadline passed while waiting)
        or a `ValueError` (the holder held a lease; for the first one, answered at once
        without waiting). Raises `AdmissionTimeout` when the turn did not come within
        `timeout` seconds (0 = one try) or `keep_waiting()` (asked before each wait) returned
        False. The caller's queue ticket is removed on every exit."""
        if not requests:
            raise ValueError("no holders to admit")
        began = time.monotonic()
        ticket = ""
        try:
            while True:
                elapsed = time.monotonic() - began
                first_latest = requests[0][1]
                if first_latest is not None and first_latest - elapsed < 0:
                    return [DeadlineTooSoon("the deadline passed while waiting for a slot")]
                args = [ticket, str(len(requests))]
                for holder, latest, book_create in requests:
                    late = None if latest is None or latest == math.inf else latest - elapsed
                    args += [holder, _optional_seconds(late), "1" if book_create else "0"]
                reply = [_text(v) for v in self._run("admit_many", *args)]
                if reply[0] == "done":
                    ticket = ""  # the script gave up its place
                    self.adapting = reply[1] == "1"
                    return [_admitted(entry) for entry in reply[2:]]
                ticket = reply[1]
                remaining = timeout - (time.monotonic() - began)
                if remaining <= 0:
                    raise AdmissionTimeout(f"no free slot within {timeout:g} s")
                if keep_waiting is not None and not keep_waiting():
                    raise AdmissionTimeout("the caller stopped waiting for a slot")
                with _unavailable_on_redis_error("wait"):
                    self._client.blpop([self._wake_prefix + ticket], timeout=max(0.01, min(self.wake_poll, remaining)))
        finally:
            if ticket:
                self._leave(ticket)

    def _leave(self, ticket: str) -> None:
        try:
            self._run("leave", ticket)
        except SharedLimitsUnavailable as exc:  # its heartbeat lapses by itself
            log.warning("could not remove a queue ticket: %s", exc)

    def reserve(self, latest_delay: float | None = None) -> float | None:
        """Book one more create start for a caller already holding a lease (a retry after
        a 429 or a 5xx); return the delay until it, or None (nothing booked) when it would
        come more than `latest_delay` seconds from now. Same rule as `RateWindow.reserve`."""
        reply = [_text(v) for v in self._run("reserve", _optional_seconds(latest_delay))]
        return float(reply[1]) if reply[0] == "ok" else None

    def renew(self, holder: str) -> bool:
        """Extend `holder`'s lease by `lease_seconds`; False if it had expired (the slot may
        have gone to another caller: this process is over the limit until it releases)."""
        return holder not in self.renew_many([holder])

    def renew_many(self, holders: Iterable[str]) -> set[str]:
        """Renew several leases in one step; return the holders whose lease was lost."""
        holders = list(holders)
        if not holders:
            return set()
        return {_text(h) for h in self._run("renew", *holders)}

    def reclaim_many(self, holders: Iterable[str]) -> int:
        """Hold a lease again for holders still running whose lease lapsed (Redis was away
        longer than a lease, or came back empty); return how many had lapsed."""
        holders = list(holders)
        return int(self._run("reclaim", *holders)) if holders else 0

    def defaults_changed(self, rate_changed: bool) -> None:
        """After `set_defaults`: reset the adaptive rate if the rate changed, and wake the
        first waiter (a raised limit admits the queue at once)."""
        self._run("defaults_changed", "1" if rate_changed else "0")

    def release(self, holder: str) -> bool:
        """Free `holder`'s slot and wake the first waiter; False if it held none."""
        return int(self._run("release", holder)) == 1

    # -- the upstream's answers ---------------------------------------------------------
    def throttled(self, retry_after: float | None) -> None:
        """The upstream said 429: no process starts a create before `retry_after` seconds
        (1 s if None); when the upstream refused most of the window's attempts, the
        account's effective rate drops to what it accepted (as `RateWindow.throttled`)."""
        self.adapting = True
        self._run("throttled", _optional_seconds(retry_after))

    def succeeded(self) -> None:
        """A create went through: recover the effective rate by about a tenth."""
        self._run("succeeded")

    def pace_read(self) -> float:
        """Book the account's next read (poll, cancel, list) evenly spaced at
        `reads_per_minute` across all processes; return the delay until it."""
        return float(_text(self._run("pace_read", repr(self._read_interval))))

    # -- limits and status --------------------------------------------------------------
    def configure(self, concurrent_limit: int | None = None, requests_per_minute: int | None = None) -> None:
        """Store new limits for this account in Redis: in force for every process at once.
        Lowering lets holders finish and admits nobody until fewer hold leases; raising
        admits waiters at once. A new rate resets the adaptive effective rate to it."""
        self._run("configure", _positive_int("concurrent_limit", concurrent_limit),
                  _positive_int("requests_per_minute", requests_per_minute))

    def status(self) -> dict[str, int | float]:
        """Live leases, live waiting tickets, creates booked in the window (future ones
        included), the limits in force and the seconds left of a pause."""
        values = [_text(v) for v in self._run("status")]
        names = ("slots_in_use", "queued", "creates_in_window", "concurrent_limit",
                 "requests_per_minute", "effective_limit")
        result: dict[str, int | float] = {name: int(v) for name, v in zip(names, values[:6], strict=True)}
        result["paused_for"] = float(values[6])
        return result

    def in_window(self) -> int:
        """Creates booked in the current window (including ones booked for later)."""
        return int(self.status()["creates_in_window"])


def _admitted(entry: str) -> float | Exception:
    if entry == "held":
        return ValueError("this holder already holds a lease on this account")
    if entry.startswith("late:"):
        earliest = float(entry[5:])
        return DeadlineTooSoon(f"the window's next create start is {earliest:.1f} s away, past the deadline",
                               earliest)
    return float(entry)


def _reads(per_minute: int) -> int:
    _positive_int("reads_per_minute", per_minute)
    return per_minute


class LeaseKeeper:
    """Renews registered leases from one background thread every `lease_seconds / 3`.

    Started and stopped explicitly. `on_lost(limits, holder)` is called (from the keeper's
    thread) when a lease had already expired; Redis errors are logged and retried at the
    next round, while the leases run out by themselves if Redis stays away. Discard a
    holder before releasing it, or the next round reports it lost.
    """

    def __init__(self, lease_seconds: float = 30,
                 on_lost: Callable[[RedisAccountLimits, str], None] | None = None) -> None:
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        self.interval = lease_seconds / 3
        self._on_lost = on_lost
        self._held: dict[RedisAccountLimits, set[str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, limits: RedisAccountLimits, holder: str) -> None:
        with self._lock:
            self._held.setdefault(limits, set()).add(holder)

    def discard(self, limits: RedisAccountLimits, holder: str) -> None:
        with self._lock:
            holders = self._held.get(limits)
            if holders is not None:
                holders.discard(holder)
                if not holders:
                    del self._held[limits]

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("LeaseKeeper already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="lease-keeper", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def renew_now(self) -> None:
        """One round of renewals (the thread's work; callable directly)."""
        with self._lock:
            snapshot = [(limits, list(holders)) for limits, holders in self._held.items()]
        for limits, holders in snapshot:
            try:
                lost = limits.renew_many(holders)
            except SharedLimitsUnavailable as exc:
                log.warning("renewing %d leases failed: %s", len(holders), exc)
                continue
            for holder in lost:
                self._lost(limits, holder)

    def _lost(self, limits: RedisAccountLimits, holder: str) -> None:
        with self._lock:
            still_kept = holder in self._held.get(limits, ())
        if not still_kept:  # discarded meanwhile: released, not lost
            return
        self.discard(limits, holder)
        log.warning("lease %s of a shared account pool had expired before its renewal", holder)
        if self._on_lost is not None:
            self._on_lost(limits, holder)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.renew_now()
            except Exception:  # the keeper must outlive one bad round
                log.exception("lease renewal round failed")
