"""Progress output: a bar on a terminal, whole lines in a log file (a background run says where it is), nothing with
--quiet; and it never changes what a run computes."""
import io
import sys

import torch
from tqdm import tqdm

from replicate.core.config import Setting
from replicate.runtime.progress import LogLines, progress
from replicate.runtime.trainer import pretrain
from replicate.study.profiles import get_profile


def lines_of(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_a_log_gets_one_line_per_tenth_and_the_last_says_done():
    out = io.StringIO()
    bar = LogLines(range(100), total=100, desc="pretrain mocov3 seed 0", file=out)
    for i in bar:
        if i == 54:
            bar.set_postfix(loss="5.123", knn="61.0")
    lines = lines_of(out)
    assert len(lines) == 10 and "\r" not in out.getvalue()
    assert lines[0].startswith("pretrain mocov3 seed 0: 10/100 it (10%)")
    assert "loss=5.123, knn=61.0" in lines[5] and "loss" not in lines[4]
    assert lines[-1].startswith("pretrain mocov3 seed 0: 100/100 it (100%)")


def test_a_resumed_run_counts_from_where_it_stopped():
    out = io.StringIO()
    for _ in LogLines(range(45, 100), total=100, initial=45, desc="linear probe", unit="epoch", file=out):
        pass
    lines = lines_of(out)
    assert [line.split(":")[1].split()[0] for line in lines] == ["50/100", "60/100", "70/100", "80/100", "90/100",
                                                                 "100/100"]
    assert "epoch (50%)" in lines[0]


def test_a_slow_run_still_reports_every_interval():
    out = io.StringIO()
    bar = LogLines(total=1000, desc="fine-tune", interval=0.0, file=out)
    for _ in range(3):
        bar.update()
    assert [line.split()[1] for line in lines_of(out)] == ["1/1000", "2/1000", "3/1000"]


def test_terminal_gets_a_bar_log_gets_lines_quiet_gets_nothing(monkeypatch):
    class Stream(io.StringIO):
        def __init__(self, tty: bool):
            super().__init__()
            self.tty = tty

        def isatty(self):
            return self.tty

    monkeypatch.setattr(sys, "stderr", Stream(tty=True))
    assert isinstance(progress(range(3), total=3, desc="x"), tqdm)
    monkeypatch.setattr(sys, "stderr", Stream(tty=False))
    assert isinstance(progress(range(3), total=3, desc="x"), LogLines)
    quiet = progress(range(3), total=3, desc="x", enabled=False)
    assert list(quiet) == [0, 1, 2] and sys.stderr.getvalue() == ""


def test_pretraining_logs_lines_and_computes_the_same_as_quiet(capsys):
    cfg = get_profile("smoke").resolve(Setting())
    logged = pretrain(cfg, progress=True, max_steps=4)
    err = capsys.readouterr().err
    assert "pretrain mocov3 seed 0: " in err and "\r" not in err
    quiet = pretrain(cfg, progress=False, max_steps=4)
    assert capsys.readouterr().err == ""
    assert all(torch.equal(a, b) for a, b in zip(logged.model.state_dict().values(),
                                                 quiet.model.state_dict().values()))
