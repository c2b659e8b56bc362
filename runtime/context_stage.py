"""An optimized UNet's context file on the GPU: the cross-attentions' K and V of the prompt, computed once per call.

`sdxl-trt optimize` moves the UNet's cross-attention K/V projections of the text context into a file of their own
(export/context_projections.py): the UNet file then takes their results as inputs (`context_k.<i>`,
`context_v.<i>`, [B, S, D]) instead of computing the same 140 GEMMs at every step. ort-cuda runs the context file
once per call, on the device buffer of `encoder_hidden_states`, into device buffers that the UNet's binding reads at
each step (device_loop.py's begin; OrtCudaSession._run for a step run from numpy arrays).
"""

from __future__ import annotations

import threading
import weakref

import numpy as np

from .errors import UserError
from .ort_cuda import OrtCudaSession

CONTEXT_INPUT = "encoder_hidden_states"
ONNX_TYPES = {"tensor(float16)": np.float16, "tensor(float)": np.float32}


class ContextSession(OrtCudaSession):
    """The context file of `component` on the CUDA provider, sharing the device, stream and (LoRA-merged) weights
    of the backend's other sessions of the component; one for every shape (its run is not part of a step's graph)."""

    def __init__(self, manifest, component: str, stream, weights, conv_search: str, device: int):
        super().__init__(manifest, component, stream, file="context", weights=weights, conv_search=conv_search,
                         device=device)
        context = next(t for t in self._session.get_inputs() if t.name == CONTEXT_INPUT)
        self.inputs = {CONTEXT_INPUT: self.inputs[CONTEXT_INPUT]}
        self.input_dtype = ONNX_TYPES[context.type]
        self.output_specs = {t.name: (int(t.shape[-1]), ONNX_TYPES[t.type]) for t in self._session.get_outputs()}
        self.output_names = list(self.output_specs)
        self.output_dtypes = {name: dtype for name, (_, dtype) in self.output_specs.items()}
        self._bound = None  # the addresses and shapes self.binding is bound to
        self._lock = threading.Lock()  # one binding, run from any thread (prepare warms UNet sessions at once)

    def dtype(self, input_name: str):
        return self.input_dtype

    def shapes(self, context_shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """{output: (shape, dtype)} for a context of this shape ([B, S, C] → [B, S, D])."""
        return {name: ((*context_shape[:2], width), dtype) for name, (width, dtype) in self.output_specs.items()}

    def queue(self, context: tuple[int, tuple, object], outputs: dict[str, int]) -> None:
        """Queue the run on the stream: `context` (address, shape, dtype) of the device's `encoder_hidden_states`,
        `outputs` the device addresses to write each result at (sized as `shapes` says)."""
        address, shape, dtype = context
        if np.dtype(dtype) != np.dtype(self.input_dtype):
            raise ValueError(f"{self.name}'s context file takes {CONTEXT_INPUT} as {np.dtype(self.input_dtype)}, "
                             f"given {np.dtype(dtype)}")
        key = (address, tuple(shape), tuple(sorted(outputs.items())))
        with self._lock:
            if self._bound != key:
                specs = self.shapes(tuple(shape))
                self.bind(self.binding, {CONTEXT_INPUT: context},
                          {name: (outputs[name], *specs[name]) for name in self.output_names})
                self._bound = key
            self.run_bound(self.binding)  # queued on the stream by the time it returns: rebinding is safe after

    def into(self, pool, context: tuple[int, tuple, object]) -> dict[str, tuple]:
        """Reserve the outputs in `pool` (a BufferPool), queue the run into them; returns the UNet's extra inputs
        {name: (address, shape, dtype)}."""
        bound = self._reserve(pool, tuple(context[1]))
        self.queue(context, {name: value[0] for name, value in bound.items()})
        return bound

    def for_arrays(self, pool, context: np.ndarray, address: int) -> dict[str, tuple]:
        """`into` for a step run from numpy arrays (OrtCudaSession._run), the context uploaded at `address`: the run
        is queued again only when the context differs from the last one computed into these buffers (a loop of steps
        on one prompt computes it once)."""
        bound = self._reserve(pool, context.shape)
        addresses = tuple(value[0] for value in bound.values())
        last = getattr(pool, "context_computed", None)  # kept on the pool: its buffers hold what it says
        if (last is None or last[0]() is not self or last[2] != addresses or last[1].shape != context.shape
                or not np.array_equal(last[1], context)):
            self.queue((address, context.shape, context.dtype), {name: value[0] for name, value in bound.items()})
            pool.context_computed = (weakref.ref(self), context.copy(), addresses)
        return bound

    def _reserve(self, pool, context_shape: tuple) -> dict[str, tuple]:
        return {name: (pool.reserve(f"context {name}", int(np.prod(shape)) * np.dtype(dtype).itemsize).ptr, shape, dtype)
                for name, (shape, dtype) in self.shapes(context_shape).items()}


def check_pair(unet, context: ContextSession | None, manifest) -> None:
    """The inputs the UNet session's file takes beyond its contract are exactly what its context file gives (names,
    types, widths), or there are none and no context file: a one-line error naming the fix otherwise (a file
    replaced by hand, or a context file of another optimize)."""
    extra = {t.name: t for t in unet._session.get_inputs() if t.name not in unet.inputs}
    given = {} if context is None else {t.name: t for t in context._session.get_outputs()}
    if extra.keys() == given.keys() and all(ONNX_TYPES.get(extra[n].type) == ONNX_TYPES.get(given[n].type)
                                            and extra[n].shape[-1] == given[n].shape[-1] for n in extra):
        return
    where = f"{unet.name}'s optimized files in {manifest.root}"
    if context is None:
        problem = f"the UNet file takes {len(extra)} inputs beyond its contract ({', '.join(sorted(extra)[:3])}, …) " \
                  "and the manifest names no context file that gives them"
    else:
        problem = f"the context file {context.path.name} gives {len(given)} outputs, the UNet file takes " \
                  f"{len(extra)} other inputs, and they do not match"
    raise UserError(f"{where}: {problem}; make them again: `sdxl-trt optimize {manifest.root}`")
