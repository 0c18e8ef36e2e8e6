"""Generated documentation: ``python -m replicate.docs [--check]``.

Writes two things that must never drift from the code and the committed results:

- ``docs/spec-format.md``: every key a study spec may hold (``Spec``, ``Row``) and every key of a row's setting
  (``Setting``), with its type, default and meaning, taken from the pydantic models' fields and descriptions;
- the results block of ``README.md`` (between ``<!-- results:start -->`` and ``<!-- results:end -->``): one line
  per study with the verdicts of its rendered table (``replicate.report.render.verdict_summary``) at the reduced profile;
- the blocks of ``docs/reduced-scale.md`` measured from committed runs: every calibration run
  (``calibration``, ``replicate.report.calibration.report``), the studies re-run with the current profile, row by row
  (``studies``, ``replicate.report.render.rerun_report``), and the instability target on the reduced results
  (``instability``, ``replicate.report.calibration.instability_report``).

``--check`` writes nothing and exits 1 if either is out of date (the tests run it).
"""
from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path
from typing import Annotated, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from replicate.core.config import Setting
from replicate.report.calibration import instability_report, report
from replicate.report.render import read_studies, rerun_report, verdict_summary, verdict_totals
from replicate.report.targets import signal_sentence, targets_report
from replicate.study.profiles import REDUCED, REDUCED_ALIGNED
from replicate.study.results import StudyRecords
from replicate.study.spec import TABLES_DIR, Row, Spec

REPO = Path(__file__).resolve().parents[2]
SPEC_DOC = REPO / "docs" / "spec-format.md"
README = REPO / "README.md"
REDUCED_DOC = REPO / "docs" / "reduced-scale.md"
RESULTS_START, RESULTS_END = "<!-- results:start -->", "<!-- results:end -->"
README_PROFILE = REDUCED
ALIGNED_PROFILE = REDUCED_ALIGNED  # the negative result: the README's second block, reduced-scale.md's
EXAMPLE_SPEC = "05_position_embedding.yaml"

_SCALARS = {int: "integer", float: "number", str: "text", bool: "boolean", dict: "mapping", list: "list",
            type(None): "null"}


def type_name(annotation) -> str:
    """A field's type in words: Literals list their values, unions their members, containers their items."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:  # a constrained type (the spec's paper numbers): its base type
        return type_name(args[0])
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin in (Union, types.UnionType):
        words = [type_name(a) for a in args]  # in the annotation's order; NoneType reads "null"
        return ", ".join(words[:-1]) + ", or " + words[-1] if len(words) > 2 else " or ".join(words)
    if origin is dict:
        inner = type_name(args[1])
        return f"mapping of {type_name(args[0])} to " + (f"({inner})" if " or " in inner else inner)
    if origin is list:
        item = args[0]
        return f"list of {item.__name__} (below)" if isinstance(item, type) and issubclass(item, BaseModel) \
            else f"list of {type_name(item)}"
    return _SCALARS.get(annotation, getattr(annotation, "__name__", str(annotation)))


def constraints(field: FieldInfo) -> list[str]:
    out = []
    for m in field.metadata:
        for attr, word in (("ge", ">="), ("le", "<="), ("gt", ">"), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                out.append(f"{word} {getattr(m, attr)}")
        if getattr(m, "allow_inf_nan", None) is False:
            out.append("finite")
        if getattr(m, "min_length", None) is not None:
            out.append(f"at least {m.min_length} item{'s' * (m.min_length != 1)}")
        if getattr(m, "pattern", None) is not None:
            out.append(f"matches `{m.pattern}`")
    return out


def default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "**required**"
    else:
        value = field.default
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value == "":
        return '`""`'
    if isinstance(value, (dict, list)) and not value:
        return f"`{'{}' if isinstance(value, dict) else '[]'}`"
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def fields_table(model: type[BaseModel]) -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, f in model.model_fields.items():
        kind = ", ".join([type_name(f.annotation), *constraints(f)])
        lines.append(f"| `{name}` | {_cell(kind)} | {default_text(f)} | {_cell(f.description or '')} |")
    return "\n".join(lines)


def _example_spec() -> tuple[str, str]:
    path = TABLES_DIR / EXAMPLE_SPEC
    if not path.exists():
        path = sorted(TABLES_DIR.glob("[0-9][0-9]_*.yaml"))[0]
    return path.name, path.read_text().rstrip("\n")


def spec_format() -> str:
    """The text of docs/spec-format.md."""
    name, example = _example_spec()
    return f"""<!-- Generated by `python -m replicate.docs` from replicate/study/spec.py and
replicate/core/config.py. Do not edit: change the models' field descriptions and regenerate. -->
# Spec format

A study is one YAML file. The shipped studies live in [`tables/`](../tables/) as `NN_name.yaml` and are run as
`replicate run tableN`; any other file runs by its path (`replicate run path/to/my_study.yaml`). Results are
stored under `results/<profile>/<spec file name>/<row>/seed<K>.json`, so a spec is identified by its file name
(`{name.removesuffix('.yaml')}`), not by its number.

A spec has a few top-level keys (**Spec**), a `base` setting shared by every row, and a list of `rows`
(**Row**), each a small change (`set`) on top of `base` plus the paper's number for it. A row's setting is
`base` updated with the row's `set`; both hold the keys of **Setting**, in the paper's units (batch 4096, base lr
1.5e-4, 300 epochs). A profile (`paper`, `reduced`, `smoke`) translates that setting into concrete sizes for
one scale ([scales](scales.md)); `replicate show tableN --profile P` prints the result for every row without
running anything.

Validation is strict and happens before anything runs: an unknown key, a missing required key or a wrong type is
a one-line error naming the file and the key, and exit code 2. Types are not coerced: write `true`/`false` for
booleans, integers without a decimal point (`batch_size: 4096`), and numbers with a dot before an exponent
(`1.5e-4`, `1.0e-4`): YAML reads `1e-4` as text, which is rejected.

## Example

`tables/{name}`:

```yaml
{example}
```

A transfer study (`kind: transfer`) lists the paper's datasets in `paper_targets`, and each row's `paper` is a
mapping of those datasets to numbers (null where the paper gives none), e.g.
`paper: {{cifar10: 98.9, cifar100: 90.5, flowers102: 97.7, pets: 93.2}}`. A fine-tuning study (`kind: finetune`,
`metric: finetune`) fine-tunes each row end to end on the pretraining data's labels: `init: pretrained` rows are
pretrained first, `init: random` rows train from scratch, and `finetune_epochs` / `finetune_drop_path` set the
DeiT recipe's length and drop path (`tables/15_finetune.yaml`).

## Spec: the top-level keys

{fields_table(Spec)}

## Row: each entry of `rows`

{fields_table(Row)}

## Setting: the keys of `base` and of a row's `set`

Defaults are the paper's final ViT recipe (Sec. 5, App. A). A key a study does not vary keeps its default.

{fields_table(Setting)}

## After editing a spec

A finished row is reused only while its stored resolved configuration equals the one its spec resolves to now.
Change a row (or `base`) and the next `replicate run` says which field changed and runs that row again;
`--keep-stale` keeps the old results instead and marks them stale in the rendered table. Changing `label`,
`paper`, `note`, `notes` or `claim` changes only the rendered text.
"""


def with_block(text: str, name: str, body: str, where: str = "README.md") -> str:
    """``text`` with the lines between ``<!-- name:start -->`` and ``<!-- name:end -->`` replaced by ``body``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    head, sep, rest = text.partition(start)
    _, sep2, tail = rest.partition(end)
    if not sep or not sep2:
        raise ValueError(f"{where} has no {start} ... {end} block")
    return f"{head}{start}\n{body.rstrip()}\n{end}{tail}"


def readme_with_results(readme: str, studies: dict[str, StudyRecords] | None = None,
                        aligned: dict[str, StudyRecords] | None = None) -> str:
    """The README with its results blocks regenerated from the committed results: the reduced profile's, and the
    aligned profile's it replaced (``studies``, ``aligned``: read once)."""
    studies = studies or read_studies(README_PROFILE)
    aligned = aligned or read_studies(ALIGNED_PROFILE)
    readme = with_block(readme, "results", verdict_summary(README_PROFILE, studies=studies) + "\n"
                        + signal_sentence(README_PROFILE, studies))
    return with_block(readme, "results-aligned", verdict_totals(ALIGNED_PROFILE, aligned).rstrip() + " "
                      + signal_sentence(ALIGNED_PROFILE, aligned))


def reduced_doc(text: str, studies: dict[str, StudyRecords] | None = None,
                v3: dict[str, StudyRecords] | None = None) -> str:
    """docs/reduced-scale.md with its measured blocks regenerated from the committed runs, each study's runs read
    once: ``studies``, the aligned profile's (the blocks of the sections that chose it, then replaced it), and
    ``v3``, the reduced profile's (stage v3-3)."""
    studies = studies or read_studies(ALIGNED_PROFILE)
    v3 = v3 or read_studies(README_PROFILE)
    text = with_block(text, "calibration", report(), REDUCED_DOC.name)
    text = with_block(text, "studies", rerun_report(ALIGNED_PROFILE, studies=studies), REDUCED_DOC.name)
    text = with_block(text, "instability", instability_report(studies), REDUCED_DOC.name)
    text = with_block(text, "studies-v3", rerun_report(README_PROFILE, studies=v3), REDUCED_DOC.name)
    text = with_block(text, "instability-v3", instability_report(v3), REDUCED_DOC.name)
    text = with_block(text, "targets-v3", targets_report(README_PROFILE, v3), REDUCED_DOC.name)
    return with_block(text, "targets-aligned", targets_report(ALIGNED_PROFILE, studies), REDUCED_DOC.name)


def wanted() -> dict[Path, str]:
    """Every generated file and the text it should have; the committed results are read once for all of them."""
    studies, aligned = read_studies(README_PROFILE), read_studies(ALIGNED_PROFILE)
    return {SPEC_DOC: spec_format(), README: readme_with_results(README.read_text(), studies, aligned),
            REDUCED_DOC: reduced_doc(REDUCED_DOC.read_text(), aligned, studies)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m replicate.docs",
                                description="Regenerate docs/spec-format.md, the README's results block and the "
                                            "measured blocks of docs/reduced-scale.md.")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a generated file is out of date")
    args = p.parse_args(argv)
    stale = []
    for path, text in wanted().items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(path.relative_to(REPO))
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if args.check:
        for path in stale:
            print(f"{path} is out of date: run `python -m replicate.docs`", file=sys.stderr)
        return 1 if stale else 0
    print("\n".join(f"wrote {p}" for p in stale) or "up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
