"""The map cache's rules: single flight, where to ask, and that epochs never go back."""

from __future__ import annotations

from kv_client._transport import MAP_FETCH_TIMEOUT
from kv_client.errors import UnavailableError
from kv_client.map_cache import Fetch, FetchFrom, Join, MapCache, Use
from kv_common.cluster_map import ClusterMap, Member

SEEDS = ("seed:1", "10.0.0.2:7000")
MEMBERS = (Member("a", "10.0.0.1:7000"), Member("b", "10.0.0.2:7000"))


def cluster_map(epoch: int) -> ClusterMap:
    return ClusterMap.build(
        epoch=epoch, members=MEMBERS, partitions=64, replication_factor=1, vnodes=8
    )


def test_one_fetch_in_flight_and_everyone_else_joins_it() -> None:
    cache = MapCache(SEEDS)
    first = cache.want(refresh=False, deadline=10.0)
    assert isinstance(first, Fetch)
    assert cache.fetching
    joiners = [cache.want(refresh=flag, deadline=10.0) for flag in (False, True, True)]
    assert joiners == [Join(0), Join(0), Join(0)], "no second fetch while one is in flight"
    assert cache.outcome_after(0) is None, "joiners wait until the fetch ends"
    fresh = cluster_map(1)
    assert cache.finish(fresh) is fresh
    assert not cache.fetching
    assert cache.outcome_after(0) is fresh
    assert cache.want(refresh=False, deadline=10.0) == Use(fresh)
    again = cache.want(refresh=True, deadline=10.0)
    assert isinstance(again, Fetch), "a refresh after the fetch ended is a new fetch"
    assert cache.want(refresh=True, deadline=10.0) == Join(1)


def test_a_failed_fetch_reaches_its_joiners_and_keeps_the_old_map() -> None:
    cache = MapCache(SEEDS)
    assert isinstance(cache.want(refresh=False, deadline=1.0), Fetch)
    old = cluster_map(2)
    cache.finish(old)
    assert isinstance(cache.want(refresh=True, deadline=1.0), Fetch)
    assert cache.want(refresh=True, deadline=1.0) == Join(1)
    error = UnavailableError("no node answered")
    assert cache.finish(error) is error
    assert cache.outcome_after(1) is error
    assert cache.current is old
    assert cache.want(refresh=False, deadline=1.0) == Use(old)


def test_a_caller_refused_for_an_older_map_uses_the_newer_one() -> None:
    cache = MapCache(SEEDS)
    cache.want(refresh=False, deadline=1.0)
    fresh = cluster_map(3)
    cache.finish(fresh)
    assert cache.want(refresh=True, deadline=1.0, stale_epoch=2) == Use(fresh)
    assert isinstance(cache.want(refresh=True, deadline=1.0, stale_epoch=3), Fetch), (
        "refused with the map we have: only a fetch can help"
    )


def test_a_map_never_replaces_a_newer_one() -> None:
    cache = MapCache(SEEDS)
    cache.want(refresh=True, deadline=1.0)
    newer = cluster_map(5)
    cache.finish(newer)
    cache.want(refresh=True, deadline=1.0)
    assert cache.finish(cluster_map(4)) is newer, "the caller routes by the newer map"
    assert cache.current is newer
    cache.want(refresh=True, deadline=1.0)
    same_epoch = cluster_map(5)
    assert cache.finish(same_epoch) is same_epoch, "an equal epoch is as good and more recent"


def test_known_members_are_asked_first_then_the_seeds_within_the_deadline() -> None:
    cache = MapCache(SEEDS)
    first = cache.want(refresh=False, deadline=10.0)
    assert isinstance(first, Fetch)
    assert first.fetch.addresses == list(SEEDS)
    cache.finish(cluster_map(1))
    step = cache.want(refresh=True, deadline=10.0)
    assert isinstance(step, Fetch)
    fetch = step.fetch
    assert fetch.addresses == ["10.0.0.1:7000", "10.0.0.2:7000", "seed:1"], "no address twice"
    assert fetch.next(now=0.0) == FetchFrom("10.0.0.1:7000", MAP_FETCH_TIMEOUT)
    fetch.failed("10.0.0.1:7000", "refused")
    assert fetch.next(now=9.5) == FetchFrom("10.0.0.2:7000", 0.5), "never past the deadline"
    fetch.failed("10.0.0.2:7000", "late")
    assert fetch.next(now=10.0) is None, "no time left"
    error = fetch.error()
    assert isinstance(error, UnavailableError)
    assert "tried 2" in error.message
    assert "10.0.0.1:7000: refused; 10.0.0.2:7000: late" in error.message


def test_a_fetch_ends_when_every_address_was_tried() -> None:
    cache = MapCache(("only:1",))
    step = cache.want(refresh=False, deadline=10.0)
    assert isinstance(step, Fetch)
    assert step.fetch.next(now=0.0) == FetchFrom("only:1", MAP_FETCH_TIMEOUT)
    assert step.fetch.next(now=0.0) is None
