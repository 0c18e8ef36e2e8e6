"""nox sessions: `nox -s table5` (reduced profile by default; `-- --profile smoke` and other options pass through),
`nox -s smoke` (every table at smoke scale), `nox -s render`, `nox -s tests`, `nox -s lint`, `nox -s bench`.

Every session shares one virtualenv, `.nox/suite` (created with access to system site-packages, so a machine that
already has torch does not install it again); the first session installs the project into it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import nox

nox.options.sessions = ["tests"]

TABLES = range(1, 12)
VENV = dict(venv_backend="none")  # every session uses the one shared venv below (torch is GBs: install it once)
SUITE_VENV = Path(".nox") / "suite"
PY = str(SUITE_VENV / "bin" / "python")


def install(session: nox.Session) -> None:
    """Create the shared venv on first use and install the project (editable) into it; then a no-op."""
    if not (SUITE_VENV / "bin" / "python").exists():
        session.run(sys.executable, "-m", "venv", "--system-site-packages", str(SUITE_VENV))
    stamp = SUITE_VENV / ".installed"
    if not stamp.exists() or stamp.stat().st_mtime < Path("pyproject.toml").stat().st_mtime:
        session.run(PY, "-m", "pip", "install", "-q", "-e", ".[test]")
        stamp.touch()


def run_table(session: nox.Session, n: int) -> None:
    args = list(session.posargs)
    if not any(a == "--profile" or a.startswith("--profile=") for a in args):
        args = ["--profile", "reduced", *args]
    session.run(PY, "-m", "replicate", "run", f"table{n}", *args)


def _table_session(n: int):
    @nox.session(name=f"table{n}", **VENV)
    def table(session: nox.Session) -> None:
        install(session)
        run_table(session, n)

    table.__doc__ = f"Run study {n} (default profile reduced; pass `-- --profile smoke --seeds 3` etc.)."
    return table


for _n in TABLES:
    globals()[f"table{_n}"] = _table_session(_n)


@nox.session(**VENV)
def smoke(session: nox.Session) -> None:
    """Every study at smoke scale (seconds per row)."""
    install(session)
    for n in TABLES:
        session.run(PY, "-m", "replicate", "run", f"table{n}", "--profile", "smoke", "--quiet",
                    "--no-render", *session.posargs)
    session.run(PY, "-m", "replicate.render", "--profile", "smoke")


@nox.session(**VENV)
def render(session: nox.Session) -> None:
    """Write and print the markdown tables (`-- --profile smoke` for another profile)."""
    install(session)
    session.run(PY, "-m", "replicate.render", *session.posargs)


@nox.session(**VENV)
def tests(session: nox.Session) -> None:
    """The test suite, including the end-to-end smoke run of every table (`-- -m "not smoke"` for unit tests only)."""
    install(session)
    session.run(PY, "-m", "pytest", "-q", *session.posargs)


@nox.session(**VENV)
def lint(session: nox.Session) -> None:
    install(session)
    session.run(PY, "-m", "ruff", "check", "replicate", "evals", "tests", "noxfile.py")


@nox.session(**VENV)
def bench(session: nox.Session) -> None:
    """Throughput, FLOP/s vs the measured peak, data pipeline, kNN timing; writes results/bench/README.md."""
    install(session)
    session.run(PY, "-m", "replicate.bench", "--out", "results/bench/README.md", *session.posargs)
