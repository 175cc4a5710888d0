"""What every call to a node goes through, whatever its service: one server interceptor.

- The request is decoded here, not by gRPC: bytes that do not parse are the caller's
  fault and get INVALID_ARGUMENT (reason INVALID_REQUEST), never UNKNOWN with internals.
- The request is read as a client stream of (at most) one message, though every method is
  unary: grpc.aio's unary path never answers a call whose client ends the stream before the
  message is complete, and keeps its state forever (about 7 KiB a call, so a hostile
  client could fill the node's memory). On the stream path such a call ends with no
  message, and is refused as INVALID_REQUEST. On the wire the two are the same call.
  Server-streaming methods (Health.Watch) have the same flaw and get the same treatment.
- Admission control: at most ``--max-in-flight`` kv.v1 calls are worked on at once;
  beyond it a call is refused at once with RESOURCE_EXHAUSTED, reason OVERLOADED and a
  retry hint, before its message is read or decoded. Health checks and reflection are never refused,
  so an overloaded node still reports itself alive.
- A raised ``Refused`` becomes a status whose details carry a ``google.rpc.Status`` with
  the ErrorInfo; any other exception becomes INTERNAL (reason INTERNAL) and is logged.
- Every kv.v1 call is counted by its real outcome (the status code it ended with).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc
from grpc_status import rpc_status

from kv_common.wire import RETRY_AFTER_MS, ErrorInfo, Reason, encode_status
from kv_node.routing import Refusal, Refused
from kv_node.servicer import Context, Node

KV_SERVICES_PREFIX = "/kv.v1."
"""Calls to these services are admitted, counted and timed; others (health) pass through."""

OVERLOAD_RETRY_AFTER_MS = 50
"""The retry hint of an OVERLOADED refusal: about one group commit, long enough for the
calls in flight to drain, short enough that a client backing off from it loses little."""

log = logging.getLogger(__name__)

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


async def abort(context: Context, refusal: Refusal) -> None:
    """End the call with ``refusal``: status code, message, and the ErrorInfo trailer."""
    status = rpc_status.to_status(
        encode_status(
            refusal.code.value[0], refusal.message, ErrorInfo(refusal.reason, refusal.metadata)
        )
    )
    await context.abort(status.code, status.details, status.trailing_metadata)


async def _first_message(requests: AsyncIterator[bytes]) -> bytes | None:
    """The call's request message; None when the client ended the stream without one."""
    async for message in requests:
        return message
    return None


def _incomplete(name: str) -> Refusal:
    return Refusal(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"the request to {name} ended before its message was complete",
        Reason.INVALID_REQUEST,
    )


def _undecodable(name: str, service: str) -> Refusal:
    return Refusal(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"the request to {name} could not be decoded as its message type (service {service})",
        Reason.INVALID_REQUEST,
    )


def _streaming_behaviour(
    method: str, handler: Handler
) -> Callable[[AsyncIterator[bytes], Context], Awaitable[None]]:
    """A server-streaming method (Health.Watch) read as a bidi stream, for the same reason
    as the unary ones; neither admitted nor counted, like every call outside kv.v1."""
    inner = handler.unary_stream
    decode = handler.request_deserializer
    name = method.rsplit("/", 1)[-1]
    service = method.rsplit("/", 1)[0].lstrip("/")

    async def behaviour(requests: AsyncIterator[bytes], context: Context) -> None:
        raw = await _first_message(requests)
        if raw is None:
            await abort(context, _incomplete(name))
            return
        try:
            request = decode(raw) if decode is not None else raw
        except Exception:
            await abort(context, _undecodable(name, service))
            return
        responses: Any = inner(request, context)  # type: ignore[arg-type, misc]
        if inspect.isasyncgen(responses):
            async for response in responses:
                await context.write(response)
        else:
            await responses

    return behaviour


class CallGuard(grpc.aio.ServerInterceptor):
    def __init__(self, node: Node) -> None:
        self._node = node
        self._wrapped: dict[str, Handler] = {}
        self.in_flight = 0
        self.idle = asyncio.Event()
        """Set while no kv.v1 call is in flight (a stopping node waits for it)."""
        self.idle.set()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        method: str = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_unary is not None:
            wrapped = grpc.stream_unary_rpc_method_handler(
                self._behaviour(method, handler),
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        elif handler.unary_stream is not None:  # Health.Watch
            wrapped = grpc.stream_stream_rpc_method_handler(
                _streaming_behaviour(method, handler),
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        else:
            return handler
        self._wrapped[method] = wrapped
        return wrapped

    def _behaviour(
        self, method: str, handler: Handler
    ) -> Callable[[AsyncIterator[bytes], Context], Awaitable[Any]]:
        node = self._node
        metrics = node.metrics
        inner = handler.unary_unary
        decode = handler.request_deserializer
        counted = method.startswith(KV_SERVICES_PREFIX)
        name = method.rsplit("/", 1)[-1]
        request_type = method.rsplit("/", 1)[0].lstrip("/")
        bound = node.config.max_in_flight

        async def behaviour(requests: AsyncIterator[bytes], context: Context) -> Any:
            start = time.perf_counter()
            admitted = False
            finished = False

            def finish(outcome: str) -> None:
                """Release and count the call, before its status can reach the caller."""
                nonlocal admitted, finished
                if admitted:
                    self.in_flight -= 1
                    admitted = False
                    if not self.in_flight:
                        self.idle.set()
                if counted and not finished:
                    node.requests_served += 1
                    metrics.requests.labels(name, outcome).inc()
                    metrics.latency.labels(name).observe(time.perf_counter() - start)
                finished = True

            try:
                # Checked before the message is read, so that a refused call costs neither
                # its decoding nor (gRPC stops the stream) the rest of its bytes; the slot is
                # taken only once the message is in, so that streams which never finish
                # their message cannot fill the bound.
                self._admissible(counted, bound)
                raw = await _first_message(requests)
                if raw is None:
                    raise Refused(_incomplete(name))
                if counted:
                    self._admissible(counted, bound)
                    self.in_flight += 1
                    admitted = True
                    self.idle.clear()
                try:
                    request = decode(raw) if decode is not None else raw
                except Exception:
                    raise Refused(_undecodable(name, request_type)) from None
                del raw
                response = await inner(request, context)  # type: ignore[arg-type, misc]
                finish("OK")
                return response
            except Refused as refused:
                await self._refuse(context, name, counted, refused.refusal, finish)
            except asyncio.CancelledError:
                finish(grpc.StatusCode.CANCELLED.name)
                raise
            except grpc.aio.AbortError:
                code = context.code()
                finish(code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN")
                raise
            except Exception:
                log.exception("%s failed", method)
                internal = Refusal(
                    grpc.StatusCode.INTERNAL,
                    f"node {node.config.node_id!r} failed to handle {name}; see its log",
                    Reason.INTERNAL,
                )
                await self._refuse(context, name, counted, internal, finish)
            finally:
                finish("UNKNOWN")  # only reached unfinished if the code above is wrong

        return behaviour

    async def _refuse(
        self,
        context: Context,
        name: str,
        counted: bool,
        refusal: Refusal,
        finish: Callable[[str], None],
    ) -> None:
        if counted:
            self._node.metrics.refusals.labels(name, refusal.reason).inc()
        finish(refusal.code.name)
        await abort(context, refusal)

    def _admissible(self, counted: bool, bound: int) -> None:
        """Raise the refusal of a kv.v1 call this node cannot take now."""
        if not counted:
            return
        if self._node.draining:
            raise Refused(
                Refusal(
                    grpc.StatusCode.UNAVAILABLE,
                    f"node {self._node.config.node_id!r} is shutting down",
                    Reason.SHUTTING_DOWN,
                )
            )
        if self.in_flight >= bound:
            raise Refused(self._overloaded(bound))

    def _overloaded(self, bound: int) -> Refusal:
        return Refusal(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"node {self._node.config.node_id!r} is overloaded: {bound} requests in flight "
            f"(--max-in-flight); retry after {OVERLOAD_RETRY_AFTER_MS} ms",
            Reason.OVERLOADED,
            {"limit": str(bound), RETRY_AFTER_MS: str(OVERLOAD_RETRY_AFTER_MS)},
        )
