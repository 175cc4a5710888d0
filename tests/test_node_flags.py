"""Nonsense flags, as a careless operator types them: one line, exit code 2, nothing on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import run_node_command
from kv_tools.launcher import free_port


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-value-bytes", "10000000000"], "--max-value-bytes must be between 1 and"),
        (["--lmdb-map-size", "-1"], "--lmdb-map-size must be between"),
        (["--lmdb-map-size", "1"], "--lmdb-map-size must be between"),
        (["--forward-timeout", "nan"], "--forward-timeout must be more than 0"),
        (["--drain-seconds", "-1"], "--drain-seconds must be at least 0"),
        (["--cluster", ""], "the cluster list is empty"),
        (["--vnodes", "many"], "argument --vnodes: invalid int value: 'many'"),
    ],
)
def test_nonsense_flags_are_refused_in_one_line(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    fresh = tmp_path / "fresh"
    listen = f"127.0.0.1:{free_port()}"
    result = run_node_command("--id", "n1", "--listen", listen, "--data-dir", str(fresh), *flags)
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("kv-node: ") and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not fresh.exists(), "a refused start left files behind"
