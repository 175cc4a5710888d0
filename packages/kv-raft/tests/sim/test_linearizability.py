from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kv_raft.sim.linearizability import CheckResult, CheckTimeout, Op, check_history

# --------------------------------------------------------------------------------------------
# Helpers to build operations tersely: times are (call, ret); ret=None means unknown outcome.


def put(client: int, value: str, call: int, ret: int | None, key: str = "x") -> Op:
    return Op(client, key, "put", value, None, None, call, ret)


def get(client: int, output: str | None, call: int, ret: int, key: str = "x") -> Op:
    return Op(client, key, "get", None, None, output, call, ret)


def cas(
    client: int,
    expected: str | None,
    new: str,
    output: bool | None,
    call: int,
    ret: int | None,
    key: str = "x",
) -> Op:
    return Op(client, key, "cas", new, expected, output, call, ret)


def assert_ok(ops: Sequence[Op]) -> None:
    result = check_history(ops)
    assert result.ok, result.message
    assert result.key is None


def assert_bad(ops: Sequence[Op], key: str = "x") -> CheckResult:
    result = check_history(ops)
    assert not result.ok, "expected a linearizability violation"
    assert result.key == key
    assert f"key {key!r} is not linearizable" in result.message
    return result


# --------------------------------------------------------------------------------------------
# Linearizable histories.


def test_empty_history() -> None:
    assert_ok([])


def test_read_of_absent_key() -> None:
    assert_ok([get(1, None, 0, 1)])
    assert_bad([get(1, "a", 0, 1)])


def test_sequential_history() -> None:
    assert_ok(
        [
            get(1, None, 0, 1),
            put(1, "a", 2, 3),
            get(2, "a", 4, 5),
            put(2, "b", 6, 7),
            get(1, "b", 8, 9),
        ]
    )


@pytest.mark.parametrize(("first", "second"), [("a", "b"), ("b", "a")])
def test_overlapping_puts_may_be_read_in_either_order(first: str, second: str) -> None:
    # put a and put b overlap, so later reads may see them applied in either order.
    assert_ok(
        [
            put(1, "a", 0, 3),
            put(2, "b", 1, 4),
            get(3, first, 5, 6),
            get(3, first, 7, 8),
        ]
    )
    # While both are still in flight a reader can see one then the other...
    assert_ok(
        [
            put(1, "a", 0, 10),
            put(2, "b", 1, 11),
            get(3, first, 2, 3),
            get(3, second, 4, 5),
        ]
    )
    # ...but not flip back afterwards.
    assert_bad(
        [
            put(1, "a", 0, 10),
            put(2, "b", 1, 11),
            get(3, first, 2, 3),
            get(3, second, 4, 5),
            get(3, first, 6, 7),
        ]
    )


def test_stale_looking_read_is_fine_when_it_overlaps_the_write() -> None:
    assert_ok(
        [
            put(1, "a", 0, 1),
            put(1, "b", 2, 9),  # still in flight while the reads happen
            get(2, "a", 3, 4),
            get(3, "b", 5, 6),
        ]
    )
    # A read overlapping a put may return the old value even if it returns after the put does.
    assert_ok([put(1, "a", 0, 1), put(1, "b", 2, 4), get(2, "a", 3, 5)])


def test_cas_chain() -> None:
    assert_ok(
        [
            cas(1, None, "a", True, 0, 1),
            cas(2, None, "z", False, 2, 3),
            cas(2, "a", "b", True, 4, 5),
            cas(1, "b", "c", True, 6, 7),
            cas(3, "b", "d", False, 8, 9),
            get(3, "c", 10, 11),
        ]
    )


def test_concurrent_cas_only_one_wins() -> None:
    assert_ok(
        [
            put(1, "a", 0, 1),
            cas(2, "a", "b", True, 2, 5),
            cas(3, "a", "c", False, 3, 6),
            get(1, "b", 7, 8),
        ]
    )
    # Both may fail-or-succeed in the other order too, as they overlap.
    assert_ok(
        [
            put(1, "a", 0, 1),
            cas(2, "a", "b", False, 2, 5),
            cas(3, "a", "c", True, 3, 6),
            get(1, "c", 7, 8),
        ]
    )


def test_cas_chain_requiring_a_specific_interleaving() -> None:
    # Three overlapping ops: the only valid order is put b, cas b->c, cas c->d.
    assert_ok(
        [
            cas(1, "c", "d", True, 0, 10),
            cas(2, "b", "c", True, 1, 11),
            put(3, "b", 2, 12),
            get(4, "d", 13, 14),
        ]
    )


def test_equal_timestamps_count_as_overlapping() -> None:
    # put returns at 2 and the get is invoked at 2: treated as concurrent.
    assert_ok([put(1, "a", 0, 1), put(1, "b", 1, 2), get(2, "a", 2, 3)])


def test_input_order_does_not_matter() -> None:
    ops = [put(1, "a", 0, 1), put(1, "b", 2, 3), get(2, "b", 4, 5), get(2, "a", 6, 7)]
    for seed in range(5):
        shuffled = list(ops)
        random.Random(seed).shuffle(shuffled)
        assert_bad(shuffled)


# --------------------------------------------------------------------------------------------
# Non-linearizable histories.


def test_read_of_value_never_written() -> None:
    result = assert_bad([put(1, "a", 0, 1), get(2, "zzz", 2, 3)])
    assert "get() -> 'zzz'" in result.message


def test_read_of_old_value_after_newer_put_returned() -> None:
    result = assert_bad(
        [put(1, "a", 0, 1), put(1, "b", 2, 3), get(2, "b", 4, 5), get(2, "a", 6, 7)]
    )
    # The message names the longest prefix and the op that could not be placed.
    assert "Longest linearizable prefix: 3 of 4 ops" in result.message
    assert "Could not linearize get() -> 'a' client 2 [6, 7]" in result.message


def test_lost_write() -> None:
    # put b returned, yet a later read still sees the previous value.
    assert_bad([put(1, "a", 0, 1), put(2, "b", 2, 3), get(3, "a", 4, 5)])


def test_two_cas_with_same_expected_both_succeeding() -> None:
    assert_bad(
        [
            put(1, "a", 0, 1),
            cas(2, "a", "b", True, 2, 5),
            cas(3, "a", "c", True, 3, 6),
        ]
    )


def test_failed_cas_that_should_have_succeeded() -> None:
    assert_bad([put(1, "a", 0, 1), cas(2, "a", "b", False, 2, 3)])


def test_failed_cas_changes_nothing() -> None:
    assert_bad([put(1, "a", 0, 1), cas(2, "z", "b", False, 2, 3), get(1, "b", 4, 5)])
    assert_ok([put(1, "a", 0, 1), cas(2, "z", "b", False, 2, 3), get(1, "a", 4, 5)])


def test_cas_on_absent_key() -> None:
    assert_ok([cas(1, None, "a", True, 0, 1), get(2, "a", 2, 3)])
    assert_bad([put(1, "a", 0, 1), cas(1, None, "b", True, 2, 3)])


def test_read_before_the_write_was_invoked() -> None:
    assert_bad([get(1, "a", 0, 1), put(2, "a", 2, 3)])


# --------------------------------------------------------------------------------------------
# Unknown outcomes (ret=None).


def test_timed_out_put_later_read_is_ok() -> None:
    assert_ok([put(1, "a", 0, 1), put(2, "b", 2, None), get(3, "b", 10, 11)])


def test_timed_out_put_never_seen_is_ok() -> None:
    assert_ok([put(1, "a", 0, 1), put(2, "b", 2, None), get(3, "a", 10, 11), get(3, "a", 12, 13)])


def test_timed_out_put_seen_then_overwritten_then_seen_again_is_bad() -> None:
    # It can take effect at most once.
    assert_bad(
        [
            put(2, "b", 0, None),
            get(3, "b", 1, 2),
            put(1, "a", 3, 4),
            get(3, "b", 5, 6),
        ]
    )


def test_timed_out_put_cannot_take_effect_before_its_call() -> None:
    assert_bad([get(1, "b", 0, 1), put(2, "b", 2, None)])


def test_timed_out_cas_that_must_have_succeeded() -> None:
    assert_ok([put(1, "a", 0, 1), cas(2, "a", "b", None, 2, None), get(3, "b", 5, 6)])
    # If its precondition could never hold, the new value cannot appear.
    assert_bad([put(1, "a", 0, 1), cas(2, "z", "b", None, 2, None), get(3, "b", 5, 6)])


def test_timed_out_cas_that_must_have_failed_or_not_happened() -> None:
    assert_ok([put(1, "a", 0, 1), cas(2, "a", "b", None, 2, None), get(3, "a", 5, 6)])


def test_timed_out_get_is_ignored() -> None:
    timed_out_get = Op(1, "x", "get", None, None, None, 0, None)
    assert_ok([timed_out_get, put(2, "a", 1, 2)])


def test_timed_out_cas_enables_a_later_cas() -> None:
    assert_ok(
        [
            put(1, "a", 0, 1),
            cas(2, "a", "b", None, 2, None),
            cas(3, "b", "c", True, 4, 5),
            get(1, "c", 6, 7),
        ]
    )


# --------------------------------------------------------------------------------------------
# Multiple keys.


def test_keys_are_checked_independently() -> None:
    ops = [
        put(1, "a", 0, 1, key="k1"),
        put(2, "a", 2, 3, key="k2"),
        get(1, "a", 4, 5, key="k1"),
        # This would be a violation on a single register but k2 was never written with "b".
        get(2, "a", 6, 7, key="k2"),
        put(3, "b", 8, 9, key="k3"),
        get(3, "b", 10, 11, key="k3"),
    ]
    assert_ok(ops)


def test_only_the_bad_key_is_reported() -> None:
    ops = [
        put(1, "a", 0, 1, key="good1"),
        put(2, "a", 2, 3, key="bad"),
        put(2, "b", 4, 5, key="bad"),
        get(1, "a", 6, 7, key="good1"),
        get(3, "a", 8, 9, key="bad"),  # lost write on "bad"
        put(4, "c", 10, 11, key="good2"),
        get(4, "c", 12, 13, key="good2"),
    ]
    result = assert_bad(ops, key="bad")
    assert "good1" not in result.message
    assert "good2" not in result.message


def test_first_bad_key_by_call_time_is_reported() -> None:
    ops = [
        get(1, "zzz", 10, 11, key="late"),
        get(2, "zzz", 0, 1, key="early"),
    ]
    assert check_history(ops).key == "early"


# --------------------------------------------------------------------------------------------
# Input validation.


@pytest.mark.parametrize(
    "op",
    [
        put(1, "a", 5, 4),  # ret < call
        put(1, "a", 5, 5),  # ret == call
        Op(1, "x", "put", None, None, None, 0, 1),  # put without value
        Op(1, "x", "put", "a", None, True, 0, 1),  # put with output
        Op(1, "x", "put", "a", "b", None, 0, 1),  # put with expected
        Op(1, "x", "get", "a", None, "a", 0, 1),  # get with value
        Op(1, "x", "get", None, None, True, 0, 1),  # get with bool output
        Op(1, "x", "cas", "b", "a", None, 0, 1),  # completed cas without bool output
        Op(1, "x", "cas", "b", "a", "yes", 0, 1),  # completed cas with str output
        Op(1, "x", "cas", None, "a", True, 0, 1),  # cas without new value
        Op(1, "x", "cas", "b", "a", True, 0, None),  # unknown outcome with an output
        Op(1, "x", "get", None, None, "a", 0, None),  # unknown outcome with an output
        Op(1, "x", "delete", None, None, None, 0, 1),  # type: ignore[arg-type]
        Op(1, 7, "get", None, None, None, 0, 1),  # type: ignore[arg-type]
        Op(1, "x", "get", None, None, None, 0.5, 1),  # type: ignore[arg-type]
    ],
)
def test_invalid_ops_are_rejected(op: Op) -> None:
    with pytest.raises(ValueError, match="invalid op #1"):
        check_history([put(1, "a", 100, 101), op])


@pytest.mark.parametrize("max_states", [0, -1])
def test_invalid_max_states(max_states: int) -> None:
    with pytest.raises(ValueError, match="max_states"):
        check_history([], max_states=max_states)


# --------------------------------------------------------------------------------------------
# The max_states guard.


def _wide_history(width: int, key: str = "x") -> list[Op]:
    """`width` overlapping puts and a read of a value never written: forces a full search."""
    ops = [put(c, f"v{c}", c, 3 * width + c, key=key) for c in range(width)]
    ops.append(get(width, "never-written", width, width + 1, key=key))
    return ops


def test_max_states_guard_raises_instead_of_passing() -> None:
    ops = _wide_history(12)
    with pytest.raises(CheckTimeout) as excinfo:
        check_history(ops, max_states=100)
    assert excinfo.value.key == "x"
    assert excinfo.value.keys == ("x",)
    assert excinfo.value.max_states == 100
    assert "inconclusive" in str(excinfo.value)
    # With enough budget the same history gets a definite answer.
    result = check_history(ops)
    assert not result.ok
    assert result.key == "x"


def test_max_states_guard_does_not_hide_a_definite_violation() -> None:
    ops = [
        *_wide_history(12, key="slow"),
        put(1, "a", 100, 101, key="bad"),
        put(1, "b", 102, 103, key="bad"),
        get(2, "a", 104, 105, key="bad"),
    ]
    result = check_history(ops, max_states=100)
    assert not result.ok
    assert result.key == "bad"


def test_max_states_is_enough_for_an_easy_history() -> None:
    ops = [put(1, str(i), 2 * i, 2 * i + 1) for i in range(50)]
    assert check_history(ops, max_states=50).ok
    with pytest.raises(CheckTimeout):
        check_history(ops, max_states=49)


# --------------------------------------------------------------------------------------------
# Generated histories.
#
# `simulate` runs clients against a dict.  Each op goes through invoke -> take effect (executed
# atomically against the dict) -> respond, each phase at its own logical time, so the recorded
# history is linearizable by construction (the effect order is a witness), with real overlap
# whenever several clients are active.  A client may give up on an op (ret=None); the op may
# already have taken effect, may take effect later, or never.

VALUES = ["a", "b", "c"]


def simulate(
    rng: random.Random,
    *,
    n_ops: int,
    n_clients: int,
    keys: Sequence[str],
    timeout_rate: float = 0.0,
    unique_values: bool = False,
) -> list[Op]:
    """Run `n_ops` random ops from `n_clients` clients; `unique_values` makes every write new."""
    clock = 0
    written = 0

    def new_value() -> str:
        nonlocal written
        written += 1
        return f"v{written}" if unique_values else rng.choice(VALUES)

    history: list[Op] = []
    store: dict[str, str] = {}
    # client -> (op with call time set, [output once applied, else `not_applied`])
    active: dict[int, tuple[Op, list[object]]] = {}
    abandoned: list[Op] = []  # invoked, not applied, client gave up: may apply later
    not_applied = object()
    started = 0

    def apply(op: Op) -> str | bool | None:
        current = store.get(op.key)
        if op.kind == "get":
            return current
        if op.kind == "put":
            assert op.value is not None
            store[op.key] = op.value
            return None
        assert op.value is not None
        if current == op.expected:
            store[op.key] = op.value
            return True
        return False

    while started < n_ops or active:
        clock += 1
        if abandoned and rng.random() < 0.05:
            apply(abandoned.pop(rng.randrange(len(abandoned))))
            continue
        client = rng.randrange(n_clients)
        if client not in active:
            if started == n_ops:
                continue
            started += 1
            key = rng.choice(keys)
            kind = rng.choice(["put", "get", "cas"])
            if kind == "put":
                template = Op(client, key, "put", new_value(), None, None, clock, None)
            elif kind == "get":
                template = Op(client, key, "get", None, None, None, clock, None)
            else:
                expected = store.get(key) if rng.random() < 0.5 else rng.choice([*VALUES, None])
                template = Op(client, key, "cas", new_value(), expected, None, clock, None)
            active[client] = (template, [not_applied])
            continue
        template, slot = active[client]
        if slot[0] is not_applied:
            if rng.random() < timeout_rate:
                # Give up before the effect: it may still happen later, or never.
                del active[client]
                history.append(template)
                if template.kind != "get" and rng.random() < 0.5:
                    abandoned.append(template)
                continue
            slot[0] = apply(template)
            continue
        del active[client]
        if rng.random() < timeout_rate:
            history.append(template)  # took effect, but the response was lost
            continue
        output = slot[0]
        assert output is None or isinstance(output, (str, bool))
        history.append(replace(template, output=output, ret=clock))
    return history


@st.composite
def simulated_histories(draw: st.DrawFn) -> list[Op]:
    rng = draw(st.randoms(use_true_random=False))
    return simulate(
        rng,
        n_ops=draw(st.integers(min_value=0, max_value=40)),
        n_clients=draw(st.integers(min_value=1, max_value=5)),
        keys=["k0", "k1", "k2"][: draw(st.integers(min_value=1, max_value=3))],
        timeout_rate=draw(st.sampled_from([0.0, 0.0, 0.05, 0.2])),
        unique_values=draw(st.booleans()),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(simulated_histories())
def test_executed_histories_are_linearizable(history: list[Op]) -> None:
    result = check_history(history)
    assert result.ok, result.message


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(simulated_histories(), st.data())
def test_reading_a_never_written_value_is_detected(history: list[Op], data: st.DataObject) -> None:
    reads = [i for i, op in enumerate(history) if op.kind == "get" and op.ret is not None]
    if not reads:
        history = [*history, get(99, None, 10_000, 10_001, key="k0")]
        reads = [len(history) - 1]
    index = data.draw(st.sampled_from(reads))
    bad = replace(history[index], output="never-written")
    mutated = [*history[:index], bad, *history[index + 1 :]]
    result = check_history(mutated)
    assert not result.ok
    assert result.key == bad.key
    assert result.message.startswith(f"key {bad.key!r} is not linearizable")


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(simulated_histories())
def test_sequential_replay_is_linearizable(history: list[Op]) -> None:
    # Non-overlapping timestamps: the same ops re-executed one at a time in call order.
    store: dict[str, str] = {}
    replayed: list[Op] = []
    for t, op in enumerate(sorted(history, key=lambda o: o.call)):
        current = store.get(op.key)
        output: str | bool | None = None
        if op.kind == "get":
            output = current
        elif op.kind == "put":
            assert op.value is not None
            store[op.key] = op.value
        else:
            assert op.value is not None
            output = current == op.expected
            if output:
                store[op.key] = op.value
        replayed.append(replace(op, output=output, call=2 * t, ret=2 * t + 1))
    assert_ok(replayed)


# --------------------------------------------------------------------------------------------
# Differential test against a brute-force search over all orders, on small arbitrary histories.


def brute_force_linearizable(ops: Sequence[Op]) -> bool:
    """Exhaustive reference: try every real-time-respecting order of the ops over a dict.

    Ops with an unknown outcome may be applied at any point after their call or skipped; a get
    with unknown outcome is unconstrained.
    """
    n = len(ops)

    def precedes(a: Op, b: Op) -> bool:
        return a.ret is not None and a.ret < b.call

    preds = [{j for j in range(n) if precedes(ops[j], ops[i])} for i in range(n)]

    def search(done: frozenset[int], store: dict[str, str]) -> bool:
        if len(done) == n:
            return True
        for i in range(n):
            if i in done or not preds[i] <= done:
                continue
            op = ops[i]
            nxt = done | {i}
            if op.ret is None and search(nxt, store):  # never took effect
                return True
            current = store.get(op.key)
            if op.kind == "get":
                if (op.ret is None or op.output == current) and search(nxt, store):
                    return True
            elif op.kind == "put":
                assert op.value is not None
                if search(nxt, {**store, op.key: op.value}):
                    return True
            else:
                assert op.value is not None
                succeeded = current == op.expected
                if op.ret is not None and op.output != succeeded:
                    continue
                after = {**store, op.key: op.value} if succeeded else store
                if search(nxt, after):
                    return True
        return False

    return search(frozenset(), {})


@st.composite
def arbitrary_histories(draw: st.DrawFn) -> list[Op]:
    n = draw(st.integers(min_value=1, max_value=6))
    values = st.sampled_from(["a", "b"])
    maybe_values = st.sampled_from(["a", "b", None])
    raw: list[tuple[Op, int, int | None]] = []
    for i in range(n):
        key = draw(st.sampled_from(["x", "y"]))
        start = draw(st.integers(min_value=0, max_value=10))
        end = start + draw(st.integers(min_value=1, max_value=6))
        timed_out = draw(st.booleans()) and draw(st.booleans())
        kind = draw(st.sampled_from(["put", "get", "cas"]))
        if kind == "put":
            op = Op(i, key, "put", draw(values), None, None, 0, None)
        elif kind == "get":
            output = None if timed_out else draw(maybe_values)
            op = Op(i, key, "get", None, None, output, 0, None)
        else:
            output_bool = None if timed_out else draw(st.booleans())
            op = Op(i, key, "cas", draw(values), draw(maybe_values), output_bool, 0, None)
        raw.append((op, start, None if timed_out else end))
    # Renumber to distinct times, keeping calls before returns on ties.
    events = sorted(
        [(start, 0, i) for i, (_, start, _) in enumerate(raw)]
        + [(end, 1, i) for i, (_, _, end) in enumerate(raw) if end is not None]
    )
    calls: dict[int, int] = {}
    rets: dict[int, int] = {}
    for t, (_, phase, i) in enumerate(events):
        (calls if phase == 0 else rets)[i] = t
    return [replace(op, call=calls[i], ret=rets.get(i)) for i, (op, _, _) in enumerate(raw)]


@settings(max_examples=500, deadline=None)
@given(arbitrary_histories())
def test_agrees_with_brute_force(history: list[Op]) -> None:
    assert check_history(history).ok == brute_force_linearizable(history)


def test_brute_force_reference_sanity() -> None:
    assert brute_force_linearizable([put(1, "a", 0, 1), get(2, "a", 2, 3)])
    assert not brute_force_linearizable([put(1, "a", 0, 1), put(1, "b", 2, 3), get(2, "a", 4, 5)])
    assert brute_force_linearizable([put(1, "a", 0, None), get(2, None, 2, 3)])


# --------------------------------------------------------------------------------------------
# Performance sanity: a long, concurrent history must be decided well within the budget.


@pytest.mark.parametrize(
    ("timeout_rate", "unique_values"), [(0.0, False), (0.0, True), (0.01, False), (0.05, True)]
)
def test_long_concurrent_history(timeout_rate: float, unique_values: bool) -> None:
    rng = random.Random(20261126)
    history = simulate(
        rng,
        n_ops=2000,
        n_clients=5,
        keys=["k0", "k1", "k2"],
        timeout_rate=timeout_rate,
        unique_values=unique_values,
    )
    assert len(history) == 2000
    result = check_history(history, max_states=200_000)
    assert result.ok, result.message
    # And a single corrupted read deep inside it is still found.
    index = max(i for i, op in enumerate(history) if op.kind == "get" and op.ret is not None)
    mutated = list(history)
    mutated[index] = replace(history[index], output="never-written")
    result = check_history(mutated, max_states=200_000)
    assert not result.ok
    assert result.key == history[index].key


def test_timed_out_op_that_does_not_change_the_value() -> None:
    # Linearizing these leaves the register unchanged; they must still be placeable.
    assert_ok([put(1, "a", 0, 1), put(2, "a", 2, None)])
    assert_ok([put(1, "a", 0, 1), cas(2, "z", "b", None, 2, None)])
    assert_ok([put(1, "a", 0, 1), cas(2, "a", "a", None, 2, None), get(3, "a", 3, 4)])
