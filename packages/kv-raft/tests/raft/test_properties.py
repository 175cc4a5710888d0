"""Property tests: arbitrary schedules of ticks, proposals, partitions and restarts stay safe."""

from __future__ import annotations

import contextlib

from hypothesis import given, settings
from hypothesis import strategies as st

from kv_raft.node import ProposalDropped
from kv_raft.sim.lockstep import LockstepCluster
from kv_raft.types import Role

ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("tick"), st.integers(1, 15)),
        st.tuples(st.just("propose"), st.integers(1, 3)),
        st.tuples(st.just("isolate"), st.integers(1, 3)),
        st.tuples(st.just("heal"), st.just(0)),
        st.tuples(st.just("restart"), st.integers(1, 3)),
    ),
    max_size=40,
)


@settings(max_examples=40, deadline=None)
@given(actions=ACTIONS, seed=st.integers(0, 1000))
def test_random_schedules_keep_applied_logs_consistent(
    actions: list[tuple[str, int]], seed: int
) -> None:
    c = LockstepCluster(3, seed=seed)
    leaders: dict[int, int] = {}
    counter = 0
    for action, arg in actions:
        if action == "tick":
            c.tick(arg)
        elif action == "propose":
            counter += 1
            with contextlib.suppress(ProposalDropped):
                c.nodes[arg].propose(f"p{counter}".encode())
            c.stabilize()
        elif action == "isolate":
            c.isolate(arg)
        elif action == "heal":
            c.heal()
        else:
            c.applied[arg] = []  # the state machine restarts from the (empty) snapshot
            c.start(arg)
        for node_id, node in c.nodes.items():
            if node.role == Role.LEADER:
                assert leaders.setdefault(node.term, node_id) == node_id
    logs = [[(e.index, e.term, e.data) for e in c.applied[i]] for i in c.ids]
    for a in logs:
        for b in logs:
            assert _aligned(a, b)


def _aligned(a: list[tuple[int, int, bytes]], b: list[tuple[int, int, bytes]]) -> bool:
    """Same entry at every index both applied (restarts re-apply from the start)."""
    by_index = {i: (t, d) for i, t, d in a}
    return all(by_index.get(i, (t, d)) == (t, d) for i, t, d in b)
