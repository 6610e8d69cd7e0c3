"""Request-rate limits shared by every thread and process that uses one credential.

NCBI allows 3 requests/s per IP without an API key and 10/s per key; several Ray workers
that share a key must therefore share one budget. `RateLimiter` keeps that budget in a tiny
state file, locked with `fcntl.flock`, under the cache directory:

    slot      = max(now, next_free)          # the earliest instant this caller may send
    next_free = slot + 1 / rate              # reserve it before releasing the lock

Each caller reserves its slot while holding the lock and sleeps *after* releasing it, so
callers queue in reservation order and sends are spaced by at least 1/rate seconds across
all processes (a strict spacing, no bursts: the services count requests per second and a
burst at a window edge is what trips them). The file is named by a hash of the service
and the credential, never the credential itself.

`defer(seconds)` pushes `next_free` forward for everyone, which is how one worker's
`Retry-After` answer slows the whole fleet down instead of each worker discovering it. The
push is capped at `RETRY_AFTER_MAX_S` (a server asking for ten minutes must not freeze every
process on the key for ten minutes), and `acquire(latest=t)` reserves nothing and returns
None when the next free slot is after `t` (a search whose deadline falls inside a long
pause fails at once instead of sleeping through it).
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading
import time
from pathlib import Path
from typing import Optional, Union

try:  # POSIX only; elsewhere the limit is per process (logged once)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

# A `next_free` further ahead than this is a wall-clock jump or a stale file, not a queue.
_MAX_AHEAD_S = 600.0
# The longest server-requested pause honoured, here and in the retry policy (http.RetryPolicy).
RETRY_AFTER_MAX_S = 120.0
_STATE = struct.Struct("<d")
# The live engines send at 95% of a service's published rate (see RateLimiter).
RATE_HEADROOM = 0.95


def default_state_dir() -> Path:
    """`$DEEPRETRIEVAL_CACHE_DIR/ratelimit`, else the user cache directory's `ratelimit`."""
    from deepretrieval.paths import cache_root

    return cache_root() / "ratelimit"


def credential_tag(service: str, credential: Optional[str]) -> str:
    """A file-name-safe tag for (service, credential): a hash, so the key never reaches disk."""
    material = f"{service}\0{credential or 'anonymous'}".encode("utf-8")
    return f"{service}-{hashlib.sha256(material).hexdigest()[:16]}"


class RateLimiter:
    """At most `rate` acquisitions per second across threads and processes sharing `tag`.

    Sends are spaced by `1 / (rate * headroom)` seconds.

    `rate <= 0` or `None` disables the limit (for local mirrors and test servers).
    """

    def __init__(
        self,
        rate: Optional[float],
        tag: str,
        state_dir: Optional[Union[str, Path]] = None,
        headroom: float = 1.0,
    ):
        self.rate = float(rate) if rate else 0.0
        # headroom < 1 spaces sends a little wider than 1/rate: sends leave on schedule but
        # arrive with network and scheduling jitter, and the server counts arrivals.
        self.interval = 1.0 / (self.rate * headroom) if self.rate > 0 else 0.0
        self.tag = tag
        self._lock = threading.Lock()
        self._local_next = 0.0  # fallback state when no file can be used
        self._path: Optional[Path] = None
        self._fd: Optional[int] = None
        self._fd_pid = -1
        self.waited_s = 0.0
        self.acquired = 0
        if self.interval > 0 and fcntl is not None:
            directory = Path(state_dir) if state_dir is not None else default_state_dir()
            try:
                directory.mkdir(parents=True, exist_ok=True)
                self._path = directory / f"{tag}.rate"
            except OSError as exc:
                logger.warning("rate-limit state dir %s unusable (%s); limiting per process", directory, exc)
        elif self.interval > 0:  # pragma: no cover - Windows
            logger.warning("no fcntl on this platform; the rate limit applies per process only")

    def __repr__(self) -> str:
        return f"RateLimiter(rate={self.rate:g}/s, tag={self.tag!r})"

    def _file(self) -> Optional[int]:
        # A descriptor inherited through fork shares its lock with the parent: reopen per pid.
        if self._path is None:
            return None
        if self._fd is None or self._fd_pid != os.getpid():
            try:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
                self._fd_pid = os.getpid()
            except OSError as exc:
                logger.warning("cannot open rate-limit state %s (%s); limiting per process", self._path, exc)
                self._path = None
                return None
        return self._fd

    def _update(self, fn) -> float:
        """Run `fn(next_free, now) -> (result, new_next_free)` atomically across processes."""
        with self._lock:
            fd = self._file()
            now = time.time()
            if fd is None:
                result, self._local_next = fn(self._local_next, now)
                return result
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                raw = os.pread(fd, _STATE.size, 0)
                next_free = _STATE.unpack(raw)[0] if len(raw) == _STATE.size else 0.0
                if next_free > now + _MAX_AHEAD_S:
                    next_free = now
                result, new_next = fn(next_free, now)
                os.pwrite(fd, _STATE.pack(new_next), 0)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            return result

    def reserve(self, latest: Optional[float] = None) -> Optional[float]:
        """Reserve the next send slot; returns its wall-clock time (`time.time()` scale).

        With `latest`, a slot after it is not reserved and None is returned."""
        if self.interval <= 0:
            return time.time()

        def take(nxt: float, now: float):
            slot = max(now, nxt)
            if latest is not None and slot > latest:
                return None, nxt
            return slot, slot + self.interval

        return self._update(take)

    def acquire(self, latest: Optional[float] = None) -> Optional[float]:
        """Block until this caller may send; returns the seconds waited, or None (nothing
        reserved, no wait) when the slot would come after `latest` (`time.time()` scale)."""
        if self.interval <= 0:
            return 0.0
        slot = self.reserve(latest)
        if slot is None:
            return None
        wait = slot - time.time()
        if wait > 0:
            time.sleep(wait)
        wait = max(wait, 0.0)
        with self._lock:
            self.waited_s += wait
            self.acquired += 1
        return wait

    def defer(self, seconds: float, cap: float = RETRY_AFTER_MAX_S) -> float:
        """Hold every sharer back until `min(seconds, cap)` from now (a server's `Retry-After`);
        returns the pause applied."""
        seconds = min(float(seconds), cap) if seconds == seconds else 0.0  # NaN: no pause
        if self.interval <= 0 or seconds <= 0:
            return 0.0
        self._update(lambda nxt, now: (None, max(nxt, now + seconds)))
        return seconds

    def close(self) -> None:
        with self._lock:
            if self._fd is not None and self._fd_pid == os.getpid():
                try:
                    os.close(self._fd)
                except OSError:
                    pass
            self._fd = None

    def __del__(self) -> None:  # best effort; descriptors are cheap
        try:
            self.close()
        except Exception:
            pass
