"""The installed wheel against the command line.

Runs in a fresh virtual environment where only the wheel (and pytest, onnx)
is installed (scripts/test-wheel.sh). Every result of the module is compared
with the command's on the same inputs: the cargo-built binary named by
ONNX_IDPRUNE_CLI, else the wheel's own `onnx-idprune` command.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnx_idprune

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"
CLIP = FIXTURES / "clip_tiny_torchscript_op17.onnx"
CALIB = FIXTURES / "calib" / "clip_tiny_calib.npz"
BLIP = FIXTURES / "blip_itm_tiny_torchscript_op17.onnx"


def cli_command() -> list[str]:
    explicit = os.environ.get("ONNX_IDPRUNE_CLI")
    if explicit:
        return [explicit]
    installed = shutil.which("onnx-idprune", path=str(Path(sys.executable).parent))
    assert installed, "the wheel installs an onnx-idprune command"
    return [installed]


def cli(*args, check=True) -> subprocess.CompletedProcess:
    """The command with `args`; the wheel's library as its ONNX Runtime, so
    both sides run the same ONNX Runtime build."""
    env = dict(os.environ)
    env.pop("ORT_DYLIB_PATH", None)
    library = onnx_idprune._onnxruntime_library()
    assert library, "the onnxruntime wheel's library is found"
    command = cli_command() + [str(a) for a in args]
    if args and args[0] not in ("inspect", "id", "calib"):
        command += ["--ort-lib", library]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def cli_failure(*args) -> tuple[int, str]:
    """The exit code and the one line of a failing command (for a usage
    error, clap's first line: its usage hint follows)."""
    done = cli(*args, check=False)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    if done.returncode != 2:
        assert len(lines) == 1, done.stderr
    return done.returncode, lines[0].removeprefix("onnx-idprune: ")


def comparable(report: dict) -> dict:
    """A report without what differs between two runs of the same job:
    stage timings and the output's name."""
    out = dict(report)
    out.pop("timings")
    out.pop("output")
    return out


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_onnx_runtime_comes_from_the_onnxruntime_wheel(tmp_path):
    import onnxruntime

    package = Path(onnxruntime.__file__).parent
    library = Path(onnx_idprune._onnxruntime_library())
    assert library.is_file() and package in library.parents
    # After a run, the ONNX Runtime mapped into this process is the wheel's
    # (not a copy in the source tree the package was built from).
    onnx_idprune.prune(CLIP, tmp_path / "o.onnx", calib=CALIB, keep_params=0.7, mode="blocks")
    mapped = {Path(line.split()[-1]).resolve()
              for line in Path("/proc/self/maps").read_text().splitlines()
              if "libonnxruntime.so" in line.split()[-1]}
    assert mapped == {library.resolve()}, mapped


LOADING = """
import shutil, sys, onnx_idprune
clip, calib, tmp = sys.argv[1:4]
def run(out, **kw):
    try:
        onnx_idprune.prune(clip, f"{tmp}/{out}.onnx", calib=calib, keep_params=0.7,
                           mode="blocks", **kw)
        print("ok")
    except onnx_idprune.Error as e:
        print(e.code, e.message)
open(f"{tmp}/junk.so", "w").write("not a library")
run("a", ort_lib=f"{tmp}/junk.so")
run("b")
copy = shutil.copy(onnx_idprune._onnxruntime_library(), f"{tmp}/libonnxruntime.so")
run("c", ort_lib=copy)
run("d", ort_lib=onnx_idprune._onnxruntime_library())
"""


def test_a_failed_load_is_not_kept_and_a_second_library_is_refused(tmp_path):
    done = subprocess.run([sys.executable, "-c", LOADING, CLIP, CALIB, tmp_path],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    junk, default, other, same = done.stdout.strip().splitlines()
    assert junk.startswith("1 cannot load ONNX Runtime from ") and "junk.so" in junk
    assert default == "ok"
    assert other.startswith("1 cannot load ONNX Runtime from ") and "already loaded" in other
    assert same == "ok"


def test_prune_gives_the_commands_model_and_report(tmp_path):
    cli(CLIP, tmp_path / "cli.onnx", "--calib", CALIB, "--keep-params", "0.5",
        "--report", tmp_path / "cli.json")
    report = onnx_idprune.prune(CLIP, tmp_path / "py.onnx", calib=CALIB, keep_params=0.5)
    assert (tmp_path / "py.onnx").read_bytes() == (tmp_path / "cli.onnx").read_bytes()
    expected = json.loads((tmp_path / "cli.json").read_text())
    assert comparable(report) == comparable(expected)
    assert report["output"] == str(tmp_path / "py.onnx")
    # The report says what was done: something was removed, fidelity measured.
    assert report["plan"]["blocks"]
    assert report["fidelity"]["min_cosine"] > 0.5
    # Only the model was written: no report files unless asked.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cli.json", "cli.md", "cli.onnx", "cli.svg", "py.onnx"]


def test_prune_writes_the_report_files_when_asked(tmp_path):
    report = onnx_idprune.prune(CLIP, tmp_path / "out.onnx", calib=CALIB, keep_params=0.6,
                                mode="blocks", report=tmp_path / "r.json",
                                plan_out=tmp_path / "plan.json")
    written = json.loads((tmp_path / "r.json").read_text())
    assert written == report
    assert (tmp_path / "r.md").read_text().strip()
    assert (tmp_path / "r.svg").read_text().startswith("<svg")
    assert json.loads((tmp_path / "plan.json").read_text()) == report["plan"]


def test_prune_takes_a_model_proto(tmp_path):
    cli(CLIP, tmp_path / "cli.onnx", "--calib", CALIB, "--keep-params", "0.6", "--mode", "units")
    model = onnx.load(str(CLIP))
    report = onnx_idprune.prune(model, tmp_path / "py.onnx", calib=CALIB, keep_params=0.6,
                                mode="units", report=tmp_path / "r.json")
    assert (tmp_path / "py.onnx").read_bytes() == (tmp_path / "cli.onnx").read_bytes()
    assert report["plan"]["blocks"]
    # The report names the model as given, not the temporary copy.
    assert report["input"] == "<ModelProto>"
    assert json.loads((tmp_path / "r.json").read_text())["input"] == "<ModelProto>"


def test_a_model_proto_that_cannot_be_written_is_one_error(tmp_path):
    model = onnx.load(str(CLIP))
    model.graph.initializer[0].data_location = onnx.TensorProto.EXTERNAL
    with pytest.raises(onnx_idprune.Error) as raised:
        onnx_idprune.inspect(model)
    assert raised.value.code == 1 and "external" in raised.value.message
    # A message about the model names it as given.
    with pytest.raises(onnx_idprune.Error) as raised:
        onnx_idprune.inspect(onnx.ModelProto())
    assert raised.value.message.startswith("<ModelProto>"), raised.value.message
    with pytest.raises(onnx_idprune.Error) as raised:
        onnx_idprune.inspect(model.graph)
    assert "ModelProto" in raised.value.message


def test_paths_are_paths_whatever_they_look_like(tmp_path, monkeypatch):
    # Relative paths that look like flags or subcommands, and bytes paths.
    monkeypatch.chdir(tmp_path)
    shutil.copy(CLIP, tmp_path / "-model.onnx")
    shutil.copy(CLIP, tmp_path / "help")
    expected = onnx_idprune.inspect(CLIP)
    assert onnx_idprune.inspect("-model.onnx") == expected
    assert onnx_idprune.inspect(b"help") == expected
    onnx_idprune.prune("help", "-out.onnx", calib=os.fsencode(CALIB), keep_params=0.7,
                       mode="blocks", plan_out=b"--plan.json")
    assert (tmp_path / "-out.onnx").exists() and (tmp_path / "--plan.json").exists()
    # A value starting with "-" is a value the parser judges.
    with pytest.raises(onnx_idprune.Error) as raised:
        onnx_idprune.intrinsic_dimension(np.zeros((10, 3), np.float32), estimator="mle", k=-1)
    assert raised.value.code == 2 and "invalid value '-1'" in raised.value.message


def test_errors_survive_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(onnx_idprune.Error("bad input", 1)))
    assert (error.message, error.code, str(error)) == ("bad input", 1, "bad input")


def test_prune_fails_like_the_command(tmp_path):
    # An output that is the input: refused before any work, input unchanged.
    before = CLIP.read_bytes()
    code, message = cli_failure(CLIP, CLIP, "--calib", CALIB, "--keep-params", "0.5")
    with pytest.raises(onnx_idprune.Error) as raised:
        onnx_idprune.prune(CLIP, CLIP, calib=CALIB, keep_params=0.5)
    assert (raised.value.code, raised.value.message) == (code, message)
    assert CLIP.read_bytes() == before
    # A value the parser refuses: exit code 2, the reason on one line.
    code, line = cli_failure(CLIP, tmp_path / "o.onnx", "--calib", CALIB, "--keep-params", "1.5")
    with pytest.raises(onnx_idprune.Error) as raised:
        onnx_idprune.prune(CLIP, tmp_path / "o.onnx", calib=CALIB, keep_params=1.5)
    assert raised.value.code == code == 2
    assert line == "error: " + raised.value.message
    # Flags that do not go together: exit code 1, the command's sentence.
    code, message = cli_failure(CLIP, tmp_path / "o.onnx", "--calib", CALIB,
                                "--keep-params", "0.5", "--mode", "unstructured",
                                "--repair", "lsq")
    with pytest.raises(onnx_idprune.Error) as raised:
        onnx_idprune.prune(CLIP, tmp_path / "o.onnx", calib=CALIB, keep_params=0.5,
                           mode="unstructured", repair="lsq")
    assert (raised.value.code, raised.value.message) == (code, message)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_onnx_runtime_is_one_error(tmp_path):
    with pytest.raises(onnx_idprune.Error) as raised:
        onnx_idprune.prune(CLIP, tmp_path / "o.onnx", calib=CALIB, keep_params=0.5,
                           ort_lib=tmp_path / "libonnxruntime.so")
    assert raised.value.code == 1
    assert "ONNX Runtime library not found" in raised.value.message
    assert list(tmp_path.iterdir()) == []


def test_apply_plan_gives_the_commands_model(tmp_path):
    report = onnx_idprune.prune(CLIP, tmp_path / "decided.onnx", calib=CALIB, keep_params=0.5,
                                plan_out=tmp_path / "plan.json")
    # The plan records a least-squares repair: applying it reads the data again.
    assert report["plan"].get("repair")
    cli(CLIP, tmp_path / "cli.onnx", "--plan", tmp_path / "plan.json", "--calib", CALIB)
    from_dict = onnx_idprune.apply_plan(CLIP, tmp_path / "dict.onnx", report["plan"], calib=CALIB)
    from_file = onnx_idprune.apply_plan(CLIP, tmp_path / "file.onnx", tmp_path / "plan.json",
                                        calib=CALIB)
    expected = (tmp_path / "cli.onnx").read_bytes()
    assert (tmp_path / "dict.onnx").read_bytes() == expected
    assert (tmp_path / "file.onnx").read_bytes() == expected
    assert expected == (tmp_path / "decided.onnx").read_bytes()
    assert from_dict["plan"] == from_file["plan"] == report["plan"]


def test_apply_plan_refuses_a_bad_plan(tmp_path):
    plan = onnx_idprune.prune(CLIP, tmp_path / "decided.onnx", calib=CALIB, keep_params=0.5,
                              mode="blocks", repair="none")["plan"]
    bad = json.loads(json.dumps(plan))
    bad["blocks"][0]["index"] = 99
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    code, message = cli_failure(CLIP, tmp_path / "cli.onnx", "--plan", tmp_path / "bad.json")
    with pytest.raises(onnx_idprune.Error) as raised:
        onnx_idprune.apply_plan(CLIP, tmp_path / "py.onnx", bad)
    assert (raised.value.code, raised.value.message) == (code, message)
    # Not a plan at all: the parser's reason, nothing written.
    with pytest.raises(onnx_idprune.Error) as raised:
        onnx_idprune.apply_plan(CLIP, tmp_path / "py.onnx", {"format": "something else"})
    assert raised.value.code == 1 and "given in memory" in raised.value.message
    assert not (tmp_path / "py.onnx").exists() and not (tmp_path / "cli.onnx").exists()


@pytest.mark.parametrize("model", [CLIP, BLIP])
def test_inspect_gives_the_commands_json(model):
    expected = json.loads(cli("inspect", model, "--json").stdout)
    assert onnx_idprune.inspect(model) == expected
    assert onnx_idprune.inspect(str(model)) == expected
    assert onnx_idprune.inspect(onnx.load(str(model))) == expected
    assert [t["name"] for t in expected["towers"]]


def test_inspect_fails_like_the_command(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    code, message = cli_failure("inspect", junk, "--json")
    with pytest.raises(onnx_idprune.Error) as raised:
        onnx_idprune.inspect(junk)
    assert (raised.value.code, raised.value.message) == (code, message)
    with pytest.raises(onnx_idprune.Error) as raised:
        onnx_idprune.inspect(42)
    assert raised.value.code == 1 and "ModelProto" in raised.value.message
    assert junk.read_bytes() == b"not a model"


@pytest.mark.parametrize("options", [{}, {"variant": "paper"}, {"estimator": "mle", "k": 10}])
def test_intrinsic_dimension_gives_the_commands_estimate(tmp_path, options):
    rng = np.random.default_rng(7)
    basis = rng.standard_normal((5, 40))
    data = (rng.standard_normal((600, 5)) @ basis).astype(np.float32)
    np.save(tmp_path / "x.npy", data)
    flags = [a for name, value in options.items() for a in (f"--{name}", str(value))]
    expected = json.loads(cli("id", "--data", tmp_path / "x.npy", "--json", *flags).stdout)
    got = onnx_idprune.intrinsic_dimension(data, **options)
    assert got == expected
    assert 3.5 < got["id"] < 6.5
    # A strided view of the same values gives the same estimate.
    wide = np.zeros((600, 80), dtype=np.float32)
    wide[:, ::2] = data
    assert onnx_idprune.intrinsic_dimension(wide[:, ::2], **options) == expected
    # float64 is rounded to float32, as the .npy reader does.
    np.save(tmp_path / "x64.npy", data.astype(np.float64) + 1e-12)
    expected64 = json.loads(cli("id", "--data", tmp_path / "x64.npy", "--json", *flags).stdout)
    assert onnx_idprune.intrinsic_dimension(data.astype(np.float64) + 1e-12, **options) == expected64
    # Either byte order, as the .npy reader takes.
    assert onnx_idprune.intrinsic_dimension(data.astype(">f4"), **options) == expected


def test_intrinsic_dimension_refuses_what_is_not_a_matrix(tmp_path):
    with pytest.raises(onnx_idprune.Error) as raised:
        onnx_idprune.intrinsic_dimension(np.zeros(10, dtype=np.float32))
    assert raised.value.code == 1 and "2-D" in raised.value.message
    with pytest.raises(onnx_idprune.Error) as raised:
        onnx_idprune.intrinsic_dimension([[1.0, 2.0]])
    assert raised.value.code == 1 and "list" in raised.value.message
    # Too few samples: the estimator's reason, as for the same .npy.
    few = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.save(tmp_path / "few.npy", few)
    code, message = cli_failure("id", "--data", tmp_path / "few.npy", "--json")
    with pytest.raises(onnx_idprune.Error) as raised:
        onnx_idprune.intrinsic_dimension(few)
    assert raised.value.code == code
    assert message.endswith(raised.value.message.removeprefix("the array: "))
    # A value the parser refuses.
    with pytest.raises(onnx_idprune.Error) as raised:
        onnx_idprune.intrinsic_dimension(few, estimator="pca")
    assert raised.value.code == 2 and "pca" in raised.value.message


def test_the_command_is_installed_and_runs_without_orts_path(tmp_path):
    env = dict(os.environ)
    env.pop("ORT_DYLIB_PATH", None)
    command = shutil.which("onnx-idprune", path=str(Path(sys.executable).parent))
    done = subprocess.run([command, CLIP, tmp_path / "o.onnx", "--calib", CALIB,
                           "--keep-params", "0.7", "--mode", "blocks"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("onnx-idprune: wrote ")
    # Not a terminal: no progress bar drawn.
    assert done.stderr.count("\n") == 1
    assert onnx.load(str(tmp_path / "o.onnx")).graph.node


PROGRESS = """
import sys, onnx_idprune
onnx_idprune.prune(sys.argv[1], sys.argv[3], calib=sys.argv[2], keep_params=0.7, mode="blocks",
                   progress=sys.argv[4] == "on")
"""


def on_a_terminal(command: list) -> bytes:
    """What `command` writes to its stderr when that is a terminal."""
    import pty

    primary, secondary = pty.openpty()
    done = subprocess.Popen([str(c) for c in command], stderr=secondary,
                            stdout=subprocess.DEVNULL)
    os.close(secondary)
    out = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the terminal closes with the process
            break
        if not chunk:
            break
        out += chunk
    assert done.wait() == 0, out
    os.close(primary)
    return out


def test_progress_is_drawn_on_a_terminal_only_when_asked(tmp_path):
    bar = "calibration".encode()
    run = [sys.executable, "-c", PROGRESS, CLIP, CALIB]
    assert bar in on_a_terminal(run + [tmp_path / "on.onnx", "on"])
    assert bar not in on_a_terminal(run + [tmp_path / "off.onnx", "off"])
    command = shutil.which("onnx-idprune", path=str(Path(sys.executable).parent))
    assert bar in on_a_terminal([command, CLIP, tmp_path / "cmd.onnx", "--calib", CALIB,
                                 "--keep-params", "0.7", "--mode", "blocks"])
