"""``kv get`` starts without the benchmark; ``kv bench`` without its extra says what to install."""

from __future__ import annotations

import subprocess
import sys

BENCH_MODULES = ("kv_tools.bench", "matplotlib", "redis")


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_the_command_line_does_not_import_the_benchmark() -> None:
    result = _python(
        "import sys, kv_tools.cli\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {BENCH_MODULES!r}"
        " or m.startswith('kv_tools.bench')))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_kv_bench_without_its_extra_names_the_extra() -> None:
    # A None entry in sys.modules makes an import fail as if the package were not installed.
    result = _python(
        "import sys\n"
        "sys.modules['redis'] = None\n"
        "from kv_tools.cli import main\n"
        "sys.exit(main(['bench', '--duration', '1']))"
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "kv bench: needs the benchmark's extra libraries" in lines[0]
    assert "pip install 'kv-tools[bench]'" in lines[0]
