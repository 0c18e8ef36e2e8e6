"""Study specs: one YAML file per study under ``tables/``, validated before anything runs.

A spec names its paper reference, its metric, a reference row, a base Setting (paper units) and rows as small
overrides of the base, each with the paper's number (null where no source states it; rendered as n/a).
Any unknown key, wrong type or missing field is a ``SpecError`` whose message is one line naming file and key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .config import Setting

TABLES_DIR = Path(__file__).resolve().parent.parent / "tables"
PaperValue = Union[float, None, dict[str, Optional[float]]]


class SpecError(ValueError):
    """A malformed spec; ``str(e)`` is the one-line message shown to the user."""


class Row(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    label: str
    set: dict = Field(default_factory=dict, description="Setting overrides on top of the spec's base")
    paper: PaperValue = None
    vs: Optional[str] = Field(None, description="row this one is compared with (default: the spec's reference)")
    note: str = ""


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: int = Field(ge=1, le=99)
    title: str
    paper_ref: str
    kind: Literal["pretrain", "transfer"] = "pretrain"
    metric: Literal["linear", "knn", "finetune", "transfer"] = "linear"
    paper_metric: str = "ImageNet linear probing top-1 (%)"
    reference: str
    claim: str = Field("", description="the paper's finding this study tests, in one sentence")
    base: dict = Field(default_factory=dict)
    rows: list[Row] = Field(min_length=1)
    paper_targets: list[str] = Field(default_factory=list, description="transfer: the paper's datasets")
    notes: str = ""
    path: Optional[str] = Field(None, exclude=True)

    @model_validator(mode="after")
    def _check(self) -> "Spec":
        names = [r.name for r in self.rows]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate row name {sorted(dup)[0]!r}")
        if self.reference not in names:
            raise ValueError(f"reference {self.reference!r} is not a row name (rows: {', '.join(names)})")
        for r in self.rows:
            if r.vs is not None and r.vs not in names:
                raise ValueError(f"row {r.name!r}: vs {r.vs!r} is not a row name")
        return self

    def baseline_of(self, row: Row) -> Row:
        return self.row(row.vs or self.reference)

    @property
    def key(self) -> str:
        return f"table{self.id}"

    def setting(self, row: Row) -> Setting:
        return Setting(**{**self.base, **row.set})

    def row(self, name: str) -> Row:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _one_line(e: ValidationError) -> str:
    err = e.errors()[0]
    msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
    if err["type"] == "missing":
        msg = "required key is missing"
    return f"{_where(err['loc'])}: {msg}"


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such spec file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SpecError(f"{path}:{where} not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a spec must be a YAML mapping with keys id, title, paper_ref, reference, rows")
    try:
        spec = Spec(**raw)
    except ValidationError as e:
        raise SpecError(f"{path}: {_one_line(e)}") from None
    except TypeError as e:
        raise SpecError(f"{path}: {e}") from None
    # Every row must resolve to a valid Setting: catches `set: {pos_embd: ...}` before any training.
    for i, row in enumerate(spec.rows):
        for key, where in ((spec.base, "base"), ({**spec.base, **row.set}, f"rows[{i}].set")):
            try:
                Setting(**key)
            except ValidationError as e:
                allowed = ", ".join(Setting.model_fields)
                line = _one_line(e)
                hint = f" (allowed: {allowed})" if "unknown key" in line else ""
                raise SpecError(f"{path}: {where}.{line}{hint}") from None
    return spec.model_copy(update={"path": str(path)})


def find_spec(name: str) -> Path:
    """'table5', '5', 'tables/05_x.yaml' or any path -> the spec file."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        return p
    key = name.lower().removeprefix("table")
    if key.isdigit():
        hits = sorted(TABLES_DIR.glob(f"{int(key):02d}_*.yaml"))
        if hits:
            return hits[0]
    known = ", ".join(f"table{int(h.name[:2])}" for h in sorted(TABLES_DIR.glob("[0-9][0-9]_*.yaml")))
    raise SpecError(f"no study {name!r}: use one of {known}, or a path to a spec .yaml")


def all_specs() -> list[Spec]:
    return [load_spec(p) for p in sorted(TABLES_DIR.glob("[0-9][0-9]_*.yaml"))]
