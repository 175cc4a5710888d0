"""Per-key linearizability checker for key-value register histories.

The checker follows the Wing & Gong search as refined by Lowe ("just-in-time linearization")
and popularised by porcupine:

* Linearizability is local (Herlihy & Wing), so the history is split by key and every key is
  checked on its own against a single-register model.
* For one key, every operation contributes a *call* and a *return* entry; the entries are sorted
  by time and kept in a doubly linked list.  A depth-first search walks the list from the front:
  at a call entry it tries to linearize that (pending) operation now, i.e. apply it to the model
  state; if the model accepts it, both of its entries are unlinked and the walk restarts from the
  front.  Reaching a return entry means an operation whose response has already been observed
  is still unplaced, so the most recent choice is undone (backtracking) and the walk continues
  after it.  Once every operation with a known outcome is placed, the history is linearizable.
* Configurations the search backtracked out of are memoized as (bitset of linearized operations,
  register value); reaching one again cannot lead anywhere new, so the search prunes it.

Unknown outcomes (``ret is None``): the operation may have taken effect at any point after its
call, or never.  A get with an unknown outcome constrains nothing and is dropped.  A put or cas
with an unknown outcome gets a return time after every other event and its output is not
checked (a cas then succeeds iff the register holds ``expected`` at its linearization point);
"never took effect" is covered by linearizing it at the very end.  Such operations would
multiply the search space, so three sound reductions apply to them: they are tried only after
the known-outcome candidates of a configuration and only when they change the register; among
ones with the same effect the earliest-called is used first; and since leaving one unplaced never
hurts, a configuration is also pruned when it matches a failed one except for having placed a
superset of the unknown-outcome operations.

Timing semantics: operation ``a`` must be linearized before ``b`` iff ``a.ret < b.call``.  Equal
timestamps are treated as overlapping (call entries sort before return entries), which is the
permissive choice and never produces a false "not linearizable".

The search is exponential in the worst case; ``max_states`` bounds the number of configurations
it enters per key and :class:`CheckTimeout` is raised when it is exceeded, so an
inconclusive check can never be mistaken for a pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["CheckResult", "CheckTimeout", "Op", "check_history"]


@dataclass(frozen=True)
class Op:
    """One client operation on a single key, as observed by the client."""

    client: int
    key: str
    kind: Literal["put", "get", "cas"]
    value: str | None
    """put: the value written; cas: the new value; get: None."""
    expected: str | None
    """cas: the value that must be current (None = key absent); otherwise None."""
    output: str | bool | None
    """get: value read (None = absent); cas: whether it succeeded; put: None.

    Must be None when ``ret`` is None (no response was observed)."""
    call: int
    """Logical time of invocation."""
    ret: int | None
    """Logical time of the response; None = outcome unknown (e.g. the client timed out)."""


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    key: str | None
    """The first key found not linearizable (None when ``ok``)."""
    message: str


class CheckTimeout(Exception):
    """The search exceeded ``max_states`` for at least one key: the result is inconclusive.

    Only raised when no key was found to be definitely non-linearizable.
    """

    def __init__(self, keys: Sequence[str], max_states: int) -> None:
        self.keys: tuple[str, ...] = tuple(keys)
        self.key: str = self.keys[0]
        self.max_states = max_states
        listed = ", ".join(repr(k) for k in self.keys)
        super().__init__(
            f"linearizability check inconclusive: the search for key(s) {listed} needed more "
            f"than max_states={max_states} states"
        )


# Operation codes used by the search loop.
_PUT = 0
_GET = 1
_CAS = 2
_CAS_UNKNOWN = 3  # cas whose outcome was not observed: output is unconstrained


class _StateLimitExceeded(Exception):
    pass


def check_history(ops: Sequence[Op], *, max_states: int = 1_000_000) -> CheckResult:
    """Check that ``ops`` is linearizable w.r.t. a per-key register that starts absent.

    Keys are checked in order of their earliest call.  Returns the first key found not
    linearizable; raises :class:`CheckTimeout` if no key failed but some key could not be decided
    within ``max_states`` search configurations (counted per key); raises :class:`ValueError` on
    malformed input.
    """
    if isinstance(max_states, bool) or not isinstance(max_states, int) or max_states < 1:
        raise ValueError(f"max_states must be a positive int, got {max_states!r}")
    for index, op in enumerate(ops):
        _validate(index, op)

    by_key: dict[str, list[Op]] = {}
    first_call: dict[str, int] = {}
    for op in ops:
        if op.kind == "get" and op.ret is None:
            continue  # an unanswered read constrains nothing
        by_key.setdefault(op.key, []).append(op)
        first_call[op.key] = min(first_call.get(op.key, op.call), op.call)
    # Stable sort: keys with the same earliest call keep their order of first appearance.
    keys = sorted(by_key, key=lambda k: first_call[k])

    inconclusive: list[str] = []
    for key in keys:
        try:
            failure = _check_key(key, by_key[key], max_states)
        except _StateLimitExceeded:
            inconclusive.append(key)
            continue
        if failure is not None:
            return CheckResult(ok=False, key=key, message=failure)
    if inconclusive:
        raise CheckTimeout(inconclusive, max_states)
    return CheckResult(
        ok=True,
        key=None,
        message=f"linearizable: {len(ops)} operations over {len(keys)} key(s)",
    )


def _validate(index: int, op: Op) -> None:
    def bad(reason: str) -> ValueError:
        return ValueError(f"invalid op #{index} ({op!r}): {reason}")

    if not isinstance(op, Op):
        raise ValueError(f"invalid op #{index}: expected an Op, got {type(op).__name__}")
    if not isinstance(op.key, str):
        raise bad("key must be a str")
    if isinstance(op.client, bool) or not isinstance(op.client, int):
        raise bad("client must be an int")
    if isinstance(op.call, bool) or not isinstance(op.call, int):
        raise bad("call must be an int")
    if op.ret is not None:
        if isinstance(op.ret, bool) or not isinstance(op.ret, int):
            raise bad("ret must be an int or None")
        if op.ret <= op.call:
            raise bad("ret must be greater than call")
    elif op.output is not None:
        raise bad("an op with unknown outcome (ret=None) must have output=None")

    if op.kind == "put":
        if not isinstance(op.value, str):
            raise bad("put needs a str value")
        if op.expected is not None or op.output is not None:
            raise bad("put must have expected=None and output=None")
    elif op.kind == "get":
        if op.value is not None or op.expected is not None:
            raise bad("get must have value=None and expected=None")
        if op.output is not None and not isinstance(op.output, str):
            raise bad("get output must be a str or None")
    elif op.kind == "cas":
        if not isinstance(op.value, str):
            raise bad("cas needs a str (new) value")
        if op.expected is not None and not isinstance(op.expected, str):
            raise bad("cas expected must be a str or None")
        if op.ret is not None and not isinstance(op.output, bool):
            raise bad("a completed cas must have a bool output")
    else:
        raise bad(f"unknown kind {op.kind!r}")


def _describe(op: Op) -> str:
    ret = "?" if op.ret is None else str(op.ret)
    when = f"client {op.client} [{op.call}, {ret}]"
    if op.kind == "put":
        return f"put({op.value!r}) {when}"
    if op.kind == "get":
        return f"get() -> {op.output!r} {when}"
    outcome = "?" if op.ret is None else repr(op.output)
    return f"cas({op.expected!r} -> {op.value!r}) -> {outcome} {when}"


def _check_key(key: str, ops: list[Op], max_states: int) -> str | None:
    """Search one key's history; return None if linearizable, else a failure explanation."""
    n = len(ops)
    if n == 0:
        return None

    codes: list[int] = []
    for op in ops:
        if op.kind == "put":
            codes.append(_PUT)
        elif op.kind == "get":
            codes.append(_GET)
        else:
            codes.append(_CAS if op.ret is not None else _CAS_UNKNOWN)
    # Values that no get reads and no cas expects are indistinguishable to every op, so they are
    # all replaced by one placeholder: fewer distinct states, and more interchangeable ops.
    observable = {op.output for op in ops if op.kind == "get" and isinstance(op.output, str)}
    observable.update(op.expected for op in ops if op.kind == "cas" and op.expected is not None)
    unobserved = "<unobserved>"
    while unobserved in observable:
        unobserved += "'"
    values = [op.value if op.value in observable else unobserved for op in ops]
    expecteds = [op.expected for op in ops]
    outputs = [op.output for op in ops]

    # Entries 1..2n sorted by time (calls before returns on ties); 0 is the head sentinel and
    # 2n+1 the tail sentinel.  Unknown outcomes return after every observed event.
    horizon = 1 + max(max(op.call, op.ret if op.ret is not None else op.call) for op in ops)
    events = sorted(
        [(op.call, 0, i) for i, op in enumerate(ops)]
        + [(op.ret if op.ret is not None else horizon, 1, i) for i, op in enumerate(ops)]
    )
    tail = 2 * n + 1
    entry_op = [-1] * (tail + 1)
    is_call = [False] * (tail + 1)
    return_entry = [0] * n
    for position, (_, phase, i) in enumerate(events, start=1):
        entry_op[position] = i
        if phase == 0:
            is_call[position] = True
        else:
            return_entry[i] = position
    nxt = list(range(1, tail + 2))
    prv = list(range(-1, tail))

    state: str | None = None  # the register starts absent
    # Bit i is set <=> ops[i] is linearized; ops with a known outcome and those without are kept
    # apart because the latter are memoized by dominance (see below).
    done_known = 0
    done_unknown = 0
    unknown = [op.ret is None for op in ops]
    all_known = sum(1 << i for i in range(n) if not unknown[i])
    if all_known == 0:
        return None  # only unknown outcomes: "none took effect" is a valid explanation
    # Unknown-outcome ops with the same effect are interchangeable, and the earlier-called one is
    # available whenever the later one is, so they are used in call order: `previous_twin[i]` is
    # the previous op with the same effect, which must be used before ops[i] is tried.
    previous_twin = [-1] * n
    last_of_effect: dict[tuple[int, str | None, str | None], int] = {}
    for i in sorted((i for i in range(n) if unknown[i]), key=lambda i: (ops[i].call, i)):
        effect = (codes[i], values[i], expecteds[i])
        previous_twin[i] = last_of_effect.get(effect, -1)
        last_of_effect[effect] = i
    # (call entry linearized, register value before it, walk phase it was found in)
    stack: list[tuple[int, str | None, bool]] = []
    # Memo of configurations known to fail: (done_known, state) -> done_unknown sets that failed
    # with it.  A configuration is recorded when the search backtracks out of it.  An op with
    # unknown outcome is accepted in any state and no op has to follow it, so leaving it
    # unlinearized never hurts (it can always go last): a configuration whose done_unknown is a
    # superset of a failed one with the same done_known and state fails too, and is pruned.
    failed: dict[tuple[int, str | None], list[int]] = {}
    explored = 0

    # Deepest point reached, for the failure message.
    # Depth counts only known-outcome ops: unknown-outcome ones could pad any dead end.
    known_depth = 0
    best_depth = -1
    best_prefix: list[int] = []
    best_blocker = -1
    best_state: str | None = None
    best_pending: list[int] = []

    # From each configuration the candidates are the call entries before the first return entry
    # in the list.  They are tried in two passes: ops with a known outcome first, then (when
    # `lazy` is set) the unknown-outcome ones, so the latter are only used when needed and the
    # configurations without them, explored first, prune those with them by dominance.
    entry = nxt[0]
    lazy = False
    while entry != tail:
        i = entry_op[entry]
        if is_call[entry]:
            if unknown[i] is not lazy:
                entry = nxt[entry]
                continue
            # Try to linearize ops[i] right now.
            code = codes[i]
            new_state = state
            if code == _PUT:
                accepted = True
                new_state = values[i]
            elif code == _GET:
                accepted = outputs[i] == state
            else:
                succeeded = state == expecteds[i]
                accepted = code == _CAS_UNKNOWN or outputs[i] == succeeded
                if succeeded:
                    new_state = values[i]
            if lazy and (
                new_state == state  # no effect now: it is as good to place it later, or never
                or (previous_twin[i] >= 0 and not (done_unknown >> previous_twin[i]) & 1)
            ):
                accepted = False
            if accepted:
                if unknown[i]:
                    memo_key = (done_known, new_state)
                    new_unknown = done_unknown | (1 << i)
                else:
                    memo_key = (done_known | (1 << i), new_state)
                    new_unknown = done_unknown
                dominated = memo_key in failed and any(
                    not (subset & ~new_unknown) for subset in failed[memo_key]
                )
                if not dominated:
                    if explored >= max_states:
                        raise _StateLimitExceeded
                    explored += 1
                    stack.append((entry, state, lazy))
                    known_depth += not unknown[i]
                    done_known, state = memo_key
                    done_unknown = new_unknown
                    if done_known == all_known:
                        return None  # the remaining unknown-outcome ops can all go last
                    # Unlink the call entry and its return entry.
                    r = return_entry[i]
                    nxt[prv[entry]] = nxt[entry]
                    prv[nxt[entry]] = prv[entry]
                    nxt[prv[r]] = nxt[r]
                    prv[nxt[r]] = prv[r]
                    entry = nxt[0]
                    lazy = False
                    continue
            entry = nxt[entry]
            continue

        if not lazy:
            # End of the first pass: now try the unknown-outcome candidates.
            lazy = True
            entry = nxt[0]
            continue
        # A return entry: ops[i] completed but cannot be placed in the current prefix.
        if known_depth > best_depth:
            best_depth = known_depth
            best_prefix = [entry_op[e] for e, _, _ in stack]
            best_blocker = i
            best_state = state
            best_pending = []
            e = nxt[0]
            while e != entry:
                if is_call[e]:
                    best_pending.append(entry_op[e])
                e = nxt[e]
        if not stack:
            return _failure_message(
                key,
                ops,
                best_prefix,
                best_blocker,
                "a value no op reads" if best_state == unobserved else repr(best_state),
                best_pending,
                explored,
            )
        _record_failure(failed, (done_known, state), done_unknown)
        call_entry, state, lazy = stack.pop()
        j = entry_op[call_entry]
        if unknown[j]:
            done_unknown &= ~(1 << j)
        else:
            done_known &= ~(1 << j)
            known_depth -= 1
        # Relink in reverse order of unlinking.
        r = return_entry[j]
        nxt[prv[r]] = r
        prv[nxt[r]] = r
        nxt[prv[call_entry]] = call_entry
        prv[nxt[call_entry]] = call_entry
        entry = nxt[call_entry]
    return None


def _record_failure(
    failed: dict[tuple[int, str | None], list[int]], memo_key: tuple[int, str | None], used: int
) -> None:
    """Record that `memo_key` fails with the unknown-outcome ops `used`; keep minimal sets only."""
    earlier = failed.setdefault(memo_key, [])
    if any(not (other & ~used) for other in earlier):
        return  # a subset of `used` already failed, which implies this
    earlier[:] = [other for other in earlier if used & ~other]  # drop the supersets of `used`
    earlier.append(used)


def _failure_message(
    key: str,
    ops: list[Op],
    prefix: list[int],
    blocker: int,
    state: str,
    pending: list[int],
    explored: int,
) -> str:
    shown = 10
    lines = [
        f"key {key!r} is not linearizable ({len(ops)} ops, {explored} states explored).",
        f"Longest linearizable prefix: {len(prefix)} of {len(ops)} ops"
        + (f" (last {shown} shown):" if len(prefix) > shown else ":"),
    ]
    lines += [f"  {_describe(ops[i])}" for i in prefix[-shown:]]
    if not prefix:
        lines.append("  (empty)")
    lines.append(f"Register value after the prefix: {state}.")
    lines.append(
        f"Could not linearize {_describe(ops[blocker])} before its response: no order of the "
        "pending ops after this prefix is valid."
    )
    if pending:
        # Ops with an observed outcome are the informative ones: list them first.
        pending = sorted(pending, key=lambda i: ops[i].ret is None)
        lines.append("Pending ops at that point (candidates to linearize next):")
        lines += [f"  {_describe(ops[i])}" for i in pending[:shown]]
        if len(pending) > shown:
            lines.append(f"  ... and {len(pending) - shown} more")
    return "\n".join(lines)
