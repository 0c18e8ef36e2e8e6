"""nox sessions: `nox -s table5` (reduced profile by default; `-- --profile smoke --seeds 3` passes through),
`nox -s smoke` (every study at smoke scale), `nox -s render`, `nox -s tests`, `nox -s lint`, `nox -s bench`.

One torch per machine: the sessions' virtualenvs (under `.nox/`, kept between runs) are made by uv, which installs
each package once into its cache and links it into every venv from there, so a second session sets up in seconds
and adds no second copy of torch (docs/development.md has the timings). uv reads its own settings, not pip's: a
package index, find-links or constraints configured for pip on this machine are handed to uv below. Without uv
installed, nox falls back to virtualenv (each session then installs its own torch).

`nox -s tableN` first checks, with the standard library only, that the study's data is there (Fashion-MNIST for
the reduced profile, in the places `replicate.core.data` looks: `replicate/core/datapaths.py`), and only then builds the one
environment every study runs in (the `study` session).
"""
from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).parent
nox.options.sessions = ["tests"]
nox.options.reuse_venv = "yes"
nox.options.default_venv_backend = "uv|virtualenv"

# every study under tables/ (NN_name.yaml), so a new spec file gets its session without an edit here
TABLES = sorted(int(p.name[:2]) for p in (ROOT / "tables").glob("[0-9][0-9]_*.yaml"))
VENV = dict(reuse_venv=True)


def pip_settings_for_uv() -> dict[str, str]:
    """pip's configuration on this machine (its config files and PIP_* variables, as `pip config list` shows them)
    as the UV_* variables that say the same to uv; a UV_* variable already set wins. Empty where pip has none."""
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    pip: dict[str, str] = {}
    for line in out.splitlines():  # e.g. global.extra-index-url='file:///a file:///b', :env:.find-links='/x'
        key, _, value = line.partition("=")
        pip.setdefault(key.rsplit(".", 1)[-1], value.strip().strip("'\""))
    env = {}
    split = {k: " ".join(pip[k].split()) for k in ("index-url", "extra-index-url", "find-links", "constraint")
             if pip.get(k)}
    if "index-url" in split:
        env["UV_INDEX_URL"] = split["index-url"]
    if "extra-index-url" in split:
        env["UV_EXTRA_INDEX_URL"] = split["extra-index-url"]
        env["UV_INDEX_STRATEGY"] = "unsafe-best-match"  # pip's rule: the best version over every index
    if "find-links" in split:
        env["UV_FIND_LINKS"] = split["find-links"].replace(" ", ",")
    if "constraint" in split:
        env["UV_CONSTRAINT"] = split["constraint"]
    if pip.get("cert"):
        env["SSL_CERT_FILE"] = pip["cert"]
    if pip.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        env["UV_NO_INDEX"] = "1"
    return {k: v for k, v in env.items() if k not in os.environ}


os.environ.update(pip_settings_for_uv())


def install(session: nox.Session, extras: str = "") -> None:
    session.install("-e", f".{extras}")


def datapaths():
    """replicate/core/datapaths.py loaded on its own (standard library only: no torch, no package install needed)."""
    spec = importlib.util.spec_from_file_location("replicate_datapaths", ROOT / "replicate" / "core" / "datapaths.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def option(args: list[str], name: str) -> str | None:
    """The value of `--name X` or `--name=X` in ``args``, else None."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def data_problem(args: list[str]) -> str | None:
    """One line saying what data is missing and how to get it, or None when the run's data is there."""
    paths = datapaths()
    profile, root = option(args, "--profile") or "reduced", option(args, "--data-root")
    if profile not in paths.FASHION_MNIST_PROFILES:
        return None  # smoke: scikit-learn's bundled digits; paper: `replicate run` checks --data-root itself
    if root and not Path(root).is_dir():
        return f"--data-root {root}: no such folder"
    if not paths.missing_fashion_mnist(root):
        return None
    looked = ", ".join(str(d) for d in paths.fashion_mnist_dirs(root))
    return (f"Fashion-MNIST (profile {profile}) not found in {looked}. Fix: {paths.FIX} (or, online, let torchvision "
            f"download it: `nox -s study -- table5 {shlex.join(args)}`)")


def _table_session(n: int):
    @nox.session(name=f"table{n}", venv_backend="none")
    def table(session: nox.Session) -> None:
        args = list(session.posargs)
        if option(args, "--profile") is None:
            args = ["--profile", "reduced", *args]
        problem = data_problem(args)
        if problem:
            session.error(problem)  # before any environment is built
        session.notify("study", [f"table{n}", *args])

    table.__doc__ = f"Run study {n} (default profile reduced; pass `-- --profile smoke --seeds 3` etc.)."
    return table


for _n in TABLES:
    globals()[f"table{_n}"] = _table_session(_n)


@nox.session(default=False, **VENV)
def study(session: nox.Session) -> None:
    """`replicate run` in the one environment every study shares (`nox -s tableN` checks the data, then runs this)."""
    if not session.posargs:
        session.error("usage: nox -s table5 [-- OPTIONS], or nox -s study -- table5 OPTIONS")
    install(session)
    session.run("replicate", "run", *session.posargs)


@nox.session(**VENV)
def smoke(session: nox.Session) -> None:
    """Every study at smoke scale (seconds per row)."""
    install(session)
    for n in TABLES:
        session.run("replicate", "run", f"table{n}", "--profile", "smoke", "--quiet", "--no-render",
                    *session.posargs)
    session.run("python", "-m", "replicate.report.render", "--profile", "smoke")


@nox.session(**VENV)
def render(session: nox.Session) -> None:
    """Write and print the tables that have results (`-- --profile smoke`, `-- --results DIR` to choose)."""
    install(session)
    session.run("python", "-m", "replicate.report.render", *session.posargs)


@nox.session(**VENV)
def tests(session: nox.Session) -> None:
    """The test suite, including the end-to-end smoke run of every table (`-- -m "not smoke"` for unit tests only)."""
    install(session, "[test]")
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session(**VENV)
def lint(session: nox.Session) -> None:
    """ruff over the code and the tests; import-linter's layer contracts (pyproject.toml, also a test)."""
    session.install("ruff", "import-linter>=2.17")
    session.run("ruff", "check", "replicate", "evals", "tests", "tools", "noxfile.py")
    session.run("lint-imports", env={"PYTHONPATH": str(ROOT)})


@nox.session(**VENV)
def bench(session: nox.Session) -> None:
    """Throughput, FLOP/s vs the measured peak, data pipeline, kNN timing; writes results/bench/README.md."""
    install(session)
    session.run("python", "-m", "tools.bench", "--out", "results/bench/README.md", *session.posargs)
