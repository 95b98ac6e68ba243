"""Admission by time, shared fairly among clients.

An upload is admitted only if the ones ahead of it can be answered within a time budget at the rate this replica
is answering them now. The rest wait at the door, unread, for a place to free up, for at most `door_wait_s`, and
are refused if none does, with the wait they would have had as Retry-After. The short wait at the door is what
keeps clients that send again the moment they are refused from spinning: each of them costs one refusal per
`door_wait_s` instead of one per round trip.

By Little's law the mean time an upload spends here is the number held over the rate they are answered at, so
`(held + 1) / rate` is the wait a new one can expect, whatever the machine, the model or the photos. The rate is
counted over time during which something was held (a *busy clock*), so a quiet spell does not make the replica
look slow, and it only decides anything once the pipeline is full (`floor` uploads held): below that an upload
is always admitted. `max_pending` stays as a cap on the memory uploads in progress can take.

Fairness (one client with hundreds of connections must not take the service from everyone else): the places are
shared among the clients seen lately (`serve_app.client_identity` says who a client is). A client may hold at
most its share of the places the budget admits, `capacity / clients` (never fewer than `min_client_share`); its
uploads past that wait at the door behind everyone else's and are refused with 429 rather than 503, which stays
for "the service as a whole is full". A place freed at the door goes to the waiting client that holds the
fewest. Holding places is not enough, though: admitted uploads are answered first come, first served, so a
client holding 40 places would still put 40 uploads ahead of each of the others'. So uploads also take a *turn*
to enter the pipeline: while other clients are about, each client may have at most its share of the pipeline's
`floor` places in it at once, and its other admitted uploads wait for their turn.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

log = logging.getLogger("ray.serve")

# Answers the rate is measured over: about a second of work on a small CPU, a fraction of one on a GPU node.
RATE_WINDOW = 128
MIN_SAMPLES = 16
MAX_RETRY_AFTER_S = 60
# A client with nothing in progress is still counted among those sharing the places for this long: a user
# sending photo after photo is between two uploads for a round trip, and must not drop out of the count then.
CLIENT_MEMORY_S = 2.0
# Clients remembered at most; those with uploads in progress are bounded by max_pending and the door.
MAX_CLIENTS = 4096


class Overloaded(Exception):
    """Refused with 503: admitting the upload would keep it, or everyone after it, waiting longer than the budget."""

    status = 503

    def __init__(self, reason: str, retry_after_s: int) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class OverShare(Overloaded):
    """Refused with 429: the service has room for others, but this client already holds its share of it."""

    status = 429


@dataclass(frozen=True)
class Limits:
    max_wait_s: float
    max_pending: int
    floor: int
    min_retry_after_s: int = 1
    door_wait_s: float = 0.0
    min_client_share: int = 8
    # How long an upload over its client's share may wait at the door: what its request's timeout leaves once the
    # time budget and an ordinary wait at the door are counted, so that one admitted late is still answered in time.
    over_share_door_wait_s: float = 0.0


@dataclass(eq=False)
class _Client:
    held: int = 0  # places held: admitted, not yet answered
    in_pipeline: int = 0  # of those, the ones that took their turn into the pipeline
    door: deque[asyncio.Future[None]] = field(default_factory=deque)  # waiting for a place, oldest first
    turns: deque[asyncio.Future[None]] = field(default_factory=deque)  # admitted, waiting for their turn
    seen: float = 0.0

    @property
    def idle(self) -> bool:
        return not (self.held or self.door)


class Admission:
    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self.held = 0
        self.waiting = 0  # uploads at the door
        self._busy_total = 0.0  # busy-clock seconds accumulated before the current busy spell
        self._busy_since = 0.0
        self._answered: deque[float] = deque(maxlen=RATE_WINDOW)  # busy-clock time of each recent answer
        self._clients: OrderedDict[str, _Client] = OrderedDict()  # least recently seen first
        self._at_door: dict[str, _Client] = {}  # clients with uploads at the door
        self._awaiting_turns: dict[str, _Client] = {}  # clients with admitted uploads waiting for their turn

    def _busy_clock(self) -> float:
        return self._busy_total + (self._clock() - self._busy_since if self.held else 0.0)

    def rate(self) -> float | None:
        """Uploads answered per busy second over the last `RATE_WINDOW`; None until there are enough."""
        if len(self._answered) < MIN_SAMPLES:
            return None
        span = self._answered[-1] - self._answered[0]
        return (len(self._answered) - 1) / span if span > 0 else None

    def expected_wait_s(self, held: int | None = None) -> float | None:
        rate = self.rate()
        return None if rate is None else ((self.held if held is None else held) + 1) / rate

    @property
    def clients(self) -> int:
        """Clients sharing the places: those with uploads in progress or seen in the last `CLIENT_MEMORY_S`."""
        return len(self._clients)

    def capacity(self) -> int:
        """Places the budget admits at the rate measured now (before it is measured, `max_pending`)."""
        limits = self.limits
        rate = self.rate()
        if rate is None:
            return limits.max_pending
        return min(limits.max_pending, max(limits.floor, math.floor(limits.max_wait_s * rate)))

    def client_share(self) -> int:
        """Places one client may hold while others are about."""
        return max(self.limits.min_client_share, math.ceil(self.capacity() / max(1, len(self._clients))))

    def pipeline_share(self) -> int | None:
        """Uploads one client may have in the pipeline at once: its share of half the pipeline's places (a polite
        client has one upload in it at a time, and each upload a greedy one has there beyond that puts one ahead
        of every polite one); None (no limit) while it is the only client."""
        clients = len(self._clients)
        return None if clients <= 1 else max(1, self.limits.floor // (2 * clients))

    def admit(self, client: str = "") -> None:
        """Take a place now, or raise `Overloaded`; every admitted upload must be `release`d."""
        holder = self._seen(client)
        refusal = self._refusal(holder)
        if refusal is not None:
            raise refusal
        self._take(holder)

    async def enter(self, client: str = "") -> None:
        """Take a place, waiting at the door for one up to `door_wait_s` (longer for a client over its share),
        behind the uploads of clients that hold fewer places; raise `Overloaded` (or `OverShare`) if none frees up.
        Every upload that enters must be `release`d."""
        holder = self._seen(client)
        if self.waiting:
            # Places the rate or the number of clients freed since the last answer go to those at the door first;
            # whoever is left there cannot be admitted (over its share, or the service full), so cannot be passed.
            self._admit_from_door()
        refusal = self._refusal(holder)
        if refusal is None:
            self._take(holder)
            return
        if self.limits.door_wait_s <= 0:
            raise refusal
        if self.waiting >= self.limits.max_pending and not self._make_room_at_door(holder):
            raise self._refusal(holder) or Overloaded(f"{self.waiting} uploads are already waiting at the door",
                                                      self.retry_after_s())
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        holder.door.append(waiter)
        self._at_door[client] = holder
        self.waiting += 1
        timer = loop.call_later(self._door_wait_s(holder), self._turn_away, client, waiter)
        try:
            await waiter
        except asyncio.CancelledError:  # the request went away: give back a place given to it meanwhile
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release(client, answered=False)
            elif waiter in holder.door:
                self._leave_door(client, holder, waiter)
            raise
        finally:
            timer.cancel()

    def _door_wait_s(self, holder: _Client) -> float:
        """`door_wait_s`; for a client over its share, as long as its own uploads should take (its Retry-After, at
        most `over_share_door_wait_s`): a client that sends again the moment it is refused then costs a refusal per
        connection every several seconds, not every `door_wait_s`, and the CPU stays with the answers."""
        limits = self.limits
        if len(self._clients) > 1 and holder.held >= self.client_share():
            return max(limits.door_wait_s, min(limits.over_share_door_wait_s, self._client_retry_after_s(holder)))
        return limits.door_wait_s

    def _seen(self, client: str) -> _Client:
        holder = self._clients.get(client)
        if holder is None:
            holder = self._clients[client] = _Client()
        else:
            self._clients.move_to_end(client)
        holder.seen = self._clock()
        self._forget_idle()
        return holder

    def _forget_idle(self) -> None:
        """Forget clients idle for `CLIENT_MEMORY_S` (or the oldest idle ones past `MAX_CLIENTS`): a few at the front
        of the table per call, so that the table cannot grow without limit and its upkeep costs little."""
        horizon = self._clock() - CLIENT_MEMORY_S
        for _ in range(8):
            name, oldest = next(iter(self._clients.items()))
            if not oldest.idle:
                self._clients.move_to_end(name)  # busy: looked at again once the idle ones behind it are gone
            elif oldest.seen < horizon or len(self._clients) > MAX_CLIENTS:
                del self._clients[name]
            else:
                return

    def _refusal(self, holder: _Client) -> Overloaded | None:
        """Why a new upload of `holder` cannot be admitted now, or None if it can. A client over its share is told
        so (429) even when the service is full as well: it is the one that should slow down. A client alone is
        never over its share: when it is refused, the service is full (503)."""
        limits = self.limits
        if len(self._clients) > 1 and holder.held >= self.client_share():
            return OverShare(f"this client holds {holder.held} places, its share of {self.capacity()} among "
                             f"{len(self._clients)} clients", self._client_retry_after_s(holder))
        if self.held >= limits.max_pending:
            return Overloaded(f"{limits.max_pending} uploads are already in progress", self.retry_after_s())
        if self.held >= limits.floor:
            wait = self.expected_wait_s()
            if wait is not None and wait > limits.max_wait_s:
                return Overloaded(f"the wait would be {wait:.1f} s", self.retry_after_s())
        return None

    def _take(self, holder: _Client) -> None:
        if self.held == 0:
            self._busy_since = self._clock()
        self.held += 1
        holder.held += 1

    def _turn_away(self, client: str, waiter: asyncio.Future[None]) -> None:
        holder = self._clients.get(client)
        if waiter.done() or holder is None:
            return
        self._leave_door(client, holder, waiter)
        waiter.set_exception(self._refusal(holder) or Overloaded("no place freed up", self.retry_after_s()))

    def _leave_door(self, client: str, holder: _Client, waiter: asyncio.Future[None]) -> None:
        holder.door.remove(waiter)
        self.waiting -= 1
        if not holder.door:
            del self._at_door[client]

    def _make_room_at_door(self, newcomer: _Client) -> bool:
        """The door is full: turn away the newest upload of the client with the most there, if that client has
        more there than `newcomer`."""
        client, most = max(self._at_door.items(), key=lambda item: len(item[1].door))
        if most is newcomer or len(most.door) <= len(newcomer.door) + 1:
            return False
        waiter = most.door[-1]
        self._leave_door(client, most, waiter)
        waiter.set_exception(OverShare(f"this client has {len(most.door) + 1} uploads waiting at a full door",
                                       self._client_retry_after_s(most)))
        return True

    def release(self, client: str = "", *, answered: bool = True) -> None:
        now = self._busy_clock()
        if answered:
            self._answered.append(now)
        self.held -= 1
        if self.held == 0:
            self._busy_total = now
        holder = self._clients.get(client)
        if holder is not None:  # always, unless the client was admitted before a restart of the table
            holder.held -= 1
            holder.seen = self._clock()
        self._admit_from_door()

    def _admit_from_door(self) -> None:
        """Give the places free now to the clients at the door that hold the fewest, oldest upload first."""
        while self.waiting:
            client, holder = min(self._at_door.items(), key=lambda item: item[1].held)
            if self._refusal(holder) is not None:
                return
            waiter = holder.door[0]
            self._leave_door(client, holder, waiter)
            if not waiter.done():  # done: its request was cancelled this turn of the loop and has not run yet
                self._take(holder)
                waiter.set_result(None)

    @asynccontextmanager
    async def turn(self, client: str = "") -> AsyncIterator[None]:
        """An admitted upload's turn in the pipeline: while other clients are about, each may have at most its
        `pipeline_share` of uploads in it at once, so that each client's next upload is a few places from the
        front rather than behind everything another client holds."""
        holder = self._clients.get(client) or self._seen(client)
        share = self.pipeline_share()
        if holder.turns or (share is not None and holder.in_pipeline >= share):
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            holder.turns.append(waiter)
            self._awaiting_turns[client] = holder
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():  # given its turn in the same turn of the loop
                    self._end_turn(holder)
                else:
                    holder.turns.remove(waiter)
                    if not holder.turns:
                        self._awaiting_turns.pop(client, None)
                raise
        else:
            holder.in_pipeline += 1
        try:
            yield
        finally:
            self._end_turn(holder)

    def _end_turn(self, holder: _Client) -> None:
        holder.in_pipeline -= 1
        if not self._awaiting_turns:
            return
        share = self.pipeline_share()
        for client, waiting in list(self._awaiting_turns.items()):
            while waiting.turns and (share is None or waiting.in_pipeline < share):
                waiter = waiting.turns.popleft()
                if not waiter.done():
                    waiting.in_pipeline += 1
                    waiter.set_result(None)
            if not waiting.turns:
                del self._awaiting_turns[client]

    def retry_after_s(self) -> int:
        """When the uploads held now should have been answered: the wait a client refused now would have had."""
        return self._bounded_retry_after(self.expected_wait_s(self.held - 1))

    def _client_retry_after_s(self, holder: _Client) -> int:
        """When a client's own uploads should have been answered, at its share of the rate."""
        rate = self.rate()
        return self._bounded_retry_after(None if rate is None else holder.held * len(self._clients) / rate)

    def _bounded_retry_after(self, wait: float | None) -> int:
        return max(self.limits.min_retry_after_s,
                   min(MAX_RETRY_AFTER_S, math.ceil(wait)) if wait is not None else 0)


class RefusalLog:
    """One line a second at most, saying how many uploads were refused and why, instead of a line per refusal. The
    count of a storm's last second is written with the next refusal; every refusal is counted in the metrics."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.count = 0
        self.over_share = 0
        self.since = time.monotonic()

    def refused(self, error: Overloaded, admission: Admission) -> None:
        self.count += 1
        self.over_share += error.status == 429
        now = time.monotonic()
        if now - self.since >= self.interval_s:
            log.info("refused %d uploads in %.1f s, %d of them 429 (last: %s; %d held by %d clients, %d at the "
                     "door, Retry-After %d s)", self.count, now - self.since, self.over_share, error, admission.held,
                     admission.clients, admission.waiting, error.retry_after_s,
                     extra={"access": {"route": "/classify", "status": error.status, "refused": self.count,
                                       "refused_429": self.over_share}})
            self.count, self.over_share, self.since = 0, 0, now
