"""A node's counters, read from its Prometheus endpoint, for faults that must prove an effect.

A scenario that claims "the restarted node caught up by snapshot" must show that it did: the
node's ``kv_replication_snapshots_*`` counters say so (they count from the node's start, so a
restarted node's are its own since the restart). A node that is down or starting has no
endpoint yet; that reads as nothing, never as an error.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

SCRAPE_TIMEOUT = 2.0
POLL_INTERVAL = 0.05
"""Between two scrapes while waiting for a counter: the node's own pace, not a sync point."""

Counters = dict[str, float]


def scrape(address: str) -> Counters:
    """Every unlabelled sample of the node at ``address`` (its metrics endpoint); {} if it
    does not answer."""
    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=SCRAPE_TIMEOUT) as r:
            text = r.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return {}
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


def wait_for(
    address: str, condition: Callable[[Counters], bool], *, timeout: float
) -> tuple[Counters, float | None]:
    """Scrape until ``condition`` holds: the last counters, and the seconds it took (None if
    ``timeout`` passed first)."""
    started = time.monotonic()
    while True:
        counters = scrape(address)
        elapsed = time.monotonic() - started
        if counters and condition(counters):
            return counters, elapsed
        if elapsed > timeout:
            return counters, None
        time.sleep(POLL_INTERVAL)


__all__ = ["Counters", "scrape", "wait_for"]
