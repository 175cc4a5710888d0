"""The hostile-input suite: every test module attacks its own real node(s) and, after each
test, checks that the node still answers and holds everything it acknowledged.

Each module defines a module-scoped ``target`` fixture (see ``hostile.target``) and ends
with a test that kills its nodes with SIGKILL and checks the ledger after a restart.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hostile.target import Target


@pytest.fixture(autouse=True)
def after_every_attack(target: Target) -> Iterator[None]:
    """The node answers health checks and every earlier write reads back intact."""
    yield
    target.check_intact()
