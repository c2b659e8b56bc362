"""Backend `ort-cuda`: ONNX Runtime's CUDA execution provider, run through IOBinding on device buffers that are sized
once per shape and reused, on one CUDA stream that ONNX Runtime computes on too (`user_compute_stream`), so copies,
runs and our kernels are ordered without host synchronisation. `run` takes and returns numpy arrays, like the CPU
backend.

Sessions: each file's weights are on the device once (weights.py) and every session of that file views them: the
any-shape session of each component and one session per resident shape — each bucket's (`buckets`) for the UNets and
the VAE, each batch's for the text encoders —, kept (resident.py) until a device-memory budget (`--max-device-memory`,
else the GPU's free memory at the start less a reserve) frees the least recently used.

Files: a component's GPU-optimized file (`sdxl-trt optimize DIR --target cuda`: fused attention, GroupNorm, NHWC
convolutions, fp16) where the engine directory has one, else its fp16 file, else fp32 (with TF32). UNets, text
encoders and the VAE on an optimized file run in the device loop (device_loop.py) on a session made for the shape
(free dimensions fixed, so ONNX Runtime folds the shape arithmetic that would otherwise need host copies) with ONNX
Runtime's CUDA graphs (`enable_cuda_graph`, a `gpu_graph_id` per shape). A VAE whose optimized fp16 file may
overflow (the SDXL 1.0 VAE: `overflow_check` in the manifest) is checked after every decode: NaN or Inf in the
image → a warning and the fp32 file from then on.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
from pathlib import Path

import numpy as np

from . import tensorrt_api
from .backends import (VAE_FP16_ADVICE, OrtSession, check_cuda_graphs, check_onnxruntime_install,
                       check_optimized_readable, context_file, non_finite, quiet_onnxruntime, session_file,
                       stale_optimized)
from .contracts import derived, output_shapes, shape_key, symbol_values
from .cuda import BufferPool, Stream, capturing, device_count, device_memory, on_device
from .errors import UserError
from .manifest import Manifest
from .weights import SharedWeights, WeightSet

log = logging.getLogger(__name__)
PLAIN_RUN = -1  # gpu_graph_id that runs without capturing or replaying a CUDA graph
# the order in which `prepare` uploads files: "unet-second" (the first text encoder's, then the UNets', then the
# rest: the UNet's warm run, the longest path to the loop, starts soonest while the prompts are still encoded), "stage"
# (the order a call runs them) or "size" (largest first). One-shot medians on the H100 with every session made while
# the weights go up (benchmarks/results/h100-cold-start-one-shot-e79b63a.json, 5 runs each): unet-second 4.23 s,
# stage 4.34 s, size 4.57 s
PREPARE_ORDER = "unet-second"


class OrtCudaBackend:
    name = "ort-cuda"

    def __init__(self, manifest: Manifest, stream: Stream | None = None, cuda_graphs: str = "step",
                 buckets=None, max_device_memory: float | None = None, conv_search: str | None = None,
                 devices=(0,)):
        """`cuda_graphs`: "step" (ONNX Runtime's CUDA graph of the UNet, replayed each step), "loop" (the whole
        denoising loop captured as one CUDA graph of our own: experimental, see device_loop.py) or "off".
        `buckets`: the pixel sizes (W, H) that get sessions of their own with CUDA graphs, kept resident (default:
        profiles.BUCKETS and the model's default size); other sizes run on each component's session for any shape.
        `max_device_memory` (GiB): least recently used sessions are freed to stay under it (resident.py); default:
        the GPU's free memory at the start less a reserve (resident.automatic_budget).
        `conv_search`: cuDNN's convolution algorithm search (CONV_SEARCH says why the default).
        `devices`: the GPU ids to run on; the first holds every model, each other one a backend of its own for the
        UNets (`partners`), and the denoising loop splits the guidance batch or the images across them
        (parallel_loop.py)."""
        check_onnxruntime_install()
        check_cuda_graphs(cuda_graphs)
        if tensorrt_api.gpu() is None:
            raise UserError("backend ort-cuda needs a CUDA GPU and none was found; ort-cpu runs without one")
        self.devices = check_devices(devices)
        # ONNX Runtime (0.2-0.3 s to import and load its CUDA libraries) loads on a thread of its own while the weights
        # are laid out and go up, which needs only CUDA; the first session waits for it (and raises its error)
        self._onnxruntime = load_onnxruntime()
        self.device_id = self.devices[0]
        with on_device(self.device_id):
            self._start(manifest, stream, cuda_graphs, buckets, max_device_memory, conv_search)
        self.partners = [OrtCudaBackend(manifest, cuda_graphs=cuda_graphs, buckets=buckets,
                                        max_device_memory=max_device_memory, conv_search=conv_search, devices=(d,))
                         for d in self.devices[1:]]

    def _start(self, manifest, stream, cuda_graphs, buckets, max_device_memory, conv_search) -> None:
        from .lora import Adapters
        from .resident import GIB, Resident, automatic_budget

        self.manifest = manifest
        self.adapters = Adapters()
        self.stream = stream or Stream()
        self.cuda_graphs = cuda_graphs
        self.conv_search = conv_search or CONV_SEARCH
        self.buckets = resident_sizes(manifest, buckets)
        self._weights: dict[tuple, SharedWeights | WeightSet] = {}  # (file, adapter set) → weights on the device
        self._loading: dict[tuple, threading.Lock] = {}  # weights being loaded, by the same key
        self._lock = threading.RLock()
        self._preparing: list = []  # futures of the last prepare
        self._scheduled: dict = {}  # file → the future of prepare's loader that uploads its weights
        self._loader = threading.local()  # `active` on prepare's loader thread
        self._overflowed: set[str] = set()  # VAEs whose fp16 file overflowed: fp32 from then on
        self._contexts: dict = {}  # UNet → its ContextSession (context_stage.py), or None for a file without one
        check_optimized_readable(manifest)
        stale = stale_optimized(manifest)
        if stale:
            log.warning("%s: the optimized files of %s were made by an older `sdxl-trt optimize`; they run, but "
                        "`sdxl-trt optimize %s` again makes faster ones", manifest.root, ", ".join(stale), manifest.root)
        self._baseline, total = device_memory()  # other processes' memory (and none of ours yet)
        automatic = max_device_memory is None
        self.resident = Resident(used=self._memory_used, evict=self._evicted, automatic=automatic,
                                 budget=automatic_budget(self._baseline, total) if automatic
                                 else int(max_device_memory * GIB))
        self._loop = None

    @property
    def device_loop(self):
        """The denoising loop on the device (device_loop.py), or across `devices` (parallel_loop.py), created on
        first use."""
        if self._loop is None:
            from .device_loop import DeviceLoop

            with on_device(self.device_id):
                self._loop = DeviceLoop(self)
            if self.partners:
                from .parallel_loop import ParallelLoop

                self._loop = ParallelLoop(self._loop, [partner.device_loop for partner in self.partners])
        return self._loop

    def _memory_used(self) -> int:
        with on_device(self.device_id):
            return device_memory()[0] - self._baseline

    def session(self, component: str):
        """The component's session for any shape (plain runs), on the weights its other sessions share."""
        entry = self._entry(component)
        if session_file(entry)[0] == "cuda" and entry["optimized"]["cuda"].get("overflow_check"):
            make = functools.partial(self._make, component)
            return self._kept((component, None), lambda: CheckedSession(component, make,
                                                                        functools.partial(make, file="fp32")))
        return self._kept((component, None), lambda: self._make(component))

    def loop_session(self, component: str, input_shapes: dict[str, tuple[int, ...]]):
        """The session the device loop runs `component` (a UNet, a text encoder, the VAE) with at these input shapes:
        with CUDA graphs on, an optimized file and a resident size (a bucket; the text encoders' shapes always), a
        session made for exactly this shape (ONNX Runtime then folds the shape arithmetic that would otherwise run on
        the host, which CUDA graphs require), kept resident; otherwise the component's session for any shape."""
        return self.shape_session(component, symbol_values(self._entry(component), input_shapes))

    def shape_session(self, component: str, dims: dict[str, int]):
        """loop_session by the contract's symbolic dimensions (B, S, h, w) instead of input shapes."""
        entry = self._entry(component)
        if self.cuda_graphs == "off" or session_file(entry)[0] != "cuda" or component in self._overflowed:
            return self.session(component)
        scale = self.manifest.data["model"]["vae_scale_factor"]
        if "h" in dims and "w" in dims and (dims["w"] * scale, dims["h"] * scale) not in self.buckets:
            return self.session(component)
        return self._kept(shape_key(component, dims), lambda: self._make(component, cuda_graph=True, dims=dims))

    def prepare(self, plan: list[tuple[str, dict[str, int]]], workers: int = 8, wait: bool = True,
                warm: bool = False):
        """Make the sessions `plan` names ((component, dims) pairs) on several threads at once, so that a first call
        does not make them one after the other. Every file's device buffer is allocated first, and each component's
        sessions are made on it at once (ONNX Runtime makes sessions without holding the GIL, and reads none of our
        buffers while it does: weights.SharedWeights), while the weights go up one file at a time, in PREPARE_ORDER
        (uploads in parallel share the bandwidth and all finish late: on the H100 a one-shot's 4.8 GiB UNet took 1.2 s
        beside the text encoders' uploads, 0.42 s alone); a session's runs wait for its file. With `warm`, each session but
        the text encoders' (a call's first stage, which runs at once) also runs once on zeros, without a CUDA graph:
        its first run's one-time work (kernel and algorithm choice, arena growth) is done while the prompts are
        encoded. With `wait` False this returns at once with the futures: a call may start meanwhile (a session it
        asks for that is being made is waited for, not made twice; the text encoders run without CUDA graphs while
        `preparing`), but must wait for them all before anything captures a CUDA graph (a capture fails if another
        thread allocates meanwhile). Each future's result is the time.perf_counter() at which it was done."""
        import time
        from concurrent.futures import Future, ThreadPoolExecutor

        if not plan:
            return []
        partner_futures = []
        if self.partners:  # the UNets' sessions at each GPU's share of the batch (parallel_loop.split_batch)
            from .parallel_loop import split_batch

            shares, plan = [], list(plan)
            for index, (component, dims) in enumerate(plan):
                if self._is_unet(component) and "B" in dims:
                    batches = split_batch(dims["B"], len(self.devices))
                    plan[index] = (component, {**dims, "B": batches[0]})
                    shares.append((component, dims, batches))
            for k, partner in enumerate(self.partners, start=1):
                own = [(c, {**dims, "B": batches[k]}) for c, dims, batches in shares if batches[k]]
                partner_futures += partner.prepare(own, workers, wait=False, warm=warm)
        components = list(dict.fromkeys(c for c, _ in plan))  # the plan's own order: a call's stages
        if PREPARE_ORDER == "size":
            components.sort(key=lambda c: -self._weight_bytes(c))
        elif PREPARE_ORDER == "unet-second":  # the first text encoder's small file, then the UNets'
            first = components[0]
            components.sort(key=lambda c: 0 if c == first else 1 if "unet" in c else 2)
        allocated = {c: Future() for c in components}

        def load():
            """Every file's buffer laid out and allocated first (its sessions are made meanwhile), then filled."""
            self._loader.active = True  # this thread's own requests never wait for the loader (itself)
            made, errors = [], []
            for component in components:
                try:
                    for file in files[component]:  # each file goes up once allocated, even if the next one fails
                        weights = self._shared(component, file, upload=False)
                        made.append(getattr(weights, "base", weights))  # under LoRA adapters: the file's own weights
                    allocated[component].set_result(True)
                except BaseException as e:  # noqa: BLE001 - raised by each session waiting for it, and here
                    allocated[component].set_exception(e)
                    errors.append(e)
            for weights in made:
                try:
                    weights.upload()
                except BaseException as e:  # noqa: BLE001 - the other files still go up: a call may not need this one
                    errors.append(e)
            if errors:
                raise errors[0]
            return time.perf_counter()

        # each component's files: its session file, and a UNet's context file (context_stage.py), made with its sessions
        files = {c: [None] + (["context"] if context_file(self._entry(c)) else []) for c in components}
        with self._lock:  # a call asking for these weights meanwhile waits for their buffer instead of competing
            for component, future in allocated.items():
                for file in files[component]:
                    self._scheduled[self._path(component, file)] = future
        loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weights")
        uploaded = loader.submit(load)
        loader.shutdown(wait=False)

        def make(component, dims):
            allocated[component].result()
            session = self.shape_session(component, dims)
            if warm and "input_ids" not in session.inputs and isinstance(session, OrtCudaSession) and session.dims:
                session.weights_ready()
                started = time.perf_counter()
                session.run(**{t["name"]: np.zeros([dims.get(d, d) if isinstance(d, str) else d for d in t["shape"]],
                                                   session.dtype(t["name"])) for t in session.entry["inputs"]})
                log.info("ran %s once on zeros in %.2f s", component, time.perf_counter() - started)
                free_buffers(session)  # the warm run's inputs, outputs and context K/V: the device loop has its own
            return time.perf_counter()

        pool = ThreadPoolExecutor(max_workers=max(1, min(workers, len(plan))), thread_name_prefix="prepare")
        order = sorted(plan, key=lambda item: components.index(item[0]))
        futures = [pool.submit(make, component, dims) for component, dims in order]
        pool.shutdown(wait=False)
        self._preparing = futures + [uploaded] + partner_futures
        if wait:
            for future in self._preparing:
                future.result()
        return self._preparing

    def fits(self, plan: list[tuple[str, dict[str, int]]]) -> bool:
        """Whether the sessions `plan` names ((component, dims), as `prepare` takes them) that are not kept yet are
        expected to fit this GPU's device-memory budget beside what is in use (Resident.fits). With partner GPUs the
        UNets' sessions are counted here at the whole batch, of which this GPU makes a share: an over-estimate."""
        return self.resident.fits([(shape_key(c, d), c, shape_work(d)) for c, d in plan])

    @property
    def preparing(self) -> bool:
        """Whether sessions of a `prepare(wait=False)` are still being made or warmed (on other threads)."""
        return not all(future.done() for future in self._preparing)

    def _weight_bytes(self, component: str) -> int:
        path = self._path(component, None)
        return sum(f.stat().st_size for f in (path, path.with_name(path.name + ".data")) if f.is_file())

    def decode_session(self, component: str, latent_shape: tuple[int, ...]) -> OrtCudaSession:
        """The session that decodes `latent_shape` on the device (device_loop.decode): the fp32 file once the fp16 VAE
        has overflowed; else, like a UNet, one made for this shape with ONNX Runtime's CUDA graph where the size is
        resident, or the fp16 session for any shape."""
        if component in self._overflowed:
            return self.session(component).fallback
        session = self.loop_session(component, {"latent": tuple(latent_shape)})
        return session.fast if isinstance(session, CheckedSession) else session

    def overflowed(self, component: str) -> None:
        """A decode on the device gave NaN/Inf: for an fp16 VAE that may overflow (`overflow_check`), a warning and
        the fp32 file from now on; otherwise an error (nothing to fall back to)."""
        session = self.session(component)
        if not isinstance(session, CheckedSession) or session.fallback is not None:
            raise UserError(non_finite("the VAE produced", component, self, "the latents it decoded were far outside "
                                       "a sampler's range", VAE_FP16_ADVICE) + "; nothing was written")
        self._overflowed.add(component)
        for key in [k for k in self.resident.keys() if k[0] == component and k[1] is not None]:
            self.resident.pop(key)  # the fp16 sessions made for one shape
        session.fall_back()
        self._drop_weights(component, keep=session_file(self._entry(component), "fp32")[0])

    def settle(self) -> None:
        """The work queued so far has finished: measure new sessions, keep the device-memory budget (later, while
        `prepare` is still making sessions: what is in use then is not yet theirs alone)."""
        if not self.preparing:
            self.resident.settle()
        for partner in self.partners:
            partner.settle()

    def set_loras(self, adapters) -> None:
        """Apply these LoRA adapters (lora.Adapter) from the next call on; () for the model as exported. The affected
        sessions are made again on the shared weights with the adapters' merged weights beside them (the merged
        weights are kept on the host for the last sets, so switching back is cheap)."""
        for component in self.adapters.set(adapters, self.manifest):
            self.release(component)
        for partner in self.partners:
            partner.set_loras(adapters)

    def drop_loop_sessions(self) -> None:
        for key in [k for k in self.resident.keys() if k[1] is not None]:
            self.resident.pop(key)
        for partner in self.partners:
            partner.drop_loop_sessions()

    def release(self, component: str) -> None:
        """Free a component's sessions, weights and the device loop's buffers for it: the memory goes back."""
        self.resident.pop_component(component)
        with self._lock:
            self._contexts.pop(component, None)
        if self._loop is not None:
            self._loop.forget(component)
        self._drop_weights(component)
        if self._is_unet(component):  # the partners hold the UNets only
            for partner in self.partners:
                partner.release(component)

    # --- internals ------------------------------------------------------------------------------------------

    def _kept(self, key: tuple, make):
        """The session kept under `key` ((component, shape)), or a new one from `make()`. The component's weights are
        loaded first, outside the session's making, so that what the session is measured to hold is its own."""
        if key not in self.resident:
            self._shared(key[0], None)
            self._context(key[0])
        return self.resident.get(key, key[0], make, work=shape_work(dict(key[1])) if key[1] else None)

    def _entry(self, component: str) -> dict:
        entry = self.manifest.components.get(component)
        if entry is None:
            raise UserError(f"{self.manifest.root}: this engine directory has no {component!r} "
                            f"(it has {', '.join(self.manifest.components)}); export it with `sdxl-trt export`")
        return entry

    def _is_unet(self, component: str) -> bool:
        return self._entry(component)["contract"].startswith("unet")

    def _path(self, component: str, file: str | None) -> Path:
        """The file a session of `component` reads (`file`: session_file's choice)."""
        entry = self._entry(component)
        _, precision, path = session_file(entry, file)
        return self.manifest.path(path or entry["precisions"][precision])

    def _shared(self, component: str, file: str | None, upload: bool = True):
        """The device weights of `component`'s file `file` under the active LoRA adapters, loaded once (a thread
        asking for weights another thread is loading waits for them). Weights `prepare`'s loader has allocated may
        still be going up: sessions made on them wait for them before they run (SharedWeights.wait). `upload`
        False: lay out and allocate only (the loader fills the buffers once all of them are allocated)."""
        path = self._path(component, file)
        overrides = self.adapters.overrides(component, path, others=self._other_parts(component, file))
        with on_device(self.device_id):  # from any thread: the buffers are this backend's device's
            return self._load_weights(path, overrides, upload)

    def _load_weights(self, path: Path, overrides, upload: bool):
        base = self._load_once((path, ()), lambda: SharedWeights(path, self.device_id,
                                                                 nhwc=CUDA_OPTIONS["prefer_nhwc"] == "1",
                                                                 upload=upload))
        if not overrides:
            return base

        def merged():
            with self._lock:
                for stale in [k for k in self._weights if k[0] == path and k[1]]:
                    del self._weights[stale]  # another adapter set's merged weights (freed with its last session)
            return base.with_overrides(overrides)

        return self._load_once((path, tuple((str(a.path), a.scale) for a in self.adapters.active)), merged)

    def _load_once(self, key: tuple, load):
        with self._lock:
            if key in self._weights:
                return self._weights[key]
            scheduled = self._scheduled.get(key[0]) if not key[1] else None
        if scheduled is not None and not getattr(self._loader, "active", False):
            try:  # prepare's loader has this file in its queue: wait for it rather than upload beside it
                scheduled.result()
            except Exception:  # noqa: BLE001 - loaded (and its error raised) here instead
                pass
            with self._lock:
                self._scheduled.pop(key[0], None)
                if key in self._weights:
                    return self._weights[key]
        with self._lock:
            if key in self._weights:
                return self._weights[key]
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            with self._lock:
                if key in self._weights:
                    return self._weights[key]
            weights = load()
            with self._lock:
                self._weights[key] = weights
                self._loading.pop(key, None)
            return weights

    def _other_parts(self, component: str, file: str | None) -> tuple[Path, ...]:
        """The other files that hold `component`'s weights beside its file `file`: an optimized UNet's file and its
        context file each hold a part (LoRA merges each module into the one that has it)."""
        entry = self._entry(component)
        if context_file(entry) is None or session_file(entry, file)[0] not in ("cuda", "context"):
            return ()
        return (self._path(component, "context" if session_file(entry, file)[0] == "cuda" else "cuda"),)

    def _make(self, component: str, file: str | None = None, cuda_graph: bool = False,
              dims: dict[str, int] | None = None) -> OrtCudaSession:
        self._onnxruntime.result()
        session = OrtCudaSession(self.manifest, component, self.stream, file=file, cuda_graph=cuda_graph, dims=dims,
                                 weights=self._shared(component, file), conv_search=self.conv_search,
                                 device=self.device_id)
        if session.file == "cuda" and self._is_unet(component):
            from .context_stage import check_pair

            session.context = self._context(component)
            check_pair(session, session.context, self.manifest)
        return session

    def _context(self, component: str):
        """The ContextSession of a UNet whose optimized file takes the cross-attentions' K and V as inputs (made
        once; any thread), else None."""
        with self._lock:
            if component in self._contexts:
                return self._contexts[component]
            loading = self._loading.setdefault(("context", component), threading.Lock())
        with loading:
            with self._lock:
                if component in self._contexts:
                    return self._contexts[component]
            context = None
            if context_file(self._entry(component)) is not None:
                from .context_stage import ContextSession

                self._onnxruntime.result()
                context = ContextSession(self.manifest, component, self.stream, self._shared(component, "context"),
                                         self.conv_search, self.device_id)
            with self._lock:
                self._contexts[component] = context
                self._loading.pop(("context", component), None)
            return context

    def _drop_weights(self, component: str, keep: str | None = None) -> None:
        """Forget `component`'s device weights (all its files, or all but file kind `keep`); the memory is freed once
        the sessions viewing it are gone."""
        entry = self._entry(component)
        paths = {self._path(component, kind) for kind in ("cuda", "context", "fp16", "fp32")
                 if (kind == "cuda" and entry.get("optimized", {}).get("cuda"))
                 or (kind == "context" and context_file(entry)) or kind in entry.get("precisions", {})}
        if keep is not None:
            paths.discard(self._path(component, keep))
        with self._lock:
            for key in [k for k in self._weights if k[0] in paths]:
                del self._weights[key]

    def _evicted(self, key, session) -> None:
        if self._loop is not None:
            self._loop.forget_session(session)
        free_buffers(session)


def load_onnxruntime():
    """Import ONNX Runtime, quiet it and load its CUDA libraries (the nvidia-* wheels', where the system has none) on
    a thread; the Future's result is the time.perf_counter() at which it was done, its exception a UserError when this
    ONNX Runtime has no CUDA provider."""
    import time
    from concurrent.futures import Future

    future = Future()

    def load():
        started = time.perf_counter()
        try:
            quiet_onnxruntime()
            import onnxruntime as ort

            if hasattr(ort, "preload_dlls"):
                ort.preload_dlls()
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise UserError("this ONNX Runtime has no CUDA execution provider: pip uninstall -y onnxruntime "
                                "onnxruntime-gpu, then pip install 'sdxl-trt[gpu]'")
        except BaseException as e:  # noqa: BLE001 - raised where a session is first made
            future.set_exception(e)
            return
        log.info("loaded ONNX Runtime in %.2f s", time.perf_counter() - started)
        future.set_result(time.perf_counter())

    # not a daemon: a process that ends before the import is done (a call refused at once) waits for it, instead of
    # the interpreter's teardown killing a thread inside ONNX Runtime's native code (which aborts: SIGABRT)
    threading.Thread(target=load, name="onnxruntime", daemon=False).start()
    return future


def check_devices(devices) -> tuple[int, ...]:
    """GPU ids (validate.parse_devices' checks), each one a device of this machine."""
    from .validate import parse_devices

    devices = parse_devices(devices) or (0,)
    count = device_count()
    for d in devices:
        if d >= count:
            raise UserError(f"--devices {','.join(map(str, devices))}: there is no GPU {d} (this machine has "
                            f"{count}: {', '.join(map(str, range(count))) or 'none'})")
    return devices


def shape_work(dims: dict[str, int]) -> int:
    """What a session's activations grow with, from its contract's dimensions: batch × sequence × latent pixels
    (those of B, S, h, w it has): the scale resident.Resident sizes a new shape's session by."""
    return math.prod(dims.get(d, 1) for d in ("B", "S", "h", "w"))


def resident_sizes(manifest: Manifest, buckets=None) -> frozenset[tuple[int, int]]:
    """The pixel sizes (W, H) whose sessions are made for their shape and kept: `buckets` ((W, H) pairs, as
    validate.resident_options gives them), else the nine SDXL buckets and the model's default size."""
    from .profiles import BUCKETS

    if buckets is None:
        size = manifest.data["model"]["default_size"]
        return frozenset((*BUCKETS, (size, size)))
    return frozenset(tuple(b) for b in buckets)


# The CUDA execution provider's options for every session (benchmarks/gpu_pipeline.py --profile times alternatives).
# arena_extend_strategy: each session's arena grows by what it is asked for, not to the next power of two (many
# resident sessions would each keep up to twice their working set)
CUDA_OPTIONS = {"cudnn_conv_use_max_workspace": "1", "prefer_nhwc": "1", "arena_extend_strategy": "kSameAsRequested"}
# cuDNN's convolution algorithm search. EXHAUSTIVE times every algorithm for each new input shape, for a steady call no
# faster than HEURISTIC's: on the H100 a new bucket's first call took 4.4-4.6 s with it and 2.9-3.0 s without, steady
# 1024² 1109 vs 1083 ms (benchmarks/results/h100-resident-buckets-sequence.json)
CONV_SEARCH = "HEURISTIC"
# Every session's convolutions take their bias inside cuDNN's graph (`fuse_conv_bias`: its conv + pointwise kernels)
# instead of a separate cudnnAddTensor pass over the output; where cuDNN has no fused engine for a convolution (another
# GPU), ONNX Runtime plans it unfused again by itself (its conv.cc falls back); a file without convolutions (the text
# encoders, the context file) is untouched. The VAEs gain most: on the H100 a 1024² decode took 45.7 ms without it and
# 39.6 ms with it (36 adds, 7.4 ms; benchmarks/results/h100-vae-variants-ce83b03.json). The UNet gains little: its 51
# adds took 1.1 ms a step, and the step at batch 2 (1024², H200) took 30.73 ms with the option against 30.84 ms
# without, the medians of three fresh sessions each taking turns, whose ranges overlap (30.72–30.82 against
# 30.75–30.86; benchmarks/results/h200-unet-fuse-conv-bias.json); small, but of the same sign in each of the four A/Bs
# made (−0.07 and −0.12 ms in h200-unet-context-kv-merge.json, −0.27 ms in h200-unet-attention-kernel.json).
CONV_OPTIONS = {"fuse_conv_bias": "1"}
# The VAEs' attention: sdpa_kernel 16 (ONNX Runtime's unfused attention: two cuBLAS GEMMs and a softmax). The VAE's
# one attention has a head of 512, too wide for flash attention, and its memory-efficient kernel took 4.6 ms: 45.7 →
# 42.5 ms a 1024² decode (H100; 36.7 ms with the fused bias too, 35.3 ms with the fp16 upsampling of export/fp16.py,
# each at the same distance from the fp32 file, rel-L2 3.06e-3). The unfused kernel writes out the B × tokens² fp16
# scores, so only where they stay under UNFUSED_ATTENTION_BYTES (every SDXL bucket: ≤ 16384 tokens, 0.5 GiB an image);
# a larger decode keeps the memory-efficient kernel. The VAE encoder (the same convolutions and one attention of the
# same shape at the latent size) gets the same: a 1024² encode took 53.7 ms without either, 47.4 ms with both
# (fuse_conv_bias 50.4, sdpa_kernel 16 50.5), rel-L2 1.45e-3 from the fp32 file in each
# (benchmarks/results/h100-vae-encoder-variants-68bf3ed.json, H100; before the Pad fold).
VAE_COMPONENTS = ("vae_decoder", "vae_encoder")
UNFUSED_ATTENTION_BYTES = 1 << 30


def session_options(component: str, dims: dict[str, int] | None) -> dict[str, str]:
    """The CUDA provider options of `component`'s session for `dims` beyond CUDA_OPTIONS (CONV_OPTIONS says why);
    `dims` None: the session for any shape. A VAE's attention's tokens are the latent's pixels (h × w; the encoder's
    contract names the image's H × W, from which contracts.derived gives them)."""
    options = dict(CONV_OPTIONS)
    if component not in VAE_COMPONENTS:
        return options
    dims = derived(dims or {})
    if {"B", "h", "w"} <= dims.keys() and dims["B"] * (dims["h"] * dims["w"]) ** 2 * 2 <= UNFUSED_ATTENTION_BYTES:
        options["sdpa_kernel"] = "16"
    return options


class OrtCudaSession(OrtSession):
    def __init__(self, manifest: Manifest, component: str, stream: Stream, file: str | None = None,
                 cuda_graph: bool = False, dims: dict[str, int] | None = None, weights=None,
                 conv_search: str = CONV_SEARCH, device: int = 0):
        """`weights` (weights.SharedWeights or WeightSet): the file's weights on the device, shared with the
        component's other sessions. `device`: the GPU the session runs on (`stream` is that device's)."""
        entry = manifest.components.get(component, {})
        self.file, precision, path = session_file(entry, file)
        self.device = device
        cuda = {"device_id": str(device), "user_compute_stream": str(stream.ptr), **CUDA_OPTIONS,
                "cudnn_conv_algo_search": conv_search, **session_options(component, dims)}
        self.cuda_graph = cuda_graph and self.file == "cuda"  # unfused files keep shape arithmetic on the CPU
        if self.cuda_graph:
            cuda["enable_cuda_graph"] = "1"
        try:
            super().__init__(manifest, component, precision, [("CUDAExecutionProvider", cuda)], path=path, dims=dims,
                             shared=weights)
        except Exception as e:  # ONNX Runtime refuses CUDA graphs when a node needs a host copy (shape arithmetic)
            if not self.cuda_graph or isinstance(e, UserError):  # ours (a missing library, …): not about graphs
                raise
            log.warning("%s: no CUDA graphs (%s)", component, str(e).splitlines()[0][:200])
            self.cuda_graph = False
            del cuda["enable_cuda_graph"]
            super().__init__(manifest, component, precision, [("CUDAExecutionProvider", cuda)], path=path, dims=dims,
                             shared=weights)
        self.stream = stream
        self.buffers = BufferPool()
        self._buffers_lock = threading.Lock()  # a run from numpy uses them; a backend on another thread may free them
        self.binding = self._session.io_binding()
        self._run_options = {}
        self.output_dtypes = {t["name"]: self.spec_dtype(t) for t in entry["outputs"]}
        self.context = None  # a UNet file's ContextSession (context_stage.py): its K/V inputs come from it

    def run_options(self, graph_id: int = PLAIN_RUN):
        """Run options that leave the stream running (the caller synchronises when it needs to); with a CUDA graph
        session, `graph_id` ≥ 0 names the graph captured (on the first runs) and replayed for one set of bindings."""
        if graph_id not in self._run_options:
            import onnxruntime as ort

            options = ort.RunOptions()
            options.add_run_config_entry("disable_synchronize_execution_providers", "1")
            if self.cuda_graph:
                options.add_run_config_entry("gpu_graph_id", str(graph_id))
            self._run_options[graph_id] = options
        return self._run_options[graph_id]

    def bind(self, binding, inputs: dict, outputs: dict) -> None:
        """Bind device memory {name: (address, shape, dtype)} to `binding`."""
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, (address, shape, dtype) in inputs.items():
            binding.bind_input(name, "cuda", self.device, np.dtype(dtype), list(shape), address)
        for name, (address, shape, dtype) in outputs.items():
            binding.bind_output(name, "cuda", self.device, np.dtype(dtype), list(shape), address)

    def run_bound(self, binding, graph_id: int = PLAIN_RUN) -> None:
        """Queue one run of `binding` on the stream; no host synchronisation. A run with a graph id may capture."""
        if not self._shared_ready:
            self.weights_ready()
        with contextlib.nullcontext() if graph_id == PLAIN_RUN else capturing():
            self._session.run_with_iobinding(binding, self.run_options(graph_id))

    def new_binding(self):
        return self._session.io_binding()

    def run(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        if set(feeds) != set(self.inputs):
            raise UserError(f"{self.name}: takes inputs {list(self.inputs)}, was given {sorted(feeds)}")
        # the buffers below are this session's device's, whatever thread asks; one run at a time (they share them)
        with on_device(self.device), self._buffers_lock:
            return self._run(feeds)

    def free_buffers(self) -> None:
        """Free the device buffers of runs from numpy arrays (`run`), after a run under way on another thread (an
        eviction by prepare's threads); the next such run makes them again."""
        with self._buffers_lock:
            buffers, self.buffers = self.buffers, BufferPool()
        with on_device(self.device):
            for buffer in buffers.values():
                buffer.free()

    def _run(self, feeds: dict) -> dict[str, np.ndarray]:
        arrays = {name: np.ascontiguousarray(value, dtype=self.dtype(name)) for name, value in feeds.items()}
        shapes = output_shapes(self.entry, {n: a.shape for n, a in arrays.items()})
        inputs = {name: (self.buffers.put(name, array, self.stream), array.shape, array.dtype)
                  for name, array in arrays.items()}
        if self.context is not None:
            context = arrays["encoder_hidden_states"]
            inputs.update(self.context.for_arrays(self.buffers, context, inputs["encoder_hidden_states"][0]))
        out = {name: np.empty(shape, dtype=self.output_dtypes[name]) for name, shape in shapes.items()}
        outputs = {name: (self.buffers.reserve(name, array.nbytes).ptr, array.shape, array.dtype)
                   for name, array in out.items()}
        self.bind(self.binding, inputs, outputs)
        self.run_bound(self.binding)
        for name, array in out.items():
            self.buffers[name].download(array, self.stream)
        self.stream.synchronize()
        return out


def free_buffers(session) -> None:
    """`OrtCudaSession.free_buffers` for a session the backend lets go (a CheckedSession: both of its sessions; any
    other kind of session: nothing). Its device buffers are not freed by Python's garbage collection (the device
    loop's, and ONNX Runtime's bindings, keep raw addresses of such buffers), so whoever drops a session frees them."""
    for each in (session._fast, session.fallback) if isinstance(session, CheckedSession) else (session,):
        if isinstance(each, OrtCudaSession):
            each.free_buffers()


class CheckedSession:
    """A VAE on an fp16 file that may overflow: every output is checked for NaN / Inf; on the first bad one, a
    warning, and the fp32 file computes this and every later call (so no black image is ever returned). Both
    sessions are made when first needed: a decode on the device (device_loop.decode) that overflows switches to fp32
    without ever loading the fp16 file for any shape here."""

    def __init__(self, name: str, make_fast, make_fallback):
        self.name, self.make_fast, self.make_fallback = name, make_fast, make_fallback
        self._fast = self.fallback = None

    @property
    def fast(self):
        if self._fast is None:
            self._fast = self.make_fast()
        return self._fast

    def __getattr__(self, name):
        return getattr(self.fallback or self.fast, name)

    def run(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        if self.fallback is None:
            out = self.fast.run(**feeds)
            if all(np.isfinite(v).all() for v in out.values()):
                return out
            self.fall_back()
        return self.fallback.run(**feeds)

    def fall_back(self) -> None:
        log.warning("%s: the fp16 VAE overflowed (NaN/Inf in the image); decoding in fp32 from now on "
                    "(slower; export with --vae an fp16-safe VAE to avoid this)", self.name)
        fast, self.fallback, self._fast = self._fast, self.make_fallback(), None  # the fp16 session's memory goes
        free_buffers(fast)
