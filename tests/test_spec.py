"""Specs: every shipped spec validates; malformed ones fail with one line naming file and key, exit 2."""
import subprocess
import sys
from pathlib import Path

import pytest

from replicate.study.spec import SpecError, all_specs, find_spec, load_spec


def test_every_spec_validates_and_carries_paper_numbers():
    specs = all_specs()
    assert [s.id for s in specs] == [int(Path(s.path).name[:2]) for s in specs]  # tableN is the file's number
    assert {1, 5, 11, 15} <= {s.id for s in specs}
    by_id = {s.id: s for s in specs}
    assert by_id[5].row("sincos").paper == 76.5 and by_id[5].row("none").paper == 74.9
    assert by_id[1].row("bs6144").paper == 69.7
    assert by_id[3].row("lr3e-4").paper is None  # unknown in every source: rendered n/a, never invented
    assert by_id[11].row("mocov3").paper["cifar10"] == 98.9
    assert by_id[15].row("mocov3_vit_b").paper == 83.2 and by_id[15].row("scratch_vit_l").paper is None
    for s in specs:
        for row in s.rows:  # a row's setting is the base with the row's overrides on top, every key as written
            setting = s.setting(row).model_dump()
            assert all(setting[k] == v for k, v in {**s.base, **row.set}.items()), (s.key, row.name)
    assert by_id[9].setting(by_id[9].row("m0")).momentum == 0.0
    t4 = by_id[4]  # a row's baseline is its `vs`, else the reference; only the reference compares against itself
    assert t4.baseline_of(t4.row("simclr_random")).name == "simclr_learned"
    assert t4.baseline_of(t4.row("simclr_learned")).name == "mocov3_lr1.5e-4_learned"
    assert [r.name for r in t4.rows if t4.is_baseline(r)] == ["mocov3_lr1.5e-4_learned"]


@pytest.mark.parametrize("body, where", [
    ("rows: [{name: a, label: A, set: {pos_embd: none}}]", "rows[0].set.pos_embd: unknown key"),
    ("rows: [{name: a, label: A, set: {batch_size: big}}]", "rows[0].set.batch_size"),
    ("rows: [{name: a, label: A, colour: red}]", "rows[0].colour: unknown key"),
    ("rows: [{name: a}]", "rows[0].label: required key is missing"),
    ("rows: [{name: a, label: A, set: {pos_embed: rotary}}]", "rows[0].set.pos_embed"),
])
def test_malformed_spec_names_file_and_key(tmp_path, body, where):
    path = tmp_path / "bad.yaml"
    path.write_text(f"id: 5\ntitle: t\npaper_ref: r\nreference: a\n{body}\n")
    with pytest.raises(SpecError) as e:
        load_spec(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and where in msg


def test_reference_must_name_a_row(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("id: 5\ntitle: t\npaper_ref: r\nreference: zz\nrows: [{name: a, label: A}]\n")
    with pytest.raises(SpecError, match="reference 'zz' is not a row name"):
        load_spec(path)


def test_yaml_syntax_error_reports_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("id: 5\ntitle: [unclosed\n")
    with pytest.raises(SpecError, match=r"bad.yaml: line \d+ not valid YAML"):
        load_spec(path)


def test_find_spec_by_name():
    assert find_spec("table5").name == "05_position_embedding.yaml"
    assert find_spec("11").name == "11_transfer.yaml"
    with pytest.raises(SpecError, match="no study 'table98'"):
        find_spec("table98")


def test_cli_malformed_spec_is_one_line_exit_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("id: 5\ntitle: t\npaper_ref: r\nreference: a\nrows: [{name: a, label: A, set: {pos_embd: x}}]\n")
    r = subprocess.run([sys.executable, "-m", "replicate", "run", str(path), "--profile", "smoke",
                        "--results", str(tmp_path / "res")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "pos_embd: unknown key" in r.stderr
    assert not (tmp_path / "res").exists()  # validated before anything ran


@pytest.mark.parametrize("body, hint", [
    ("rows: [{name: a, label: A}]\nnotse: x", "notse: unknown key (did you mean 'notes'?)"),
    ("rows: [{name: a, label: A, paperr: 70.1}]", "rows[0].paperr: unknown key (did you mean 'paper'?)"),
    ("rows: [{name: a, lable: A}]", "rows[0].label: required key is missing (is the unknown key 'lable' a typo for "
                                    "it?)"),
    ("rows: [{name: a, label: A, set: {pos_embd: none}}]", "rows[0].set.pos_embd: unknown key (did you mean "
                                                           "'pos_embed'?)"),
    ("base: {momentun: 0.9}\nrows: [{name: a, label: A}]", "base.momentun: unknown key (did you mean 'momentum'?)"),
    ("rows: [{name: a, label: A, colour: red}]", "rows[0].colour: unknown key (allowed: name, label, set, paper, vs, "
                                                 "note)"),
])
def test_a_mistyped_key_suggests_the_closest_allowed_one_at_every_level(tmp_path, body, hint):
    path = tmp_path / "typo.yaml"
    path.write_text(f"id: 5\ntitle: t\npaper_ref: r\nreference: a\n{body}\n")
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert str(e.value) == f"{path}: {hint}"
