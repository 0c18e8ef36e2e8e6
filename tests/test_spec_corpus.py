"""A corpus of malformed specs: each is refused by `replicate run SPEC --profile smoke` with exit code 2 and one
`error:` line naming the file and the key in the spec's words, before anything is written (the results folder is
never created). Every case here once trained on nonsense, ended in a traceback or was refused unclearly."""
import contextlib
import io

import pytest

from replicate.__main__ import main

TOP = "id: 91\ntitle: Corpus\npaper_ref: test\nreference: a\n"
BASE = "{epochs: 100, warmup_epochs: 10}"


def spec(b: str = "", base: str = BASE, a: str = "", top: str = TOP, kind: str = "") -> str:
    """The corpus's well-formed spec, with ``b`` inserted into row b's mapping, ``a`` into row a's."""
    return (f"{top}{kind}base: {base}\nrows:\n  - {{name: a, label: a, paper: 70.0{a}}}\n"
            f"  - {{name: b, label: b, set: {{temperature: 0.3}}{b}}}\n")


def row_set(settings: str, **kw) -> str:
    return spec(b=f", set: {{{settings}}}", **kw).replace("set: {temperature: 0.3}, ", "")


FINETUNE = "kind: finetune\nmetric: finetune\n"
SWAV = "framework: swav, "

# name -> (spec text, what the error line must contain)
CORPUS = {
    # batch
    "batch_negative": (row_set("batch_size: -4096"), "rows[1].set.batch_size: Input should be greater than or equal to 1"),
    "batch_zero": (row_set("batch_size: 0"), "rows[1].set.batch_size"),
    "batch_below_two_at_profile": (row_set("batch_size: 64"), "rows[1].set.batch_size: 64 gives 1 images per step"),
    "batch_beyond_the_data": (row_set("batch_size: 100000000"), "more than its"),
    "batch_fraction": (row_set("batch_size: 4096.5"), "rows[1].set.batch_size"),
    "batch_text": (row_set("batch_size: '4096'"), "rows[1].set.batch_size"),
    "batch_bool": (row_set("batch_size: true"), "rows[1].set.batch_size"),
    "batch_in_base": (spec(base="{epochs: 100, warmup_epochs: 10, batch_size: -1}"), "base.batch_size"),
    # epochs and warmup
    "epochs_negative": (row_set("epochs: -300"), "rows[1].set.epochs"),
    "epochs_zero": (row_set("epochs: 0"), "rows[1].set.epochs"),
    "epochs_forever": (row_set("epochs: 1000000000"), "rows[1].set.epochs: Input should be less than or equal to"),
    "epochs_below_one_at_profile": (row_set("epochs: 50"), "rows[1].set.epochs: 50 gives 0 epochs at profile smoke"),
    "epochs_nan": (row_set("epochs: .nan"), "rows[1].set.epochs"),
    "epochs_float": (row_set("epochs: 1.0e+9"), "rows[1].set.epochs"),
    "warmup_beyond_epochs": (row_set("epochs: 100, warmup_epochs: 200"), "rows[1].set.warmup_epochs: 200 must be less"),
    "warmup_equal_epochs": (row_set("epochs: 100, warmup_epochs: 100"), "rows[1].set.warmup_epochs"),
    "warmup_negative": (row_set("warmup_epochs: -1"), "rows[1].set.warmup_epochs"),
    "warmup_from_base_beyond_row_epochs": (row_set("epochs: 5"), "base.warmup_epochs: 10 must be less than epochs (5)"),
    # optimisation
    "lr_negative": (row_set("base_lr: -1.0e-4"), "rows[1].set.base_lr"),
    "lr_zero": (row_set("base_lr: 0"), "rows[1].set.base_lr"),
    "lr_nan": (row_set("base_lr: .nan"), "rows[1].set.base_lr"),
    "lr_inf": (row_set("base_lr: .inf"), "rows[1].set.base_lr"),
    "lr_text": (row_set("base_lr: '1.5e-4'"), "rows[1].set.base_lr"),
    "wd_negative": (row_set("weight_decay: -0.1"), "rows[1].set.weight_decay"),
    "wd_nan": (row_set("weight_decay: .nan"), "rows[1].set.weight_decay"),
    "wd_inf": (row_set("weight_decay: .inf"), "rows[1].set.weight_decay"),
    "momentum_above_one": (row_set("momentum: 1.5"), "rows[1].set.momentum: Input should be less than or equal to 1"),
    "momentum_negative": (row_set("momentum: -0.1"), "rows[1].set.momentum"),
    "momentum_nan": (row_set("momentum: .nan"), "rows[1].set.momentum"),
    "momentum_schedule_unknown": (row_set("momentum_schedule: linear"), "rows[1].set.momentum_schedule"),
    "temperature_zero": (row_set("temperature: 0"), "rows[1].set.temperature"),
    "temperature_negative": (row_set("temperature: -0.2"), "rows[1].set.temperature"),
    "temperature_inf": (row_set("temperature: .inf"), "rows[1].set.temperature"),
    # heads
    "proj_layers_zero": (row_set("proj_layers: 0"), "rows[1].set.proj_layers"),
    "pred_layers_negative": (row_set("pred_layers: -2"), "rows[1].set.pred_layers"),
    "proj_layers_huge": (row_set("proj_layers: 1000"), "rows[1].set.proj_layers"),
    # SwAV
    "sinkhorn_zero": (row_set(SWAV + "sinkhorn_iterations: 0"), "rows[1].set.sinkhorn_iterations"),
    "prototypes_zero": (row_set(SWAV + "swav_prototypes: 0"), "rows[1].set.swav_prototypes"),
    "prototypes_below_two_at_profile": (row_set(SWAV + "swav_prototypes: 10"), "rows[1].set.swav_prototypes: 10 gives"),
    "swav_temperature_zero": (row_set(SWAV + "swav_temperature: 0"), "rows[1].set.swav_temperature"),
    "swav_epsilon_negative": (row_set(SWAV + "swav_epsilon: -1"), "rows[1].set.swav_epsilon"),
    "swav_freeze_negative": (row_set(SWAV + "swav_freeze_prototypes_epochs: -1"),
                             "rows[1].set.swav_freeze_prototypes_epochs"),
    # patches
    "patch_without_a_size_at_profile": (row_set("patch_size: 13"), "rows[1].set.patch_size: profile smoke has no"),
    "patch_zero": (row_set("patch_size: 0"), "rows[1].set.patch_size"),
    "patch_clip_inf": (row_set("patch_proj: learned, patch_proj_clip: .inf"), "rows[1].set.patch_proj_clip"),
    "patch_clip_negative": (row_set("patch_proj: learned, patch_proj_clip: -1.0"), "rows[1].set.patch_proj_clip"),
    # fine-tuning
    "drop_path_one": (row_set("finetune_drop_path: 1.0", kind=FINETUNE), "rows[1].set.finetune_drop_path"),
    "finetune_epochs_zero": (row_set("finetune_epochs: 0", kind=FINETUNE), "rows[1].set.finetune_epochs"),
    "finetune_epochs_below_one_at_profile": (row_set("finetune_epochs: 50", kind=FINETUNE),
                                             "rows[1].set.finetune_epochs: 50 gives 0 epochs"),
    # paper values
    "paper_text": (spec(b=", paper: '74.9'"), "rows[1].paper: must be a number"),
    "paper_nan": (spec(b=", paper: .nan"), "rows[1].paper: must be a number"),
    "paper_inf": (spec(b=", paper: .inf"), "rows[1].paper: must be a number"),
    "paper_bool": (spec(b=", paper: true"), "rows[1].paper: must be a number"),
    "paper_mapping_of_text": (spec(b=", paper: {cifar10: '98.9'}"), "rows[1].paper"),
    # duplicate keys
    "duplicate_setting_key": (row_set("temperature: 0.3, temperature: 0.4"), "duplicate key 'temperature'"),
    "duplicate_top_level_key": (spec(top=TOP + "reference: b\n"), "duplicate key 'reference'"),
    "duplicate_base_key": (spec(base="{epochs: 100, epochs: 300, warmup_epochs: 10}"), "duplicate key 'epochs'"),
    "duplicate_row_key": (spec(b=", label: c"), "duplicate key 'label'"),
    # names
    "row_name_too_long": (spec(b=", name: " + "x" * 240).replace("name: b, ", ""), "rows[1].name"),
    "row_name_with_a_slash": (spec().replace("name: b,", "name: a/b,"), "rows[1].name"),
    "row_name_parent_folder": (spec().replace("name: b,", "name: '../b',"), "rows[1].name"),
    "row_name_empty": (spec().replace("name: b,", "name: '',"), "rows[1].name"),
    "row_name_duplicate": (spec().replace("name: b,", "name: a,"), "rows[1].name: duplicate row name 'a'"),
    # structure and types
    "unknown_setting_key": (row_set("pos_embd: learned"), "rows[1].set.pos_embd: unknown key"),
    "setting_key_not_text": (row_set("1: 2"), "rows[1].set"),
    "set_not_a_mapping": (spec(b=", set: [1, 2]").replace("set: {temperature: 0.3}, ", ""), "rows[1].set"),
    "no_rows": (TOP + "rows: []\n", "rows"),
    "id_zero": (spec(top=TOP.replace("id: 91", "id: 0")), "id: Input should be greater than or equal to 1"),
    "kind_unknown": (spec(kind="kind: pretraining\n"), "kind"),
    "vs_unknown": (spec(b=", vs: zz"), "rows[1].vs: 'zz' is not a row name"),
    "label_not_text": (spec().replace("label: b", "label: 5"), "rows[1].label"),
}


def run(tmp_path, name: str, text: str | bytes):
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    results = tmp_path / "results"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["run", str(path), "--profile", "smoke", "--results", str(results), "--quiet"])
    return path, results, code, out.getvalue(), err.getvalue()


def test_the_corpus_is_large_and_its_base_spec_valid(tmp_path):
    from replicate.study.spec import load_spec

    assert len(CORPUS) >= 50
    path = tmp_path / "good.yaml"
    path.write_text(spec())
    assert [r.name for r in load_spec(path).rows] == ["a", "b"]
    path.write_text(row_set("batch_size: 128, epochs: 150, warmup_epochs: 0, momentum: 1.0"))
    load_spec(path)  # the boundaries themselves are allowed


@pytest.mark.parametrize("name", list(CORPUS))
def test_a_malformed_spec_is_one_line_exit_2_and_writes_nothing(tmp_path, name):
    text, expected = CORPUS[name]
    path, results, code, out, err = run(tmp_path, name, text)
    assert code == 2, err
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert str(path) in err and expected in err, err
    assert not results.exists()


@pytest.mark.parametrize("name, content, expected", [
    ("binary", b"\x89PNG\r\n\x1a\n\xff\xfe\x00" * 20, "not a text file"),
    ("empty", b"", "a spec must be a YAML mapping"),
    ("a_list", b"- 1\n- 2\n", "a spec must be a YAML mapping"),
    ("ckpt", spec().encode(), "the file name 'ckpt' names the study's results folder"),
    ("has space", spec().encode(), "rename the file"),
])
def test_an_unusable_spec_file_is_one_line(tmp_path, name, content, expected):
    path, results, code, out, err = run(tmp_path, name, content)
    assert code == 2 and err.count("\n") == 1 and expected in err and str(path) in err, err
    assert not results.exists()
