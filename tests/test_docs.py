"""The documentation cannot drift: generated parts are up to date, every spec key is documented, links resolve."""
import re

import pytest

from replicate.core.config import Setting
from replicate.report.docs import README, REPO, RESULTS_END, RESULTS_START, SPEC_DOC, main, type_name, wanted
from replicate.report.render import verdict_summary
from replicate.study.profiles import SMOKE
from replicate.study.results import ResultStore
from replicate.study.spec import Row, Spec, find_spec, load_spec

DOCS = sorted((REPO / "docs").glob("*.md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_check_mode_passes_on_the_committed_docs():
    assert {SPEC_DOC, README} <= set(wanted())  # the two generated files are among those --check compares
    assert main(["--check"]) == 0, "a generated doc is out of date: run `python -m replicate.docs`"


def test_check_mode_fails_on_a_stale_file_and_writes_nothing(tmp_path, monkeypatch, capsys):
    import replicate.report.docs as docs

    stale, fresh = tmp_path / "stale.md", tmp_path / "fresh.md"
    stale.write_text("old\n")
    fresh.write_text("same\n")
    monkeypatch.setattr(docs, "REPO", tmp_path)
    monkeypatch.setattr(docs, "wanted", lambda: {stale: "new\n", fresh: "same\n"})
    assert main(["--check"]) == 1 and stale.read_text() == "old\n"
    err = capsys.readouterr().err
    assert "stale.md is out of date" in err and "fresh.md" not in err
    assert main([]) == 0 and stale.read_text() == "new\n"  # without --check it writes the stale file
    assert main(["--check"]) == 0


@pytest.mark.parametrize("model", [Spec, Row, Setting], ids=lambda m: m.__name__)
def test_every_field_is_described_and_documented(model):
    text = SPEC_DOC.read_text()
    for name, field in model.model_fields.items():
        assert field.description, f"{model.__name__}.{name} has no description= (it is the documentation)"
        assert f"| `{name}` |" in text, f"{model.__name__}.{name} missing from docs/spec-format.md"


def test_literal_types_list_their_values():
    assert type_name(Setting.model_fields["pos_embed"].annotation) == "one of `sincos`, `learned`, `none`"
    assert "null" in type_name(Row.model_fields["paper"].annotation)


def test_readme_is_short_and_has_its_results_block():
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    block = text.split(RESULTS_START, 1)[1].split(RESULTS_END, 1)[0]
    assert block.count("\n| ") >= 11  # header separator + one line per shipped study


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (doc.parent / target.split("#", 1)[0]).resolve()
        assert path.exists(), f"{doc.name}: link to {target} does not resolve"


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: p.name)
def test_no_internal_wording(doc):
    text = doc.read_text().lower()
    for phrase in ("project guide", "performance issue", "this session", "project's sessions", "torch 2.11 where"):
        assert phrase not in text, f"{doc.name}: {phrase!r}"


def test_verdict_summary_counts_the_rendered_verdicts(tmp_path):
    spec = load_spec(find_spec("table8"))
    store = ResultStore(tmp_path, "smoke")
    for seed, (a, b) in enumerate([(80.0, 78.0), (81.0, 78.5), (80.5, 77.5)]):
        store.save(spec.key, "with_pred", seed, {"status": "ok", "metrics": {"linear": a}})
        store.save(spec.key, "no_pred", seed, {"status": "ok", "metrics": {"linear": b}})
    lines = verdict_summary(SMOKE, tmp_path).splitlines()
    assert lines[0].startswith("| study | title | compared rows | reproduces | within noise | opposite |")
    row8 = next(ln for ln in lines if ln.startswith("| table8 |"))
    assert row8 == "| table8 | Prediction head | 1 | 1 | 0 | 0 | 0 | 3 | 0 |"  # w/o pred: -2.5 vs paper -1.0
    row5 = next(ln for ln in lines if ln.startswith("| table5 |"))
    assert row5.endswith("| 2 | 0 | 0 | 0 | 2 | — | 0 |")  # not run: no verdict, no seeds
