"""Our ONNX Runtime custom-op library (ort_ops/): operators `sdxl-trt optimize --custom-ops` puts into the GPU files in
place of ONNX Runtime's own where ours are faster, built from source where the engine directory is made.

Today one operator, `sdxl_trt.BiasSplitGelu` (the UNet's GEGLU: 70 per SDXL step, each a 42-84 MB pass over memory),
with a kernel for the CUDA provider (ort_ops/bias_split_gelu.cu) and one for the CPU provider (the reference the
CPU tests hold it to). The library is one shared object, compiled with nvcc (its CUDA runtime linked statically, for
the architectures in CUDA_ARCHS plus PTX for newer GPUs) or, without CUDA, with the C++ compiler (CPU kernels only).
It needs ONNX Runtime's C API header: `$SDXL_TRT_ORT_INCLUDE` (an ONNX Runtime release's `include` folder), else the
header of Debian's libonnxruntime-dev package, which `python -m sdxl_trt.kernels.ort_ops fetch-headers` downloads into
our cache (checked against its sha256). The library asks ONNX Runtime for API version 21 (1.21), which every newer
release serves.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from ..runtime.errors import UserError
from ..runtime.fileio import atomic_file, cache_dir

DOMAIN = "sdxl_trt"
OPS = ("BiasSplitGelu",)  # what the library implements in DOMAIN (opset 1)
SOURCE_DIR = Path(__file__).with_name("ort_ops")
SOURCES = ("ops.cc", "bias_split_gelu.cu")
CUDA_ARCHS = ("80", "86", "89", "90")  # Ampere, Ada, Hopper as machine code; PTX of the last for newer GPUs
HEADER = "onnxruntime_c_api.h"
INCLUDE_ENV = "SDXL_TRT_ORT_INCLUDE"
OPS_DIR = "ops"  # an engine directory's folder for the library (`optimize --custom-ops` builds it there)
MIN_COMPUTE_CAPABILITY = (8, 0)  # the oldest GPU CUDA_ARCHS has machine code for (sm_80 code runs on 8.6 / 8.7 / 8.9)
# Debian's libonnxruntime-dev (trixie): ONNX Runtime 1.21's headers, MIT licensed; a package registry, not a model hub.
# Tried in order: the pool (until trixie's onnxruntime is updated), then the same file by its sha1 on Debian's snapshot
# archive (kept for good); the sha256 is checked whichever answers
HEADERS_URLS = ("http://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb",
                "https://snapshot.debian.org/file/24211608c53cf623c58ab2b2f9d4157ed06b3a76")
HEADERS_SHA256 = "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08"
HEADERS_VERSION = "1.21.0"
HEADERS_SUMS = "SHA256SUMS"  # written beside the unpacked headers: a damaged cache is fetched again, never built from
OPS_API_VERSION = 21  # the ONNX Runtime C API version the library asks for (ops.cc kApiVersion): 1.21 and newer
COMPILE_TIMEOUT_S = 600


def include_dir(required: bool = True) -> Path | None:
    """The folder holding onnxruntime_c_api.h: $SDXL_TRT_ORT_INCLUDE, else the fetched Debian headers."""
    named = os.environ.get(INCLUDE_ENV)
    if named:
        path = Path(named)
        if not (path / HEADER).is_file():
            raise UserError(f"${INCLUDE_ENV}={named}: no {HEADER} there (name the `include` folder of an ONNX Runtime "
                            f"release)")
        return path
    fetched = _fetched_dir()
    if (fetched / HEADER).is_file():
        damaged = _damaged_headers(fetched)
        if damaged:
            raise UserError(f"{fetched}: the cached headers are not as they were fetched ({damaged} changed or "
                            f"missing); fetch them again: `python -m sdxl_trt.kernels.ort_ops fetch-headers`")
        return fetched
    if required:
        raise UserError(f"the custom operators are built against ONNX Runtime's C API header ({HEADER}), which is not "
                        f"here: set ${INCLUDE_ENV} to an ONNX Runtime release's `include` folder, or run "
                        f"`python -m sdxl_trt.kernels.ort_ops fetch-headers` (Debian's libonnxruntime-dev "
                        f"{HEADERS_VERSION}, 85 kB)")
    return None


def _fetched_dir() -> Path:
    return cache_dir("ort-include", create=False) / HEADERS_VERSION


def _damaged_headers(folder: Path) -> str | None:
    """The first header in `folder` that differs from what was unpacked there (SHA256SUMS), or the sums file itself
    when it is missing or unreadable; None when all are as fetched."""
    try:
        lines = (folder / HEADERS_SUMS).read_text().splitlines()
        sums = dict(reversed(line.split("  ", 1)) for line in lines if line)
    except (OSError, ValueError):
        return HEADERS_SUMS
    for name, digest in sums.items():
        try:
            if hashlib.sha256((folder / name).read_bytes()).hexdigest() != digest:
                return name
        except OSError:
            return name
    return None if HEADER in sums else HEADERS_SUMS


def _download(timeout: float) -> bytes:
    """The package from the first of HEADERS_URLS that serves it whole, with the expected sha256."""
    import http.client
    import urllib.request

    failures = []
    for url in HEADERS_URLS:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                data = response.read()
        except (OSError, http.client.HTTPException) as e:  # no network, a 404, a cut transfer
            failures.append(f"{url}: {getattr(e, 'reason', None) or e}")
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest == HEADERS_SHA256:
            return data
        failures.append(f"{url}: not the package expected (sha256 {digest}, expected {HEADERS_SHA256})")
    raise UserError("could not download ONNX Runtime's headers (" + "; ".join(failures) + ")")


def fetch_headers(timeout: float = 60.0) -> Path:
    """Download Debian's libonnxruntime-dev, check its sha256 and unpack its headers into our cache (with their
    sha256 sums); returns the folder. Nothing else of the package is kept. Headers already there are kept if they
    are as fetched, else fetched again."""
    import io
    import tarfile
    import tempfile

    dest = _fetched_dir()
    if (dest / HEADER).is_file() and _damaged_headers(dest) is None:
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{HEADERS_VERSION}-", dir=dest.parent))
    except OSError as e:  # a read-only cache, a file in the way
        raise UserError(f"cannot write the header cache {dest.parent}: {e.strerror or e}") from None
    try:
        data = _download(timeout)
        members = _ar_members(data)
        payload = next((v for k, v in members.items() if k.startswith("data.tar")), None)
        if payload is None:
            raise UserError("the downloaded package has no data archive")
        sums = []
        with tarfile.open(fileobj=io.BytesIO(payload)) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if member.isfile() and "include" in parts and member.name.endswith(".h"):
                    relative = Path(*parts[parts.index("include") + 2:])  # below usr/include/onnxruntime/
                    target = tmp / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    content = tar.extractfile(member).read()
                    target.write_bytes(content)
                    sums.append(f"{hashlib.sha256(content).hexdigest()}  {relative.as_posix()}")
        if not (tmp / HEADER).is_file():
            raise UserError(f"the downloaded package has no {HEADER}")
        (tmp / HEADERS_SUMS).write_text("\n".join(sums) + "\n")
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the headers from other users of a shared cache
        if dest.exists() and _damaged_headers(dest) is not None:
            shutil.rmtree(dest, ignore_errors=True)  # damaged (or of an older sdxl-trt, without sums): replaced
        try:
            os.replace(tmp, dest)
        except OSError:  # another fetch finished first (or something of that name is in the way)
            if not (dest / HEADER).is_file() or _damaged_headers(dest) is not None:
                raise UserError(f"{dest} is in the way of the headers: remove it and fetch again") from None
    except (OSError, tarfile.TarError) as e:
        raise UserError(f"could not unpack ONNX Runtime's headers into {dest.parent}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _ar_members(data: bytes) -> dict[str, bytes]:
    """The members of a .deb (an `ar` archive): name → bytes."""
    if not data.startswith(b"!<arch>\n"):
        raise UserError("the downloaded package is not a Debian archive")
    members, at = {}, 8
    while at + 60 <= len(data):
        header = data[at:at + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        members[name] = data[at + 60:at + 60 + size]
        at += 60 + size + (size % 2)
    return members


def _nvcc() -> list[str] | None:
    """nvcc of $CUDA_HOME (or $CUDA_PATH) when set, else the one on PATH; None when there is none."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(variable)
        if home:
            nvcc = Path(home) / "bin" / "nvcc"
            if not nvcc.is_file():
                raise UserError(f"${variable}={home}: no bin/nvcc there (name the CUDA toolkit's folder, or unset it "
                                "to use the nvcc on PATH)")
            return [str(nvcc)]
    found = shutil.which("nvcc")
    return [found] if found else None


def _cxx() -> list[str] | None:
    """$CXX (a command line: `ccache g++` too), else c++ or g++ on PATH."""
    named = os.environ.get("CXX", "").strip()
    if named:
        try:
            words = shlex.split(named)
        except ValueError as e:  # an unbalanced quote
            raise UserError(f"$CXX={named!r}: {e} (expected a compiler command, e.g. `g++` or `ccache g++`)") from None
        if words and words[0]:
            return words
    found = shutil.which("c++") or shutil.which("g++")
    return [found] if found else None


def gpu_problem(compute_capability: str | tuple[int, int]) -> str | None:
    """Why the CUDA kernels cannot run on a GPU of this compute capability ("7.5" or (7, 5)), or None if they can."""
    major, minor = (map(int, compute_capability.split(".")) if isinstance(compute_capability, str)
                    else compute_capability)
    if (major, minor) < MIN_COMPUTE_CAPABILITY:
        oldest = ".".join(map(str, MIN_COMPUTE_CAPABILITY))
        return (f"sdxl-trt's custom operators have CUDA kernels for GPUs of sm {oldest} and newer; this GPU is "
                f"sm {major}.{minor}")
    return None


def library_key(cuda: bool) -> str:
    """The hash of what makes a library: the sources, the architectures, CUDA or not (names the built file)."""
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update(name.encode() + b"\0" + (SOURCE_DIR / name).read_bytes() + b"\0")
    digest.update(f"cuda={cuda} archs={','.join(CUDA_ARCHS)}".encode())
    return digest.hexdigest()[:16]


def library_name(cuda: bool = True) -> str:
    return f"libsdxl_trt_ops-{'cuda' if cuda else 'cpu'}-{library_key(cuda)}.so"


def library_path(cuda: bool = True) -> str:
    """Where this installation's library goes in an engine directory (relative to it, as the manifest names it)."""
    return f"{OPS_DIR}/{library_name(cuda)}"


def build(dest_dir: str | Path, cuda: bool = True, quiet: bool = False) -> Path:
    """Compile the library into `dest_dir` (named by library_name; kept if already there) and check it loads;
    returns its path. `cuda`: with the CUDA kernels (needs nvcc), else the CPU kernels only (a C++ compiler)."""
    dest = Path(dest_dir) / library_name(cuda)
    if dest.is_file():
        try:
            check(dest, cuda)
            return dest
        except UserError:  # truncated, overwritten, or not loadable here: build it again
            dest.unlink()
    include = include_dir()
    compiler = _nvcc() if cuda else _cxx()
    if compiler is None:
        raise UserError("building the CUDA custom operators needs nvcc (the CUDA toolkit; set CUDA_HOME or put nvcc "
                        "on PATH)" if cuda else "building the custom operators needs a C++ compiler (set CXX)")
    name = Path(compiler[0]).name
    sources = [str(SOURCE_DIR / "ops.cc")]
    if cuda:
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]
        gencode.append(f"-gencode=arch=compute_{CUDA_ARCHS[-1]},code=compute_{CUDA_ARCHS[-1]}")
        sources.append(str(SOURCE_DIR / "bias_split_gelu.cu"))
        flags = ["-O3", "-std=c++17", "-shared", "-DSDXL_TRT_CUDA", "-Xcompiler=-fPIC,-fvisibility=hidden",
                 "-cudart=static", *gencode]
    else:
        flags = ["-O2", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden"]
    made = Path(dest_dir).absolute()  # the outermost folder this build makes (removed again if it fails)
    while not made.parent.exists():
        made = made.parent
    made = None if made.exists() else made
    try:
        Path(dest_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, no permission, …
        raise UserError(f"cannot make the folder {dest_dir} for the custom-op library: {e.strerror or e}") from None
    if not quiet:
        print(f"building {dest.name} with {name} …", file=sys.stderr, flush=True)
    try:
        with atomic_file(dest) as tmp:
            command = [*compiler, *flags, f"-I{include}", *sources, "-o", str(tmp)]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise UserError(f"building {dest.name}: {name} took over {COMPILE_TIMEOUT_S} s") from None
            except OSError as e:  # $CXX or $CUDA_HOME naming something that does not run
                raise UserError(f"building {dest.name}: cannot run {compiler[0]}: {e.strerror or e}") from None
            if done.returncode != 0:
                log = (done.stderr or done.stdout).strip().splitlines()
                first = next((line.strip() for line in log if "error" in line.lower()), log[-1] if log else "no output")
                raise UserError(f"building {dest.name} failed ({name} exit {done.returncode}): {first}")
            check(tmp, cuda)
    except BaseException:
        if made is not None:  # the folders this build made stay only with a library in them
            folder = Path(dest_dir).absolute()
            while True:
                with contextlib.suppress(OSError):
                    folder.rmdir()
                if folder == made or folder == folder.parent:
                    break
                folder = folder.parent
        raise
    return dest


def check(path: str | Path, cuda: bool | None = None) -> None:
    """The library at `path` loads and is the kind asked for (`cuda` True: has the CUDA kernels). Loaded in a child
    process: a damaged shared object can kill the process that maps it (a truncated one: SIGBUS)."""
    probe = ("import ctypes, sys; library = ctypes.CDLL(sys.argv[1]); library.RegisterCustomOps; "
             "print(int(library.sdxl_trt_ops_has_cuda()))")
    try:
        done = subprocess.run([sys.executable, "-c", probe, str(Path(path).resolve())], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"{path}: could not check the custom-op library ({e})") from None
    if done.returncode != 0 or done.stdout.strip() not in ("0", "1"):
        why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        raise UserError(f"{path}: not a custom-op library of sdxl-trt that loads here ({why[:200]})")
    has_cuda = done.stdout.strip() == "1"
    if cuda is not None and has_cuda != cuda:
        raise UserError(f"{path}: built {'with' if has_cuda else 'without'} the CUDA kernels, "
                        f"expected {'with' if cuda else 'without'}")


def bias_split_gelu_model(domain: str = DOMAIN, fp16: bool = True) -> bytes:
    """A one-node model: BiasSplitGelu of `domain` (ours, or ONNX Runtime's "com.microsoft") on x [B, S, W] and
    bias [W], in fp16 or fp32 (the tests and benchmarks/bias_split_gelu.py run one operator against the other)."""
    from onnx import TensorProto, helper

    elem = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    node = helper.make_node("BiasSplitGelu", ["x", "bias"], ["y"], domain=domain)
    graph = helper.make_graph([node], "bias_split_gelu", [helper.make_tensor_value_info("x", elem, ["B", "S", "W"]),
                                                          helper.make_tensor_value_info("bias", elem, ["W"])],
                              [helper.make_tensor_value_info("y", elem, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)],
                             ir_version=10).SerializeToString()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sdxl_trt.kernels.ort_ops",
                                     description="ONNX Runtime custom operators of sdxl-trt: headers and builds")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch-headers", help=f"download ONNX Runtime's C API headers (Debian's libonnxruntime-dev "
                                         f"{HEADERS_VERSION}) into the cache")
    built = sub.add_parser("build", help="compile the library into a folder")
    built.add_argument("out", help="the folder to write it to")
    built.add_argument("--cpu", action="store_true", help="CPU kernels only (no nvcc needed)")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch-headers":
            print(fetch_headers())
        else:
            print(build(args.out, cuda=not args.cpu))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path of the user's (a name too long, …): one line, as the sdxl-trt commands say it
        print(f"error: {e.filename or args.command}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
