"""What happens around the work of every command: Ctrl-C and SIGTERM (every long command stops within seconds with
exit 130, serve drains and exits 0), output locations that cannot be written (read-only, full: one line and exit 2,
before the work where it can be known, nothing lost or half-written), a reader that closes our stdout early (quiet),
and generate's seeds and prompts (issue 21: items 1, 2, 6, 7, 10, 12 and the quiet set-up)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from sdxl_trt.runtime.cli import main
from sdxl_trt.runtime.errors import UserError
from sdxl_trt.runtime.manifest import load_manifest

CLI = [sys.executable, "-m", "sdxl_trt.runtime.cli"]
MAX_SEED = 2**64 - 1


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """tiny:base exported (fp32 + fp16, no refiner): what the long commands work on."""
    from sdxl_trt.export.engine_dir import export_engine_dir

    out = tmp_path_factory.mktemp("lifecycle") / "tiny"
    export_engine_dir("tiny:base", out, progress=False)
    return out


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix != ".lock"} if root.exists() else {}


def leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob(".tmp-*")]


def consistent(root: Path) -> None:
    """Every file the manifest names is whole (size and sha256), and every ONNX file or engine is named by it."""
    manifest = load_manifest(root)
    manifest.check_files()
    named = set(manifest.data["files"]) | set(manifest.data.get("engines", {}))
    stray = [p.relative_to(root).as_posix() for sub in ("onnx", "engines") for p in (root / sub).rglob("*")
             if p.is_file() and p.suffix in (".onnx", ".data", ".engine")]
    assert set(stray) <= named, f"files the manifest does not name: {set(stray) - named}"


def one_error_line(err: str, says: str) -> None:
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert len(lines) == 1 and says in lines[0], err


# -- signals × long commands ------------------------------------------------------------------------------------------

class Child:
    """A CLI command in a child process whose stderr is collected as it comes (progress bars say where it is)."""

    def __init__(self, argv, cwd=None):
        self.process = subprocess.Popen(CLI + [str(a) for a in argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        cwd=cwd)
        self.err = b""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for chunk in iter(lambda: self.process.stderr.read1(4096), b""):
            self.err += chunk

    def wait_for(self, marker: bytes, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while marker not in self.err:
            assert self.process.poll() is None, f"exited {self.process.returncode} before {marker!r}: {self.err!r}"
            assert time.monotonic() < deadline, f"no {marker!r} in {timeout} s"
            time.sleep(0.05)

    def stop(self, sig: int, timeout: float = 60) -> tuple[int, float, str]:
        sent = time.monotonic()
        self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
        self.reader.join(10)
        return code, time.monotonic() - sent, self.err.decode(errors="replace")


def _long_command(name: str, engine: Path, tmp: Path) -> tuple[list, bytes, float, Path]:
    """(argv, the stderr text that says the work has started, seconds to wait after it, the folder it writes)."""
    if name == "export":
        return ["export", "--model", "tiny:base", "--out", tmp / "out"], b"export unet", 0.5, tmp
    if name == "refit":
        return ["refit", engine, "--model", "tiny:base", "--out", tmp / "out"], b"refit ", 0.3, tmp
    if name == "bench":
        return (["bench", engine, "--sweeps", "steps", "--size", "64x64", "--runs", "1000", "--warmup", "0", "--out",
                 tmp / "bench.json"], b"", 6.0, tmp)
    copy = tmp / "engine"
    shutil.copytree(engine, copy)
    if name == "optimize":
        return ["optimize", copy, "--jobs", "2"], b"fusion", 1.0, copy
    if name == "build":
        pytest.importorskip("tensorrt_rtx")
        return (["build", copy, "--backend", "tensorrt-rtx", "--components", "unet", "--profiles", "256x256"],
                b"Building engine", 1.0, copy)
    raise AssertionError(name)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("command", ["export", "optimize", "build", "refit", "bench"])
def test_every_long_command_stops_on_a_signal_with_130_and_leaves_nothing_half_written(engine, tmp_path, command,
                                                                                          sig):
    """Item 1: `build` ran on (TensorRT's builder is native code, and its progress callback swallowed the
    KeyboardInterrupt) and exited 0. Now every long command stops within seconds."""
    argv, started, delay, written = _long_command(command, engine, tmp_path)
    child = Child(argv)
    child.wait_for(started)
    time.sleep(delay)
    code, took, err = child.stop(sig)
    assert code == 130, err[-2000:]
    assert took < 10, f"took {took:.1f} s to stop"
    one_error_line(err, f"sdxl-trt {command}: interrupted")
    assert leftovers(tmp_path) == []
    if command in ("export", "refit"):
        assert not (tmp_path / "out").exists()
    elif command == "bench":  # what it measured so far, whole, or nothing
        assert not (tmp_path / "bench.json").exists() or json.loads((tmp_path / "bench.json").read_text())
    else:
        consistent(written)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_drains_and_exits_0_on_a_signal(engine, sig):
    pytest.importorskip("uvicorn")
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    child = Child(["serve", engine, "--port", port])
    deadline = time.monotonic() + 120
    while True:
        assert child.process.poll() is None and time.monotonic() < deadline, child.err
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.3)
    code, took, err = child.stop(sig)
    assert code == 0 and took < 10 and "Traceback" not in err, err


def test_a_build_stuck_in_native_code_is_left_behind_and_the_process_still_ends(monkeypatch):
    """A native call that ignores its cancel: the interrupt still comes back within the grace period."""
    from sdxl_trt.runtime import interrupts

    monkeypatch.setattr(interrupts, "GRACE_S", 0.2)
    release = threading.Event()
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
    t = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        interrupts.run_native(lambda: release.wait(30), cancel=lambda: None)
    assert time.monotonic() - t < 5 and interrupts.abandoned()
    release.set()
    interrupts._abandoned.clear()


# -- outputs that cannot be written ------------------------------------------------------------------------------------

def _mount(args: list[str], where: Path) -> None:
    try:
        done = subprocess.run(["mount", *args, str(where)], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no `mount` command here: the real read-only / full filesystem cases need one")
    if done.returncode != 0:
        pytest.skip(f"cannot mount here (needs root with CAP_SYS_ADMIN): {done.stderr.strip()}")


@pytest.fixture
def readonly(tmp_path, engine):
    """A read-only bind mount holding a copy of the engine directory."""
    d = tmp_path / "ro"
    shutil.copytree(engine, d / "engine")
    _mount(["--bind", "-o", "ro", str(d)], d)
    try:
        if os.access(d, os.W_OK):  # access() reports a read-only mount even for root
            pytest.skip("the bind mount did not become read-only here")
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)


@pytest.fixture
def full(tmp_path):
    """A tiny tmpfs, filled up."""
    d = tmp_path / "full"
    d.mkdir()
    _mount(["-t", "tmpfs", "-o", "size=128k", "tmpfs"], d)
    try:
        with open(d / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)


def _commands(engine: Path, place: Path, engine_copy: Path | None) -> list[tuple[str, list]]:
    cases = [
        ("generate", ["generate", engine, "a cat", "--size", "256x256", "--steps", "1", "--out", place / "x.png"]),
        ("demo", ["demo", "--out", place / "d.png", "--steps", "1", "--size", "256x256"]),
        ("export", ["export", "--model", "tiny:base", "--out", place / "e"]),
        ("refit", ["refit", engine, "--model", "tiny:base", "--out", place / "e"]),
        ("bench", ["bench", engine, "--sweeps", "steps", "--size", "64x64", "--runs", "1", "--warmup", "0", "--out",
                   place / "b.json"]),
    ]
    if engine_copy is not None:
        cases += [("optimize", ["optimize", engine_copy, "--components", "clip_l"]),
                  ("build", ["build", engine_copy, "--backend", "tensorrt-rtx", "--components", "clip_l",
                             "--profiles", "256x256"])]
    return cases


def _run_main(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "demo", "export", "refit", "bench", "optimize", "build"])
def test_a_read_only_output_is_one_line_before_the_work(engine, readonly, command, capsys):
    """Item 2 (read-only filesystem): said before the work starts, in one line, exit 2."""
    if command == "build":
        pytest.importorskip("tensorrt_rtx")
    argv = dict(_commands(engine, readonly, readonly / "engine"))[command]
    before = tree_digest(readonly)
    t = time.monotonic()
    code, err = _run_main(argv, capsys)
    assert code == 2, err
    one_error_line(err, "Read-only file system")
    assert tree_digest(readonly) == before
    if command in ("generate", "demo", "bench"):
        assert time.monotonic() - t < 20  # before the generation, not after it


@pytest.mark.parametrize("command", ["generate", "demo", "export", "refit", "bench"])
def test_a_full_filesystem_is_one_line_and_leaves_nothing(engine, full, command, capsys):
    """Item 2 (full disk): the room a PNG needs is checked before the work; a write that runs out of space is one
    line naming the path, and its temporary is removed."""
    argv = dict(_commands(engine, full, None))[command]
    code, err = _run_main(argv, capsys)
    assert code == 2, err
    # the result's size is known beforehand for generate, demo, refit (a copy of DIR) and each module of an export
    one_error_line(err, "No space left" if command == "bench" else "free, the result needs about")
    assert sorted(p.name for p in full.iterdir()) == ["filler"]


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS], ids=["ENOSPC", "EROFS"])
@pytest.mark.parametrize("command", ["generate", "generate-latent", "export", "optimize", "build"])
def test_a_failing_write_keeps_the_previous_version(engine, tmp_path, monkeypatch, capsys, command, error):
    """Item 2 at the write point itself (runs anywhere, no mount): the rename that would put the result in place
    fails as on a full or read-only disk. One line, exit 2, the previous output whole, no temporary left."""
    if command == "build":
        pytest.importorskip("tensorrt_rtx")
    copy = tmp_path / "engine"
    shutil.copytree(engine, copy)
    argv = {
        "generate": ["generate", engine, "a cat", "--size", "64x64", "--steps", "1", "--out", tmp_path / "x.png"],
        "generate-latent": ["generate", engine, "a cat", "--size", "64x64", "--steps", "1", "--output-type", "latent",
                            "--out", tmp_path / "x.npy"],
        "export": ["export", "--model", "tiny:base", "--out", tmp_path / "e", "--force"],
        "optimize": ["optimize", copy, "--components", "clip_l"],
        "build": ["build", copy, "--backend", "tensorrt-rtx", "--components", "clip_l", "--profiles", "256x256"],
    }[command]
    (tmp_path / "x.png").write_bytes(b"the previous image")
    (tmp_path / "x.npy").write_bytes(b"the previous latents")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "kept").write_text("the previous export")
    before = tree_digest(tmp_path)
    real = os.replace

    def replace(src, dst, **kw):
        if Path(dst).is_relative_to(tmp_path) and not Path(dst).name.endswith(".old"):
            raise OSError(error, os.strerror(error))
        return real(src, dst, **kw)

    monkeypatch.setattr(os, "replace", replace)
    code, err = _run_main(argv, capsys)
    monkeypatch.undo()
    assert code == 2, err
    one_error_line(err, os.strerror(error))
    assert tree_digest(tmp_path) == before
    assert leftovers(tmp_path) == []


def test_check_writable_says_what_and_where(tmp_path):
    from sdxl_trt.runtime.fileio import check_writable

    check_writable(tmp_path / "new" / "deeper" / "x.png", "--out x", 1)  # folders still to be made: their parent
    with pytest.raises(UserError, match=r"--out x: .* free, the result needs about 1\.0 GiB|the result needs"):
        check_writable(tmp_path / "x.png", "--out x", 2**62)
    assert leftovers(tmp_path) == []


# -- broken pipes ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["inspect", "{engine}", "--json"], ["inspect", "{engine}"],
                                  ["generate", "{engine}", "a cat", "--size", "64x64", "--steps", "1", "--seed", "1",
                                   "--out", "{tmp}/x.png"]], ids=["inspect --json", "inspect", "generate"])
def test_a_reader_that_closes_early_ends_quietly(engine, tmp_path, argv):
    """Item 6: `inspect --json | head -c 10` ended in a BrokenPipeError traceback."""
    child = subprocess.Popen(CLI + [a.format(engine=engine, tmp=tmp_path) for a in argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    child.stdout.close()  # the reader is gone before anything is printed
    err = child.stderr.read().decode()
    assert child.wait(120) == 141, err
    assert "Traceback" not in err and "Exception ignored" not in err and "Error" not in err, err


# -- seeds and prompts -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed, n, ok", [
    (0, 1, True), (MAX_SEED, 1, True), (MAX_SEED - 1, 2, True), (MAX_SEED - 3, 4, True),
    (MAX_SEED, 2, False), (MAX_SEED + 1, 1, False), (-1, 1, False),
])
def test_seed_bounds_are_the_readme_s(seed, n, ok):
    """Item 7: README says seeds run from 0 to 2^64 − 1; image i gets seed S+i, so S may go up to 2^64 − n."""
    from sdxl_trt.runtime.pipeline import image_seeds

    if ok:
        seeds = image_seeds(seed, n)
        assert seeds == list(range(seed, seed + n)) and seeds[-1] <= MAX_SEED
    else:
        with pytest.raises(UserError, match=f"from 0 to {MAX_SEED - (n - 1)}"):
            image_seeds(seed, n)


def test_the_largest_seed_generates(engine, tmp_path, capsys):
    out = tmp_path / "x.png"
    code, err = _run_main(["generate", engine, "a cat", "--size", "64x64", "--steps", "1", "--seed", str(MAX_SEED),
                           "--out", out], capsys)
    assert code == 0, err
    with Image.open(out) as image:
        assert json.loads(image.text["sdxl-trt"])["seed"] == MAX_SEED
    code, err = _run_main(["generate", engine, "a cat", "--size", "64x64", "--steps", "1", "--seed", str(MAX_SEED),
                           "--batch", "2", "--out", out], capsys)
    assert code == 2 and f"from 0 to {MAX_SEED - 1}" in err


def test_a_prompt_and_a_prompts_file_together_are_refused(engine, tmp_path, capsys):
    """Item 10: the positional PROMPT was dropped silently when --prompts was given."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog\na ship\n")
    code, err = _run_main(["generate", engine, "a cat", "--prompts", prompts, "--size", "64x64", "--steps", "1",
                           "--out", tmp_path / "x.png"], capsys)
    assert code == 2
    one_error_line(err, "give a PROMPT or --prompts FILE, not both")
    assert list(tmp_path.glob("*.png")) == []


def test_random_seeds_are_printed_whatever_the_output(engine, tmp_path, capsys):
    """Item 12: with --out the random seeds were not printed anywhere (help: "default: random, printed")."""
    out = tmp_path / "x.png"
    capsys.readouterr()
    assert main(["generate", str(engine), "a cat", "--size", "64x64", "--steps", "1", "--batch", "2",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    seeds = []
    for path in (tmp_path / "x-1.png", tmp_path / "x-2.png"):
        with Image.open(path) as image:
            seeds.append(json.loads(image.text["sdxl-trt"])["seed"])
    assert f"seeds {seeds[0]}-{seeds[1]} (random; --seed {seeds[0]} repeats it)" in printed, printed
    assert main(["generate", str(engine), "a cat", "--size", "64x64", "--steps", "1", "--seed", "3",
                 "--out", str(out)]) == 0
    assert "(random;" not in capsys.readouterr().out  # a seed given is not repeated back


# -- quiet set-up: the vocabulary read out of the downloaded wheel --------------------------------------------------

def test_the_vocabulary_is_read_from_the_downloaded_wheel(tmp_path, monkeypatch):
    """README's set-up downloads the open_clip_torch wheel instead of installing it without its dependencies (which
    left pip printing ERROR lines about them); the vocabulary is read out of the wheel, checked by its sha256."""
    import importlib.util

    from sdxl_trt.export import vocab

    data = vocab.bpe_bytes()
    assert hashlib.sha256(data).hexdigest() == vocab.BPE_SHA256
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "open_clip"
                        else real_find_spec(name, *a))
    monkeypatch.setattr(vocab, "WHEEL_DIR", tmp_path)
    vocab.bpe_bytes.cache_clear()
    try:
        with pytest.raises(UserError, match="pip download --no-deps open_clip_torch"):
            vocab.bpe_bytes()
        wheel = tmp_path / "open_clip_torch-3.3.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(f"open_clip/{vocab.BPE_FILE}", data)
        assert vocab.bpe_bytes() == data
        vocab.bpe_bytes.cache_clear()
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(f"open_clip/{vocab.BPE_FILE}", data[:-1])
        with pytest.raises(UserError, match="not OpenAI CLIP's"):
            vocab.bpe_bytes()
    finally:
        vocab.bpe_bytes.cache_clear()


def test_readme_set_up_installs_no_package_without_its_dependencies():
    """The README's two set-up commands (run by .ci/run) must not `pip install --no-deps` a package: pip then reports
    its unmet dependencies as ERROR lines at the next install."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = [readme.split(f"<!-- ci:{step} -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
              for step in ("demo", "test")]
    for block in blocks:
        assert "install -q --no-deps" not in block and "pip download -q --no-deps open_clip_torch" in block, block
