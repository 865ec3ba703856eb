"""The output plan and the capped reader (bnaudit/io.py): every refusal before anything is written, and a
set of outputs written all or not at all, whatever interrupts it."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from bnaudit.errors import LimitError, OutputError
from bnaudit.files import OutputPlan, read_text_capped, spec_paths

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="FIFOs, /dev/zero and /sys: Linux")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_spec_paths_name_the_files_of_specs(tmp_path: Path) -> None:
    assert spec_paths("m.py:build_model", "d.pt", "random:3x32x32", None, 3, tmp_path / "w.pt", "pkg.mod:NAME") == [
        Path("m.py"), Path("d.pt"), tmp_path / "w.pt", Path("pkg.mod")
    ]


@pytest.mark.parametrize(
    ("declare", "message"),
    [
        (lambda p, t: p.file(t / "model.pt", label="-o", replace=True), "is also an input of this run"),
        (lambda p, t: p.file(t / "link.json", label="-o", replace=True), "is also an input of this run"),
        (lambda p, t: p.file(t / "new.py", label="-o"), "never writes a Python source file"),
        (lambda p, t: p.file(t / "r.json", label="-o"), "r.json already exists; pass --force"),
        (lambda p, t: p.file(t / "r.json", label="-o", why_not="its entry says overwrite: false"),
         "its entry says overwrite: false"),
        (lambda p, t: p.file(t / "sub", label="-o", replace=True), "is a folder"),
        (lambda p, t: p.file(t / "nope" / "r.json", label="-o"), "does not exist; create it first"),
        (lambda p, t: p.file(t / "fifo", label="-o", replace=True), "is not a regular file"),
        (lambda p, t: p.file("/sys/kernel/r.json", label="-o"), "cannot write in folder /sys/kernel"),
        (lambda p, t: (p.file(t / "a.json", label="-o"), p.file(t / "a.json", label="--html")), "both write"),
        (lambda p, t: p.folder(t / "r.json", ["x.png"], label="--plot"), "is a file; give a folder"),
        (lambda p, t: p.folder(t / "sub", ["old.png"], label="--plot"), "old.png already exists"),
    ],
)
def test_refusals_happen_before_anything_is_written(tmp_path: Path, declare, message) -> None:
    (tmp_path / "model.pt").write_bytes(b"weights")
    (tmp_path / "link.json").symlink_to(tmp_path / "model.pt")
    (tmp_path / "r.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "old.png").write_bytes(b"png")
    os.mkfifo(tmp_path / "fifo")
    before = _files(tmp_path)
    plan = OutputPlan(inputs=[tmp_path / "model.pt"])
    declare(plan, tmp_path)
    with pytest.raises(OutputError, match=message):
        plan.check()
    assert _files(tmp_path) == before


def test_a_hard_link_to_an_input_is_an_input(tmp_path: Path) -> None:
    (tmp_path / "data.pt").write_bytes(b"data")
    os.link(tmp_path / "data.pt", tmp_path / "alias.pt")
    plan = OutputPlan(inputs=[tmp_path / "data.pt"])
    plan.file(tmp_path / "alias.pt", label="-o", replace=True)
    with pytest.raises(OutputError, match="also an input"):
        plan.check()


def test_commit_writes_the_set_and_creates_folders(tmp_path: Path) -> None:
    plan = OutputPlan()
    plan.file(tmp_path / "r.json", label="-o")
    plan.folder(tmp_path / "a" / "b", ["loss.png", "drift.png"], label="--plot")
    plan.check()
    assert not (tmp_path / "a").exists()  # checking creates nothing
    written = plan.commit({tmp_path / "r.json": "{}", tmp_path / "a" / "b" / "loss.png": b"png",
                           tmp_path / "a" / "b" / "drift.png": lambda p: p.write_bytes(b"d")})
    assert [p.name for p in written] == ["r.json", "loss.png", "drift.png"]
    assert _files(tmp_path) == {"r.json": b"{}", "a/b/loss.png": b"png", "a/b/drift.png": b"d"}


def test_an_interrupt_while_staging_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "old.json").write_text("old")
    plan = OutputPlan()
    plan.file(tmp_path / "old.json", label="-o", replace=True)
    plan.folder(tmp_path / "plots", ["loss.png"], label="--plot")
    plan.check()

    def ctrl_c(path: Path) -> None:
        path.write_bytes(b"half")
        signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        plan.commit({tmp_path / "old.json": "new", tmp_path / "plots" / "loss.png": ctrl_c})
    assert _files(tmp_path) == {"old.json": b"old"}  # no new file, no temporary, no plots folder
    assert not (tmp_path / "plots").exists()


def test_a_failed_rename_restores_what_was_replaced(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("old a")
    plan = OutputPlan()
    plan.file(tmp_path / "a.json", label="-o", replace=True)
    plan.file(tmp_path / "b.json", label="--html", replace=True)
    plan.check()
    (tmp_path / "b.json").mkdir()  # appears between the check and the commit
    with pytest.raises(OutputError, match="not a regular file"):
        plan.commit({tmp_path / "a.json": "new a", tmp_path / "b.json": "b"})
    assert (tmp_path / "a.json").read_text() == "old a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]


def test_a_file_that_appears_meanwhile_is_not_replaced(tmp_path: Path) -> None:
    plan = OutputPlan()
    plan.file(tmp_path / "r.json", label="-o")
    plan.check()
    (tmp_path / "r.json").write_text("theirs")
    with pytest.raises(OutputError, match="already exists"):
        plan.commit({tmp_path / "r.json": "ours"})
    assert _files(tmp_path) == {"r.json": b"theirs"}


def test_undeclared_outputs_are_refused(tmp_path: Path) -> None:
    plan = OutputPlan()
    plan.check()
    with pytest.raises(OutputError, match="not declared"):
        plan.commit({tmp_path / "x.json": "{}"})


def test_read_text_capped(tmp_path: Path) -> None:
    (tmp_path / "ok.yaml").write_text("fail_on: error\n")
    assert read_text_capped(tmp_path / "ok.yaml") == "fail_on: error\n"
    (tmp_path / "big.yaml").write_text("a" * 101)
    with pytest.raises(LimitError, match="larger than 100 bytes"):
        read_text_capped(tmp_path / "big.yaml", limit=100)
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")
    with pytest.raises(OSError, match="not a regular file"):
        read_text_capped(tmp_path / "zero.yaml")
    os.mkfifo(tmp_path / "fifo.yaml")
    with pytest.raises(OSError, match="not a regular file"):
        read_text_capped(tmp_path / "fifo.yaml")  # refused without opening (opening a FIFO would block)
    with pytest.raises(FileNotFoundError):
        read_text_capped(tmp_path / "missing.yaml")
