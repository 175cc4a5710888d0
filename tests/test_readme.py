"""The README's grpcurl commands, replayed through Python (grpcurl is not packaged here).

Each documented call is parsed from the README: its method must exist in the
served schema (found by server reflection, as grpcurl does) and its JSON body
must parse into that method's request and succeed against a real node.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.descriptor_pb2 import FileDescriptorProto
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from harness import Cluster

README = Path(__file__).parent.parent / "README.md"


def grpcurl_calls() -> list[tuple[str, str]]:
    """(method, json body) for every `grpcurl ... Service/Method` line in the README."""
    calls = []
    for line in README.read_text().splitlines():
        if not line.startswith("grpcurl ") or " list" in line:
            continue
        words = shlex.split(line)
        body = words[words.index("-d") + 1] if "-d" in words else "{}"
        calls.append((words[-1], body))
    return calls


def reflect(channel: grpc.Channel, symbol: str) -> descriptor_pool.DescriptorPool:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
    pool = descriptor_pool.DescriptorPool()
    for response in stub.ServerReflectionInfo(iter([request]), timeout=5):
        protos = response.file_descriptor_response.file_descriptor_proto
        for raw in protos:
            pool.Add(FileDescriptorProto.FromString(raw))
    return pool


def test_readme_grpcurl_calls_work_against_a_node(three_nodes: Cluster) -> None:
    calls = grpcurl_calls()
    assert len(calls) >= 4, "the README documents grpcurl calls"
    channel = grpc.insecure_channel(three_nodes.addresses[0])
    for method, body in calls:
        service, name = method.rsplit("/", 1)
        pool = reflect(channel, service)
        descriptor = pool.FindServiceByName(service).FindMethodByName(name)
        request_class = message_factory.GetMessageClass(descriptor.input_type)
        response_class = message_factory.GetMessageClass(descriptor.output_type)
        request = json_format.Parse(body, request_class())
        call: grpc.UnaryUnaryMultiCallable[Any, Any] = channel.unary_unary(
            f"/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_class.FromString,
        )
        response = call(request, timeout=5)
        shown = json.loads(json_format.MessageToJson(response))
        if name == "Get":
            assert shown.get("found") is True, shown
            assert shown.get("value") == "d29ybGQ=", shown
    assert re.search(r"grpc_health_probe -addr=\S+", README.read_text())
