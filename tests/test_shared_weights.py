"""One copy of a file's weights for all its sessions (runtime/weights.py) and the sessions kept per shape under a
memory budget (runtime/resident.py), on the CPU: the GPU backend's mechanisms, checked where CI runs. The GPU test
(tests/test_ort_cuda.py) measures the device memory a second session takes."""

from __future__ import annotations

import numpy as np
import pytest

from sdxl_trt.runtime.backends import OrtSession
from sdxl_trt.runtime.errors import UserError
from sdxl_trt.runtime.manifest import load_manifest
from sdxl_trt.runtime.weights import MICROSOFT, MIN_ELEMENTS, NCHW_ONLY, SHARED_INPUTS, SharedWeights, shareable

CPU = ["CPUExecutionProvider"]


def rel_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def unet_feeds(batch=2, h=8, w=12, seed=0):
    rng = np.random.default_rng(seed)
    return dict(sample=rng.standard_normal((batch, 4, h, w)).astype(np.float32),
                timestep=np.full(batch, 500.0, np.float32),
                encoder_hidden_states=rng.standard_normal((batch, 77, 96)).astype(np.float32),
                text_embeds=rng.standard_normal((batch, 64)).astype(np.float32),
                time_ids=np.array([[h * 8, w * 8, 0, 0, h * 8, w * 8]] * batch, np.float32))


@pytest.fixture(scope="module")
def unet(tiny_engine):
    manifest = load_manifest(tiny_engine)
    path = manifest.path(manifest.components["unet"]["precisions"]["fp32"])
    return manifest, path, SharedWeights(path, None)


def test_sessions_of_one_file_read_one_weight_buffer(unet):
    """Two sessions on the shared weights — one made for a shape (as a resident bucket), one for any shape — compute
    what a session reading the file computes; then one weight is changed in the shared buffer, in place: both
    sessions' outputs move, and by the same amount. They read that buffer, not copies of it."""
    manifest, path, weights = unet
    feeds = unet_feeds()
    plain = OrtSession(manifest, "unet", "fp32", CPU).run(**feeds)["noise_pred"]
    bucket = OrtSession(manifest, "unet", "fp32", CPU, dims={"B": 2, "S": 77, "h": 8, "w": 12}, shared=weights)
    any_shape = OrtSession(manifest, "unet", "fp32", CPU, shared=weights)
    before = [s.run(**feeds)["noise_pred"] for s in (bucket, any_shape)]
    for out in before:  # fp32 on one CPU: ONNX Runtime's passes differ a little between the sessions (≈ 1e-7)
        assert rel_l2(out, plain) < 1e-5
    name = max((n for n in weights.layout if "attn1.to_q" in n), key=lambda n: weights.view(n).size)
    weight = weights.view(name)
    saved = weight.copy()
    weight *= 3.0
    try:
        after = [s.run(**feeds)["noise_pred"] for s in (bucket, any_shape)]
    finally:
        weight[...] = saved
    moved = [rel_l2(a, b) for a, b in zip(after, before)]
    print(f"tripling {name} in the shared buffer moved both outputs by rel-L2 {moved}")
    assert min(moved) > 1e-3  # a change nobody reads would leave them where they were
    assert rel_l2(after[0], after[1]) < 1e-5
    restored = bucket.run(**feeds)["noise_pred"]
    assert rel_l2(restored, before[0]) < 1e-6


def test_a_session_is_made_before_its_weights_arrive_and_its_runs_wait_for_them(tiny_engine):
    """prepare makes sessions on a file's buffer while the file still goes up (SharedWeights(upload=False), then
    upload()): making the session reads nothing of the buffer — here it holds NaN until the upload —, and a run asked
    for meanwhile waits for the upload, then computes what a session reading the file computes."""
    import threading

    manifest = load_manifest(tiny_engine)
    path = manifest.path(manifest.components["unet"]["precisions"]["fp32"])
    feeds = unet_feeds()
    plain = OrtSession(manifest, "unet", "fp32", CPU).run(**feeds)["noise_pred"]
    weights = SharedWeights(path, None, upload=False)
    weights._memory[:] = 0xFF  # every float in the buffer NaN: a session that read it now would compute NaN
    session = OrtSession(manifest, "unet", "fp32", CPU, dims={"B": 2, "S": 77, "h": 8, "w": 12}, shared=weights)
    out, ran = {}, threading.Event()

    def run():
        out["pred"] = session.run(**feeds)["noise_pred"]
        ran.set()

    thread = threading.Thread(target=run)
    thread.start()
    assert not ran.wait(0.5)  # waiting for the weights, not computing on NaN
    weights.upload()
    thread.join(30)
    assert ran.is_set() and np.isfinite(out["pred"]).all()
    assert rel_l2(out["pred"], plain) < 1e-5  # as in the test above: the sessions' passes differ by ≈ 1e-7


def test_a_failed_upload_is_raised_by_every_run_that_waited_for_it(tmp_path):
    """A file that is cut short after its layout was read: upload() raises, and so does every wait() after it,
    instead of a run computing on a half-filled buffer."""
    path, arrays = external_model(tmp_path, GAPS)
    weights = SharedWeights(path, None, upload=False)
    data = tmp_path / "weights.bin"
    data.write_bytes(data.read_bytes()[:-10])
    with pytest.raises(UserError, match="ended early"):
        weights.upload()
    for _ in range(2):
        with pytest.raises(UserError, match="ended early"):
            weights.wait()


def test_nearly_every_weight_byte_is_shared_and_only_where_no_pass_rewrites_it(tiny_optimized, tiny_engine):
    """What is shared: inputs of MatMul, Gemm, Gather, LayerNormalization and com.microsoft ops (and Conv where the
    provider keeps NCHW); never the inputs of ops ONNX Runtime's transpose and layout passes rewrite in place. On the
    optimized files ort-cuda runs that is ≥ 99% of the weights (tiny: 99.0-99.96% measured; full size: 99.95% of
    CLIP-L's, 99.9993% of the UNet's, counted on the CPU machine); on the exported files, where biases are separate
    Adds, ≥ 98% (98.9-99.96%) with Conv kept NCHW — under prefer_nhwc their convolutions stay per session."""
    import onnx

    for root, kinds in ((tiny_optimized, ("cuda",)), (tiny_engine, ("fp32", "fp16"))):
        manifest = load_manifest(root)
        for component, entry in manifest.components.items():
            for kind in kinds:
                record = entry["optimized"]["cuda"] if kind == "cuda" else {}
                relative = record["path"] if kind == "cuda" else entry["precisions"].get(kind)
                if relative is None:
                    continue
                # the files ort-cuda loads for it: an optimized UNet's own and its context file (the K/V projections)
                graphs = [onnx.load(str(manifest.path(f)), load_external_data=False).graph
                          for f in [relative] + ([record["context"]] if record.get("context") else [])]
                floats = [t for graph in graphs for t in graph.initializer if t.data_type in (1, 10)]
                total = sum(int(np.prod(t.dims)) for t in floats)
                for nhwc in (False, True) if kind == "cuda" else (False,):
                    shared = {t.name for graph in graphs for t in shareable(graph, nhwc)}
                    least = 0.99 if kind == "cuda" else 0.98
                    assert sum(int(np.prod(t.dims)) for t in floats if t.name in shared) >= least * total, \
                        (component, kind, nhwc)
                    allowed = {**SHARED_INPUTS, **({} if nhwc else NCHW_ONLY)}
                    for node in (node for graph in graphs for node in graph.node):
                        for index, name in enumerate(node.input):
                            if name in shared:
                                assert node.domain == MICROSOFT or index in allowed.get((node.domain, node.op_type), ()), \
                                    (component, kind, node.op_type, name)
                for graph in graphs:
                    sizes = {t.name: int(np.prod(t.dims)) for t in graph.initializer}
                    convs = {n.input[1] for n in graph.node
                             if n.op_type == "Conv" and not n.domain and sizes.get(n.input[1], 0) >= MIN_ELEMENTS}
                    assert not convs & {t.name for t in shareable(graph, nhwc=True)}  # prefer_nhwc transposes them
                    if convs:
                        assert convs <= {t.name for t in shareable(graph, nhwc=False)}


def test_shared_weights_keep_the_file_s_values_and_layout(unet):
    """Every shared value is the file's tensor, byte for byte, at an aligned offset."""
    from onnx import load, numpy_helper

    manifest, path, weights = unet
    model = load(str(path))
    tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert len(weights.values) >= 100
    for name, (offset, dims, _) in weights.layout.items():
        assert offset % 256 == 0
        np.testing.assert_array_equal(weights.view(name), tensors[name])
        assert weights.values[name].shape() == list(dims)


def external_model(folder, gaps):
    """A chain of MatMuls whose weights sit in one external data file at offsets with the given gaps before each
    (bytes; unaligned ones and large ones included): the layouts writers other than ours produce."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights, nodes, offset, data = [], [], 0, bytearray()
    for i, gap in enumerate(gaps):
        array = rng.standard_normal((16, 16)).astype(np.float32)
        offset += gap
        data += bytes(gap) + array.tobytes()
        tensor = numpy_helper.from_array(array, f"w{i}")
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "weights.bin"), ("offset", str(offset)), ("length", str(array.nbytes))):
            tensor.external_data.add(key=key, value=value)
        offset += array.nbytes
        weights.append((tensor, array))
        nodes.append(helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"x{i + 1}"]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info(f"x{len(gaps)}", TensorProto.FLOAT, [1, 16])],
                              [t for t, _ in weights])
    (folder / "weights.bin").write_bytes(bytes(data))
    onnx.save(helper.make_model(graph), str(folder / "model.onnx"))
    return folder / "model.onnx", {t.name: a for t, a in weights}


GAPS = [0, 0, 100, 4, 3 << 20, 256, 0]  # neighbours, unaligned starts, a gap larger than MAX_GAP


def test_weights_are_read_in_runs_as_laid_out_in_the_file(tmp_path):
    """Neighbouring weights are read in one piece (fewer, larger reads); a weight whose place in the run would be
    unaligned, or far from the one before it, starts a run of its own; every view holds the file's tensor."""
    from sdxl_trt.runtime.weights import ALIGN, layout

    path, arrays = external_model(tmp_path, GAPS)
    weights = SharedWeights(path, None)
    for name, array in arrays.items():
        np.testing.assert_array_equal(weights.view(name), array)
        assert weights.layout[name][0] % ALIGN == 0
    import onnx

    _, copies, total = layout(shareable(onnx.load(str(path), load_external_data=False).graph, False), tmp_path)
    assert 1 < len(copies) < len(arrays)  # runs: more than one (gaps, alignment), fewer than the tensors
    assert total < sum(a.nbytes for a in arrays.values()) + len(arrays) * ALIGN  # the 3 MiB gap is not copied


@pytest.mark.parametrize("read", ["mmap", "pread"])
def test_device_upload_through_staging_buffers_copies_every_byte(tmp_path, monkeypatch, read):
    """The device path (cuda.upload_file_ranges: page-locked staging buffers on several threads, pieces smaller
    than the runs) run against a stand-in CUDA runtime over host memory: the buffer holds each file's bytes where the
    layout says. A file shorter than its model says is refused before anything is copied."""
    import ctypes

    import onnx
    from fake_gpu import FakeCudart
    from sdxl_trt.runtime import cuda
    from sdxl_trt.runtime.weights import layout

    fake = FakeCudart()
    monkeypatch.setattr(cuda, "cudart", lambda: fake)
    path, arrays = external_model(tmp_path, GAPS)
    tensors = shareable(onnx.load(str(path), load_external_data=False).graph, False)
    offsets, copies, total = layout(tensors, tmp_path)
    _, base = fake.cudaMalloc(total)
    cuda.upload_file_ranges([(src, start, n, base + offset) for src, start, n, offset in copies],
                            workers=3, chunk=1000, read=read)
    for name, array in arrays.items():
        raw = (ctypes.c_char * array.nbytes).from_address(base + offsets[name])
        np.testing.assert_array_equal(np.frombuffer(raw, np.float32).reshape(array.shape), array)
    assert fake.mallocs == 1 + 3 * 2  # the buffer, and two staging buffers per thread (freed again)
    assert len(fake.memory) == 1
    data = tmp_path / "weights.bin"
    data.write_bytes(data.read_bytes()[:-10])
    with pytest.raises(UserError, match="shorter than its model says"):
        layout(tensors, tmp_path)


# --- resident sessions under a memory budget --------------------------------------------------------------------

class FakeDevice:
    """Device memory as a counter: values add their bytes when made (and when first run, like an arena growing)."""

    def __init__(self):
        self.used = 0


class Session:
    def __init__(self, device: FakeDevice, nbytes: int):
        self.device, self.nbytes = device, nbytes
        device.used += nbytes // 2  # made: half its memory

    def run(self):
        self.device.used += self.nbytes - self.nbytes // 2  # first run: the arena grows to the rest


def test_resident_sessions_are_measured_and_freed_least_recently_used_first():
    from sdxl_trt.runtime.resident import Resident

    device = FakeDevice()
    device.used = 40  # shared weights: held, never evicted
    freed = []

    def evict(key, session):
        freed.append(key)
        device.used -= session.nbytes

    resident = Resident(used=lambda: device.used, budget=100, evict=evict)

    def call(key, nbytes=20):
        session = resident.get(key, key[0], lambda: Session(device, nbytes))
        if key not in made:
            session.run()
            made.add(key)
        resident.settle()
        return session

    made = set()
    for size in ("1024x1024", "1152x896", "896x1152"):
        call(("unet", size))
    assert device.used == 100 and not freed and resident.sizes()[("unet", "1024x1024")] == 20  # measured, not assumed
    first = call(("unet", "1024x1024"))  # used again: now the most recent
    assert call(("unet", "1024x1024")) is first and not freed  # kept: nothing made again
    call(("unet", "1216x832"))  # room for 20 more: the least recently used goes first, before the new one is made
    assert freed == [("unet", "1152x896")] and device.used == 100 and resident.evictions == 1
    assert resident.keys() == [("unet", "896x1152"), ("unet", "1024x1024"), ("unet", "1216x832")]
    made.discard(("unet", "1152x896"))
    call(("unet", "1152x896"))  # back again: made anew, another goes
    assert freed[-1] == ("unet", "896x1152") and device.used <= 100
    assert resident.peak == 100


def test_a_budget_below_one_working_set_still_runs_and_says_so(caplog):
    from sdxl_trt.runtime.resident import Resident

    device = FakeDevice()
    device.used = 40
    resident = Resident(used=lambda: device.used, budget=50,
                        evict=lambda key, session: setattr(device, "used", device.used - session.nbytes))
    for size in ("a", "b", "c"):
        session = resident.get(("vae", size), "vae", lambda: Session(device, 30))
        session.run()
        resident.settle()
        assert len(resident) == 1 and resident.keys() == [("vae", size)]  # the one in use stays
    assert "running over the budget" in caplog.text and caplog.text.count("running over the budget") == 1


def test_the_room_made_for_a_new_shape_scales_with_its_work():
    """A batch of four at a size whose one-image sessions were measured is expected to hold four times as much: room
    for that is made before it is made, so the device never holds more than the budget (it would, by 40 bytes here,
    if the room made were one image's)."""
    from sdxl_trt.runtime.resident import Resident

    device = FakeDevice()
    device.used = 40
    freed = []

    def evict(key, session):
        freed.append(key)
        device.used -= session.nbytes

    resident = Resident(used=lambda: device.used, budget=150, evict=evict)

    def call(key, work, nbytes):
        session = resident.get(key, "unet", lambda: Session(device, nbytes), work=work)
        session.run()
        resident.settle()

    for size in ("a", "b", "c"):
        call(("unet", size, 1), work=1000, nbytes=20)
    assert resident.expected("unet", 4000) == 80 and resident.expected("unet", 500) == 10
    assert resident.expected("unet") == 20  # a session for any shape: the most one of them held
    peak = []
    original_run = Session.run

    def run(self):
        original_run(self)
        peak.append(device.used)

    Session.run = run
    try:
        call(("unet", "a", 4), work=4000, nbytes=80)
    finally:
        Session.run = original_run
    assert freed == [("unet", "a", 1), ("unet", "b", 1)]  # before it was made: 100 + 80 > 150
    assert peak == [140] and device.used <= 150


def test_values_not_kept_yet_are_expected_to_fit_or_not():
    from sdxl_trt.runtime.resident import Resident

    device = FakeDevice()
    device.used = 40
    resident = Resident(used=lambda: device.used, budget=150, evict=lambda key, session: None)
    resident.get(("unet", "a", 1), "unet", lambda: Session(device, 20), work=1000).run()
    resident.settle()  # 60 in use; 20 bytes per 1000 of work measured
    one_each = [(("unet", s, 1), "unet", 1000) for s in "abcd"]
    assert resident.fits(one_each)  # a is kept: 3 × 20 more → 120
    assert not resident.fits(one_each + [(("unet", "a", 4), "unet", 4000)])  # + 80 → 200 > 150
    assert resident.fits([(("vae", "a", 1), "vae", 1000)] * 10)  # never measured: counts 0
    assert Resident(used=lambda: 10**12).fits(one_each)  # no budget


def test_the_automatic_budget_is_the_free_memory_less_a_reserve(caplog):
    from sdxl_trt.runtime.resident import GIB, Resident, automatic_budget

    assert automatic_budget(1 * GIB, 80 * GIB) == 71 * GIB  # 10% of the GPU kept back
    assert automatic_budget(GIB // 2, 8 * GIB) == int(5.5 * GIB)  # at least 2 GiB kept back
    assert automatic_budget(79 * GIB, 80 * GIB) == 0  # nothing free: every call frees what came before it
    device = FakeDevice()
    resident = Resident(used=lambda: device.used, budget=10, automatic=True,
                        evict=lambda key, session: setattr(device, "used", device.used - session.nbytes))
    for size in ("a", "b"):
        resident.get(("vae", size), "vae", lambda: Session(device, 30)).run()
        resident.settle()
    assert resident.keys() == [("vae", "b")]
    assert "the automatic device-memory budget (0.0 GiB: the GPU's free memory at the start less a reserve)" in \
        caplog.text and "--max-device-memory" not in caplog.text


def test_sessions_made_on_several_threads_are_each_kept_once():
    import threading
    import time

    from sdxl_trt.runtime.resident import Resident

    device = FakeDevice()
    resident = Resident(used=lambda: device.used)
    made = []

    def make():
        time.sleep(0.05)  # another thread asks for the same key meanwhile
        made.append(1)
        return Session(device, 10)

    got = []
    threads = [threading.Thread(target=lambda k=k: got.append(resident.get(k, "unet", make)))
               for k in ("a", "b", "a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(resident) == 2 and resident.keys() in (["a", "b"], ["b", "a"])
    assert len({id(s) for s in got}) == 2  # both askers of a key got the value that was kept
    assert len(made) == 2  # and it was made once: the second asker waited for the first (a UNet session takes s)


def test_a_thread_waiting_for_a_session_that_failed_makes_it_itself():
    """prepare(wait=False) makes sessions in the background while a call asks for them: when the background make
    fails (say a corrupt file), the call's own attempt runs and reports the error where the user sees it."""
    import threading
    import time

    from sdxl_trt.runtime.resident import Resident

    resident = Resident(used=lambda: 0)
    attempts = []

    def make():
        attempts.append(threading.current_thread().name)
        time.sleep(0.05)
        raise ValueError("corrupt")

    errors = []

    def ask():
        try:
            resident.get("unet", "unet", make)
        except ValueError as e:
            errors.append(e)

    threads = [threading.Thread(target=ask, name=n) for n in ("background", "call")]
    for t in threads:
        t.start()
        time.sleep(0.01)
    for t in threads:
        t.join()
    assert attempts == ["background", "call"] and len(errors) == 2 and len(resident) == 0

