"""nox sessions: `nox -s table5` (reduced profile by default; `-- --profile smoke --seeds 3` passes through),
`nox -s smoke` (every study at smoke scale), `nox -s render`, `nox -s tests`, `nox -s lint`, `nox -s bench`.

Each session has its own virtualenv under `.nox/`, kept between runs (`reuse_venv`). The venvs see the base
Python's site-packages, so a torch already installed there (it is gigabytes) is used, not installed again; on a
bare machine the first session installs it from `pyproject.toml`'s pins.
"""
from __future__ import annotations

from pathlib import Path

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_venv = "yes"

# every study under tables/ (NN_name.yaml), so a new spec file gets its session without an edit here
TABLES = sorted(int(p.name[:2]) for p in (Path(__file__).parent / "tables").glob("[0-9][0-9]_*.yaml"))
VENV = dict(reuse_venv=True, venv_params=["--system-site-packages"])


def install(session: nox.Session, extras: str = "") -> None:
    session.install("-q", "-e", f".{extras}")


def _table_session(n: int):
    @nox.session(name=f"table{n}", **VENV)
    def table(session: nox.Session) -> None:
        install(session)
        args = list(session.posargs)
        if not any(a == "--profile" or a.startswith("--profile=") for a in args):
            args = ["--profile", "reduced", *args]
        session.run("replicate", "run", f"table{n}", *args)

    table.__doc__ = f"Run study {n} (default profile reduced; pass `-- --profile smoke --seeds 3` etc.)."
    return table


for _n in TABLES:
    globals()[f"table{_n}"] = _table_session(_n)


@nox.session(**VENV)
def smoke(session: nox.Session) -> None:
    """Every study at smoke scale (seconds per row)."""
    install(session)
    for n in TABLES:
        session.run("replicate", "run", f"table{n}", "--profile", "smoke", "--quiet", "--no-render",
                    *session.posargs)
    session.run("python", "-m", "replicate.render", "--profile", "smoke")


@nox.session(**VENV)
def render(session: nox.Session) -> None:
    """Write and print the markdown tables (`-- --profile smoke` for another profile)."""
    install(session)
    session.run("python", "-m", "replicate.render", *session.posargs)


@nox.session(**VENV)
def tests(session: nox.Session) -> None:
    """The test suite, including the end-to-end smoke run of every table (`-- -m "not smoke"` for unit tests only)."""
    install(session, "[test]")
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session(**VENV)
def lint(session: nox.Session) -> None:
    """ruff over the code and the tests."""
    session.install("-q", "ruff")
    session.run("ruff", "check", "replicate", "evals", "tests", "noxfile.py")


@nox.session(**VENV)
def bench(session: nox.Session) -> None:
    """Throughput, FLOP/s vs the measured peak, data pipeline, kNN timing; writes results/bench/README.md."""
    install(session)
    session.run("python", "-m", "replicate.bench", "--out", "results/bench/README.md", *session.posargs)
