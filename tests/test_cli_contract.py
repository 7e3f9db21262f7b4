"""The CLI's exit codes and messages through the real entry point (`tx-bench` as installed):
usage errors (rc 2, usage line, the option's name), no arguments, --version, Ctrl-C (rc 130 and how
far the run got), and file-system problems said in one sentence instead of h5py's internals."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from transexplain.errors import UserError  # noqa: E402

ENTRY = Path(sys.executable).parent / "tx-bench"
if not ENTRY.exists():  # not run from the project's virtual environment
    ENTRY = Path(shutil.which("tx-bench") or ENTRY)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def tx(*args, cwd=None, env=None):
    return subprocess.run([str(ENTRY), *map(str, args)], capture_output=True, text=True, env=env or ENV,
                          cwd=cwd, timeout=300)


# ------------------------------------------------------------------------------ usage errors
@pytest.mark.parametrize(
    "args, name",
    [
        (["perturb", "--method", "rollout", "--no-such-option"], "--no-such-option"),  # unknown option
        (["perturb", "--limit", "5"], "--method"),  # missing required option
        (["segment", "--limit", "5"], "--method"),  # the same for every benchmark
        (["eraser", "--limit", "5"], "--method"),
        (["perturb", "--method", "rollout", "--limit", "0"], "--limit"),  # value out of range
        (["explain", "--target", "abc"], "--target"),  # value of the wrong type
        (["no-such-command"], "no-such-command"),  # unknown command
        (["data", "no-such-command"], "no-such-command"),  # unknown sub-command
        (["report"], "results"),  # missing argument
    ],
    ids=["unknown-option", "missing-option", "missing-option-segment", "missing-option-eraser", "out-of-range", "bad-type", "unknown-command", "unknown-subcommand",
         "missing-argument"],
)
def test_usage_errors_exit_2_with_usage_line_and_option_name(tmp_path, args, name):
    out = tx(*args, cwd=tmp_path)
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Usage: tx-bench" in out.stderr
    assert name in out.stderr.split("Usage:", 1)[1]
    assert "--debug" not in out.stderr and "Traceback" not in out.stderr
    # no exception class names instead of click's wording
    for internal in ("NoSuchOption", "BadParameter", "MissingParameter", "UsageError"):
        assert internal not in out.stderr
    assert list(tmp_path.iterdir()) == []  # nothing ran


def test_no_arguments_print_the_help_and_exit_2_as_click_does():
    out = tx()
    assert out.returncode == 2
    assert "perturb" in out.stdout and "segment" in out.stdout and "Usage" in out.stdout
    assert "NoArgsIsHelpError" not in out.stdout + out.stderr and "Error" not in out.stderr


def test_version():
    import transexplain

    out = tx("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"tx-bench {transexplain.__version__}"


def test_help_still_exits_0():
    out = tx("--help")
    assert out.returncode == 0 and "--version" in out.stdout and "Commands" in out.stdout


# ------------------------------------------------------------------------------------ Ctrl-C
def test_ctrl_c_exits_130_and_says_how_far_the_run_got(monkeypatch, capsys, tmp_path):
    """typer returns 130 from app() under standalone_mode=False; main() used to drop it (exit 0)."""
    from transexplain import cli, interrupt, visualize

    def interrupted_run(*args, **kwargs):
        interrupt.progress(0, 5)
        interrupt.progress(2, 5)
        raise KeyboardInterrupt

    monkeypatch.setattr(visualize, "explain_images", interrupted_run)
    monkeypatch.setattr(sys, "argv", ["tx-bench", "explain", str(tmp_path / "a.png"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 130
    err = capsys.readouterr().err
    assert "Interrupted after 2 of 5 images; run the same command again to resume." in err


def test_ctrl_c_before_any_progress_says_interrupted(monkeypatch, capsys, tmp_path):
    from transexplain import cli, interrupt, visualize

    interrupt.progress(7, 9)  # left over from an earlier command in this process: must not show

    def interrupted_run(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(visualize, "explain_images", interrupted_run)
    monkeypatch.setattr(sys, "argv", ["tx-bench", "explain", str(tmp_path / "a.png")])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 130
    err = capsys.readouterr().err
    assert "Interrupted." in err and "7 of 9" not in err


def test_sigint_through_the_real_entry_point_exits_130(tmp_path):
    """A real SIGINT while a benchmark runs: exit 130 and one 'Interrupted' line, no traceback."""
    # a shell starting pytest as a background job hands SIGINT down ignored (POSIX), and Python then
    # keeps ignoring it: the child gets the default disposition back, as a terminal's foreground job has
    proc = subprocess.Popen([str(ENTRY), "perturb", "--method", "all", "--limit", "300", "--quiet",
                             "--out", str(tmp_path / "r.h5")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = proc.stdout.readline()  # "No --data given: ..." comes after the model is loaded
        assert "embedded" in line, line
        time.sleep(1.0)
        assert proc.poll() is None, "the run finished before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (proc.returncode, stderr)
    assert "Interrupted" in stderr and "Traceback" not in stderr and "--debug" not in stderr


# ----------------------------------------------------------------------- file-system problems
@pytest.fixture(scope="module")
def gtsegs_bytes(tmp_path_factory):
    from transexplain.data.gtsegs import write_gtsegs

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(4)]
    masks = [(rng.random((16, 16)) > 0.5).astype(np.uint8) for _ in range(4)]
    path = write_gtsegs(tmp_path_factory.mktemp("seg") / "gt.mat", images, masks)
    return path.read_bytes()


def test_truncated_mat_is_one_sentence_through_the_cli(tmp_path, gtsegs_bytes):
    bad = tmp_path / "gtsegs_ijcv.mat"
    bad.write_bytes(gtsegs_bytes[: len(gtsegs_bytes) // 2])
    out = tx("segment", "--method", "rollout", "--data", bad, "--out", tmp_path / "r.h5", "--quiet", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    rest = lines[0].replace(str(bad), "")  # the test's folder name must not satisfy the checks
    assert str(bad) in lines[0] and "truncated" in rest and "again" in rest
    assert "synchronously" not in out.stderr and "eof" not in out.stderr and "--debug" not in out.stderr


@pytest.mark.parametrize("keep", [0, 100, 600])
def test_truncated_mat_at_any_length_is_a_user_error(tmp_path, gtsegs_bytes, keep):
    from transexplain.data.gtsegs import GtSegsDataset

    bad = tmp_path / "gt.mat"
    bad.write_bytes(gtsegs_bytes[:keep])
    with pytest.raises(UserError) as exc:
        GtSegsDataset(bad)
    msg = str(exc.value)
    rest = msg.replace(str(bad), "")
    assert str(bad) in msg and ("truncated" in rest or "empty" in rest) and "again" in rest


def test_damaged_embedded_cache_names_the_command_that_regenerates_it(tmp_path, monkeypatch, gtsegs_bytes):
    from transexplain.data import shapes
    from transexplain.data.gtsegs import GtSegsDataset

    monkeypatch.setenv("TRANSEXPLAIN_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "cache" / f"{shapes.VERSION}-seed0" / shapes.SEG_FILE
    bad.parent.mkdir(parents=True)
    bad.write_bytes(gtsegs_bytes[:-100])
    with pytest.raises(UserError) as exc:
        GtSegsDataset(bad)
    msg = str(exc.value)
    rest = msg.replace(str(bad), "")
    assert str(bad) in msg and "tx-bench data make" in rest and "damaged" in rest


def test_eraser_file_that_is_not_utf8_is_a_user_error(tmp_path):
    from transexplain.data.eraser import read_eraser

    root = tmp_path / "movies"
    (root / "docs").mkdir(parents=True)
    (root / "test.jsonl").write_bytes(b'{"annotation_id": "a"}\n\xff\xfe\x00garbage\n')
    with pytest.raises(UserError) as exc:
        read_eraser(root)
    assert str(root / "test.jsonl") in str(exc.value) and "UTF-8" in str(exc.value)


def test_eraser_document_that_is_not_utf8_is_a_user_error(tmp_path):
    from transexplain.data.eraser import read_eraser

    root = tmp_path / "movies"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "d1").write_bytes(b"good words \xff\xfe bad")
    (root / "test.jsonl").write_text('{"annotation_id": "d1", "classification": "POS", "evidences": [], "docids": ["d1"]}\n')
    with pytest.raises(UserError) as exc:
        read_eraser(root)
    assert str(root / "docs" / "d1") in str(exc.value)


def test_check_output_path_refuses_a_folder(tmp_path):
    from transexplain.results.paths import check_output_path

    with pytest.raises(UserError) as exc:
        check_output_path(tmp_path)
    assert str(tmp_path) in str(exc.value) and "folder" in str(exc.value) and "--out" in str(exc.value)


def test_check_output_path_refuses_a_path_under_a_file(tmp_path):
    from transexplain.results.paths import check_output_path

    (tmp_path / "plain").write_text("x")
    with pytest.raises(UserError) as exc:
        check_output_path(tmp_path / "plain" / "r.h5")
    assert str(tmp_path / "plain") in str(exc.value)


def test_check_output_path_accepts_a_new_file_and_leaves_nothing_behind(tmp_path):
    from transexplain.results.paths import check_output_path

    assert check_output_path(tmp_path / "sub" / "r.h5") == tmp_path / "sub" / "r.h5"
    assert check_output_path(tmp_path / "r.h5") == tmp_path / "r.h5"
    assert list(tmp_path.iterdir()) == []


READ_ONLY_SNIPPET = """
import sys
from transexplain.errors import UserError
from transexplain.results.paths import check_output_path
try:
    check_output_path(sys.argv[1])
except UserError as err:
    print(err)
    sys.exit(3)
"""


def test_check_output_path_refuses_a_read_only_folder():
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="tx-ro-"))  # not under pytest's 0700 folders: reachable by any user
    base.chmod(0o755)
    folder = base / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    cmd = [sys.executable, "-c", READ_ONLY_SNIPPET, str(folder / "r.h5")]
    if os.geteuid() == 0:  # root writes anywhere: check as an unprivileged user
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv to drop privileges")
        cmd = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", *cmd]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120,
                             cwd=Path(__file__).resolve().parent.parent)
    finally:
        folder.chmod(0o755)
        shutil.rmtree(base)
    assert out.returncode == 3, (out.returncode, out.stdout, out.stderr)
    assert str(folder) in out.stdout and "not writable" in out.stdout
