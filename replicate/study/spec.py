"""Study specs: one YAML file per study under ``tables/``, validated before anything runs.

A spec names its paper reference, its metric, a reference row, a base Setting (paper units) and rows as small
overrides of the base, each with the paper's number (null where no source states it; rendered as n/a).
Any unknown key, duplicate key, wrong type, value out of range or missing field is a ``SpecError`` whose message is
one line naming file and key; ``check_profile`` adds what only a profile can tell (a batch that scales below two
images, a patch size it has no size for), before anything runs or is written.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from replicate.core.config import Setting
from replicate.study.profiles import ResolveError, scaled

TABLES_DIR = Path(__file__).resolve().parents[2] / "tables"
# a number as YAML writes one: never a string ("74.9"), a boolean, NaN or infinity
PaperNumber = Annotated[float, Field(strict=True, allow_inf_nan=False)]
PaperValue = Union[PaperNumber, None, dict[str, Optional[PaperNumber]]]
# names that become folder names in the results store: short, no path separators, no leading dot
NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
FILE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
RESERVED_KEYS = {"ckpt", "evaluations"}  # folders of the store beside the studies' (ResultStore)


class SpecError(ValueError):
    """A malformed spec; ``str(e)`` is the one-line message shown to the user."""


class Row(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN,
                      description="the row's identifier, unique in the spec: names its results folder; what "
                                  "`reference` and `vs` refer to")
    label: str = Field(description="the row's text in the rendered table")
    set: dict = Field(default_factory=dict, description="Setting keys this row changes on top of the spec's `base`")
    paper: PaperValue = Field(
        None, description="the paper's number for this row, in `paper_metric`; null where no source states it "
                          "(rendered n/a); a transfer study: a mapping of each of `paper_targets` to a number or null")
    vs: Optional[str] = Field(None, description="row this one is compared with (default: the spec's reference)")
    note: str = Field("", description="a remark on this row (e.g. where its paper number comes from); not rendered")


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: int = Field(ge=1, le=99, description="the study's number: `tableN` on the command line; unique among the "
                                             "specs in tables/")
    title: str = Field(description="the study's name: `replicate list` and the rendered table's heading")
    paper_ref: str = Field(description="where the paper reports it (section, table, figure); shown under the heading")
    kind: Literal["pretrain", "transfer", "finetune"] = Field(
        "pretrain", description="pretrain: each row is pretrained, then evaluated on frozen features (kNN, linear "
                                "probe); transfer: each row's backbone is fine-tuned on the profile's targets; "
                                "finetune: each row is pretrained (unless `init: random`), then fine-tuned end to end "
                                "on the pretraining data's own labels (metric `finetune`)")
    metric: Literal["linear", "knn", "finetune", "transfer"] = Field(
        "linear", description="the metric the verdict is taken on (the paper's); a pretrain study falls back to the "
                              "first metric its results carry if they lack it; a transfer study uses its targets; a "
                              "finetune study: `finetune`")
    paper_metric: str = Field("ImageNet linear probing top-1 (%)",
                              description="what the paper's numbers measure, in words; shown under the heading")
    reference: str = Field(description="the row every other row is compared with (unless it names its own `vs`)")
    claim: str = Field("", description="the paper's finding this study tests, in one sentence; shown above the table")
    base: dict = Field(default_factory=dict, description="Setting keys shared by every row; keys left out take "
                                                        "the Setting defaults")
    rows: list[Row] = Field(min_length=1, description="the rows, in table order (at least one)")
    paper_targets: list[str] = Field(default_factory=list, description="transfer study: the paper's target "
                                                                      "datasets, one `paper <target>` column each")
    notes: str = Field("", description="free text shown under the rendered table (setup, sources)")
    path: Optional[str] = Field(None, exclude=True, description="set by the loader to the file the spec was read "
                                                                "from; not written in a spec")

    @model_validator(mode="after")
    def _check(self) -> "Spec":
        names = [r.name for r in self.rows]
        for i, n in enumerate(names):
            if n in names[:i]:
                raise ValueError(f"rows[{i}].name: duplicate row name {n!r} (also rows[{names.index(n)}]'s)")
        if self.reference not in names:
            raise ValueError(f"reference {self.reference!r} is not a row name (rows: {', '.join(names)})")
        for r in self.rows:
            if r.vs is not None and r.vs not in names:
                raise ValueError(f"rows[{names.index(r.name)}].vs: {r.vs!r} is not a row name")
        return self

    def baseline_of(self, row: Row) -> Row:
        return self.row(row.vs or self.reference)

    def is_baseline(self, row: Row) -> bool:
        """Whether the row is its own baseline (the reference): it gets no delta and no verdict."""
        return self.baseline_of(row).name == row.name

    @property
    def key(self) -> str:
        """The spec's identity in the results store: its file name (``05_position_embedding``), never its number,
        which another spec may share. A spec built in memory (no file) falls back to ``table<id>``."""
        return Path(self.path).stem if self.path else f"table{self.id}"

    @property
    def name(self) -> str:
        """What users call the study: ``table5`` for the shipped specs, the file name for any other."""
        if self.path and Path(self.path).resolve().parent == TABLES_DIR:
            return f"table{self.id}"
        return self.key

    @property
    def source(self) -> str:
        """The spec file, relative to the repository when inside it (the store records which spec owns a folder)."""
        if not self.path:
            return f"<in-memory spec {self.id}>"
        p = Path(self.path).resolve()
        try:
            return p.relative_to(TABLES_DIR.parent).as_posix()
        except ValueError:
            return str(p)

    def setting(self, row: Row) -> Setting:
        return Setting(**{**self.base, **row.set})

    def row(self, name: str) -> Row:
        """The row called ``name``; a SpecError naming the study's rows where there is none."""
        for r in self.rows:
            if r.name == name:
                return r
        raise SpecError(f"{self.name} has no row {name!r}; its rows: {', '.join(r.name for r in self.rows)}")


# pydantic names the member of a union it tried in the error location ('paper.float', 'paper.dict[str,...]');
# those are its words, not the spec's, so they are dropped from the key path shown to the user.
_UNION_TAGS = {"float", "int", "str", "bool", "none", "dict", "list", "literal"}


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, str) and (part in _UNION_TAGS or "[" in part):
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """The keys allowed at ``loc`` (an error's location minus its last part) inside ``model``: a Spec's own, a
    row's, or None where the location is not a model."""
    for part in loc:
        if isinstance(part, int) or (isinstance(part, str) and (part in _UNION_TAGS or "[" in part)):
            continue
        ann = model.model_fields.get(part).annotation if part in model.model_fields else None
        inner = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            return None
        model = inner[0]
    return list(model.model_fields)


def _unknown_key(key: str, allowed: list[str] | None) -> str:
    """'unknown key', with the closest allowed key when one is close (a typo), else the allowed keys."""
    if not allowed:
        return "unknown key"
    allowed = [k for k in allowed if k != "path"]  # set by the loader, never written
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    return f"unknown key (did you mean {close[0]!r}?)" if close else f"unknown key (allowed: {', '.join(allowed)})"


def _message(err: dict, model: type[BaseModel] | None = None) -> str:
    if err["type"] == "extra_forbidden":
        return _unknown_key(str(err["loc"][-1]), _fields_at(model, err["loc"][:-1]) if model else None)
    if err["type"] == "missing":
        return "required key is missing"
    where = [str(part) for part in err["loc"]]
    if "paper" in where:
        return "must be a number, null (unknown), or a mapping of dataset -> number (not text, not NaN)"
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    if isinstance(value, (int, float, str)) and not isinstance(value, bool) and err["type"] != "value_error":
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "...'"
        msg += f" (got {shown})"
    return msg


def _one_line(e: ValidationError, model: type[BaseModel] | None = None) -> str:
    """The first error, in the spec's words; an unknown key suggests the closest allowed key of ``model`` at its
    level, a missing key names an unknown key beside it (a likely typo)."""
    errors = e.errors()
    err = errors[0]
    # a check across keys (``Spec._check``) names its keys itself
    line = _message(err, model) if not err["loc"] else f"{_where(err['loc'])}: {_message(err, model)}"
    if err["type"] == "missing":
        parent = err["loc"][:-1]
        strays = [x["loc"][-1] for x in errors if x["type"] == "extra_forbidden" and x["loc"][:-1] == parent]
        close = difflib.get_close_matches(str(err["loc"][-1]), [str(k) for k in strays], n=1, cutoff=0.5)
        if close:
            line += f" (is the unknown key {close[0]!r} a typo for it?)"
        elif strays:
            line += f" (unknown key{'s' if len(strays) > 1 else ''} beside it: {', '.join(map(str, strays))})"
    return line


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {key!r} in one mapping (first on line {seen[key]}); YAML "
                                        "would silently keep the last: remove one", key_node.start_mark)
                    seen[key] = key_node.start_mark.line + 1
                except TypeError:  # an unhashable key: the base class says so
                    continue
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: no such spec file") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a text file (a spec is YAML in UTF-8)") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot read the spec file ({e.strerror})") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = str(getattr(e, "problem", e))
        if problem.startswith("duplicate key"):
            raise SpecError(f"{path}:{where}: {problem}") from None
        raise SpecError(f"{path}:{where} not valid YAML ({problem})") from None


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a spec must be a YAML mapping with keys id, title, paper_ref, reference, rows")
    if not re.match(FILE_NAME_PATTERN, path.stem) or path.stem in RESERVED_KEYS:
        raise SpecError(f"{path}: the file name {path.stem!r} names the study's results folder: rename the file to "
                        f"letters, digits, '.', '_' or '-' (at most 64, not {' or '.join(sorted(RESERVED_KEYS))})")
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(f"{path}: {_one_line(e, Spec)}") from None
    except TypeError as e:
        raise SpecError(f"{path}: {e}") from None
    # Every row must resolve to a valid Setting: catches `set: {pos_embd: ...}` before any training.
    for i, row in enumerate(spec.rows):
        for key, where in ((spec.base, "base"), ({**spec.base, **row.set}, f"rows[{i}].set")):
            try:
                Setting.model_validate(key)
            except ValidationError as e:
                line = _one_line(e, Setting)  # an unknown key suggests the closest Setting key
                field = e.errors()[0]["loc"][:1]
                if where != "base" and field and field[0] in spec.base and field[0] not in row.set:
                    raise SpecError(f"{path}: base.{line} (row {row.name})") from None  # a check across keys
                raise SpecError(f"{path}: {where}.{line}") from None
    for i, row in enumerate(spec.rows):
        problem = kind_mismatch(spec, spec.setting(row)) or framework_mismatch(spec.setting(row))
        if problem:
            raise SpecError(f"{path}: rows[{i}] ({row.name}): {problem}")
    return spec.model_copy(update={"path": str(path)})


def check_profile(spec: Spec, profile) -> None:
    """Every row of ``spec`` resolves at ``profile`` (a ``Profile``), or a SpecError names the row and the Setting
    key at fault, in the spec's words: what only a profile can tell, found before anything runs."""

    for i, row in enumerate(spec.rows):
        try:
            cfg = profile.resolve(spec.setting(row))
            if spec.kind == "finetune" and cfg.setting.finetune_epochs is not None:  # as evals.e2e.e2e_recipe does
                scaled(cfg.setting.finetune_epochs, profile.epoch_scale, 1, "finetune_epochs", profile.name, "epochs")
        except ResolveError as e:
            raise SpecError(f"{spec.path}: {key_path(spec, i, e.key)}: {e}") from None


def key_path(spec: Spec, i: int, key: str) -> str:
    """Where a Setting key of row ``i`` is written: its own ``set``, the spec's ``base``, or nowhere (a default)."""
    row = spec.rows[i]
    if key in row.set:
        return f"rows[{i}].set.{key}"
    if key in spec.base:
        return f"base.{key} (row {row.name})"
    return f"rows[{i}] ({row.name}): {key} (its default)"


def check_batch_fits(spec: Spec, profile, batch_of, train_images: int) -> None:
    """No row's batch at ``profile`` (``batch_of(row)``, as the run resolved it) exceeds the ``train_images`` it
    pretrains on (an epoch would have no step)."""
    for i, row in enumerate(spec.rows):
        batch = batch_of(row)
        if batch > train_images:
            raise SpecError(f"{spec.path}: {key_path(spec, i, 'batch_size')}: {spec.setting(row).batch_size} gives "
                            f"{batch} images per step at profile {profile.name}, more than its {train_images} "
                            "training images")


FINETUNE_ONLY = ("finetune_epochs", "finetune_drop_path")


def kind_mismatch(spec: Spec, setting: Setting) -> str | None:
    """A row setting a key its study's kind never reads (it would silently change nothing), or None."""
    if spec.kind != "finetune":
        stray = [k for k in FINETUNE_ONLY if getattr(setting, k) is not None]
        if stray:
            return f"{stray[0]} applies to a `kind: finetune` study only, this one is kind {spec.kind}"
    elif setting.init == "supervised":
        return "init supervised is a transfer row; a fine-tuning row starts from `pretrained` or `random` (scratch)"
    return None


SWAV_ONLY = ("swav_prototypes", "swav_temperature", "swav_epsilon", "sinkhorn_iterations",
             "swav_freeze_prototypes_epochs")


def framework_mismatch(setting: Setting) -> str | None:
    """A row changing a SwAV key without being a SwAV row (the key would silently change nothing), or None."""
    if setting.framework != "swav":
        stray = [k for k in SWAV_ONLY if getattr(setting, k) != Setting.model_fields[k].default]
        if stray:
            return f"{stray[0]} applies to framework swav only, this row is {setting.framework}"
    return None


def find_spec(name: str) -> Path:
    """'table5', '5', 'tables/05_x.yaml' or any path -> the spec file."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        return p
    key = name.lower().removeprefix("table")
    if key.isdigit():
        hits = sorted(TABLES_DIR.glob(f"{int(key):02d}_*.yaml"))
        if len(hits) > 1:
            raise SpecError(f"study {name!r} is ambiguous: {', '.join(h.name for h in hits)} share the number; "
                            "rename one of them")
        if hits:
            return hits[0]
    known = ", ".join(f"table{int(h.name[:2])}" for h in sorted(TABLES_DIR.glob("[0-9][0-9]_*.yaml")))
    raise SpecError(f"no study {name!r}: use one of {known}, or a path to a spec .yaml")


def all_specs() -> list[Spec]:
    specs = [load_spec(p) for p in sorted(TABLES_DIR.glob("[0-9][0-9]_*.yaml"))]
    seen: dict[int, Spec] = {}
    for s in specs:
        if s.id in seen:
            raise SpecError(f"{s.path}: id {s.id} is already used by {seen[s.id].path}; give it a free number")
        seen[s.id] = s
    return specs
