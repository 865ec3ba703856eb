"""``bnaudit watch`` as a user runs it, in a subprocess: the script behaves exactly as under ``python`` (argv,
``__main__``, sys.path[0], stdout, exit status, its own traceback), the report folder is written first, and
bnaudit's own options and errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.watching.helpers import SCRIPTS, bnaudit_watch, marked_line, run


def _report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


def test_argv_main_and_path0_are_what_python_gives(tmp_path):
    script = SCRIPTS / "argv_echo.py"
    args = ["--lr", "3", "-m", "x y", "--out", "mine"]  # bnaudit options after the script belong to the script
    plain = run([sys.executable, str(script), *args], tmp_path)
    watched = bnaudit_watch("--out", str(tmp_path / "w"), "--no-plots", str(script), *args, cwd=tmp_path)
    assert plain.returncode == 0 and watched.returncode == 0, watched.stderr
    assert watched.stdout == plain.stdout  # stdout passes through unchanged: bnaudit writes nothing there
    seen = json.loads(watched.stdout)
    assert seen["argv"] == [str(script), *args]
    assert seen["name"] == "__main__" and seen["main_is_me"] is True
    assert seen["path0"] == str(SCRIPTS)
    assert _report(tmp_path / "w")["reports"][0]["meta"]["steps"] == 2


def test_module_mode_matches_python_dash_m(tmp_path):
    plain = run([sys.executable, "-m", "argv_echo", "a", "--b"], SCRIPTS)
    watched = run([sys.executable, "-m", "bnaudit", "watch", "--out", str(tmp_path / "w"), "--no-plots", "-m",
                   "argv_echo", "a", "--b"], SCRIPTS)
    assert watched.returncode == 0, watched.stderr
    assert json.loads(watched.stdout) == json.loads(plain.stdout)


def test_a_script_that_raises_gets_its_report_then_its_traceback_and_status(tmp_path):
    out = tmp_path / "r"
    got = bnaudit_watch("--out", str(out), "--no-plots", str(SCRIPTS / "raise_at_step.py"), cwd=tmp_path)
    assert got.returncode == 1
    err = got.stderr
    assert err.index("wrote") < err.index("Traceback (most recent call last)")  # the report first
    line = marked_line("raise_at_step.py", "the script's own error")
    assert f'raise_at_step.py", line {line}, in check_batch' in err
    assert err.rstrip().endswith("RuntimeError: corrupt batch at step 5")
    assert "bnaudit/watching" not in err and "runpy" not in err  # the script's own traceback, no frames of ours
    rep = _report(out)
    assert rep["watch"]["exit_code"] == 1 and rep["watch"]["outcome"] == "raised RuntimeError"
    assert rep["reports"][0]["meta"]["steps"] == 5


def test_sys_exit_status_passes_through_and_the_folder_is_never_overwritten(tmp_path):
    first = bnaudit_watch("--no-plots", str(SCRIPTS / "exit3.py"), cwd=tmp_path)
    assert first.returncode == 3 and "no improvement" in first.stdout
    assert _report(tmp_path / "bnaudit-watch")["reports"][0]["meta"]["steps"] == 4
    second = bnaudit_watch("--no-plots", str(SCRIPTS / "exit3.py"), cwd=tmp_path)
    assert second.returncode == 3
    assert (tmp_path / "bnaudit-watch-2" / "report.json").is_file()  # a fresh numbered folder


def test_outputs_and_fail_on(tmp_path):
    out = tmp_path / "o"
    got = bnaudit_watch("--out", str(out), "--fail-on", "error", str(SCRIPTS / "eval_without_eval.py"), "--epochs",
                        "2", cwd=tmp_path)
    assert got.returncode == 1, got.stderr  # the script succeeded; BN306 is an error
    assert "epoch 1 accuracy" in got.stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == ["BNMLP-drift.png", "BNMLP-modes.png", "BNMLP-percentiles.png", "BNMLP-running.png",
                     "BNMLP.history.csv", "BNMLP.history.pt", "report.html", "report.json"]
    (bn306,) = [f for f in _report(out)["reports"][0]["findings"] if f["code"] == "BN306"]
    assert bn306["step"] == 22 and bn306["location"].endswith(
        f"eval_without_eval.py:{marked_line('eval_without_eval.py', '# BN306')}")
    html = (out / "report.html").read_text()
    assert "BN306" in html and "data:image/png;base64," in html
    from bnaudit.recording import History

    assert History.load(out / "BNMLP.history.pt").bn_layers == ["net.1", "net.4"]


def test_a_missing_script_is_one_line_and_status_2(tmp_path):
    got = bnaudit_watch(str(tmp_path / "nope.py"), cwd=tmp_path)
    assert got.returncode == 2
    assert got.stderr.startswith("bnaudit: error:") and len(got.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bnaudit-watch").exists()


def test_ctrl_c_writes_the_report_then_exits_130(tmp_path):
    import signal
    import subprocess

    from tests.watching.helpers import env

    out = tmp_path / "c"
    proc = subprocess.Popen([sys.executable, "-m", "bnaudit", "watch", "--out", str(out), "--no-plots",
                             str(SCRIPTS / "long_train.py")], cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.strip() == "step 5":
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert err.index("wrote") < err.index("KeyboardInterrupt")
    rep = _report(out)
    assert rep["watch"]["outcome"] == "interrupted" and rep["reports"][0]["meta"]["steps"] >= 5


def test_an_unknown_rule_is_refused_before_the_script_runs(tmp_path):
    got = bnaudit_watch("--select", "BN999", str(SCRIPTS / "argv_echo.py"), cwd=tmp_path)
    assert got.returncode == 2 and got.stdout == ""
    assert got.stderr.startswith("bnaudit: error:") and len(got.stderr.strip().splitlines()) == 1
