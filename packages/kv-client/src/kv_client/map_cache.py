"""The cluster map a client routes by, and the rules for fetching a fresh one.

Pure: the clients perform the fetches. Two decisions live here:

- single flight: while one caller fetches, every other caller that needs a map
  joins that fetch instead of starting its own, and a caller refused for a map
  older than the one now cached just uses the cached one (many calls that hit a
  stale map at once cost the cluster one ``GetClusterMap``, not one each);
- where to ask: known members first, then the seeds, each for at most
  ``MAP_FETCH_TIMEOUT`` and never past the caller's deadline; a map never
  replaces one with a higher epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kv_client._transport import MAP_FETCH_TIMEOUT, bootstrap_order, no_map_error
from kv_client.errors import KvError
from kv_common.cluster_map import ClusterMap

Outcome = ClusterMap | KvError
"""What a fetch ends with: the map to route by, or the error to fail with."""


@dataclass(frozen=True, slots=True)
class FetchFrom:
    """Ask ``address`` for its map, waiting at most ``timeout`` seconds."""

    address: str
    timeout: float


@dataclass
class MapFetch:
    """One fetch: the addresses to try in order, and why each one failed."""

    addresses: list[str]
    deadline: float
    tried: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def next(self, now: float) -> FetchFrom | None:
        """The next address to ask, or None when none is left or time is up."""
        remaining = self.deadline - now
        if remaining <= 0 or len(self.tried) == len(self.addresses):
            return None
        address = self.addresses[len(self.tried)]
        self.tried.append(address)
        return FetchFrom(address, min(remaining, MAP_FETCH_TIMEOUT))

    def failed(self, address: str, why: str) -> None:
        self.errors.append(f"{address}: {why}")

    def error(self) -> KvError:
        """The error of a fetch that found no map."""
        return no_map_error(self.tried, self.errors)


@dataclass(frozen=True, slots=True)
class Use:
    """Route by ``cluster_map``; no fetch is needed."""

    cluster_map: ClusterMap


@dataclass(frozen=True, slots=True)
class Fetch:
    """Perform ``fetch`` and report its outcome with ``MapCache.finish``."""

    fetch: MapFetch


@dataclass(frozen=True, slots=True)
class Join:
    """Another caller is fetching: wait until ``MapCache.outcome_after(round)`` is set."""

    round: int


class MapCache:
    """The current map and the one fetch in flight (single flight, both clients)."""

    def __init__(self, seeds: tuple[str, ...]) -> None:
        self.current: ClusterMap | None = None
        self._seeds = seeds
        self._fetching = False
        self._rounds = 0
        self._last: Outcome | None = None

    @property
    def fetching(self) -> bool:
        return self._fetching

    def want(
        self, *, refresh: bool, deadline: float, stale_epoch: int | None = None
    ) -> Use | Fetch | Join:
        """What a caller that needs a map (a fresh one if ``refresh``) does now.

        ``stale_epoch`` is the epoch of the map a node refused, when that is why
        the caller refreshes: a newer cached map is then fresh enough.
        """
        current = self.current
        if current is not None and (
            not refresh or (stale_epoch is not None and current.epoch > stale_epoch)
        ):
            return Use(current)
        if self._fetching:
            return Join(self._rounds)
        self._fetching = True
        return Fetch(MapFetch(bootstrap_order(self._seeds, self.current), deadline))

    def finish(self, outcome: Outcome) -> Outcome:
        """The fetch in flight ended; returns what its caller and joiners get."""
        if isinstance(outcome, ClusterMap) and (
            self.current is None or outcome.epoch >= self.current.epoch
        ):
            self.current = outcome
        result: Outcome = outcome if isinstance(outcome, KvError) else self.current or outcome
        self._fetching = False
        self._rounds += 1
        self._last = result
        return result

    def outcome_after(self, round: int) -> Outcome | None:
        """The outcome joiners of fetch ``round`` get, once it has ended."""
        return self._last if self._rounds > round else None
