"""`sdxl-trt serve` for real: the server process on loopback with the tiny model, spoken to over HTTP."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
prometheus = pytest.importorskip("prometheus_client.parser")
from PIL import Image  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`sdxl-trt serve ENGINE FLAGS` in a child process (its own session: signals go to it alone), healthy."""

    def __init__(self, engine, *flags, start_timeout: float = 120, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.devnull, "w")
        self.process = subprocess.Popen([sys.executable, "-m", "sdxl_trt.runtime.cli", "serve", str(engine), "--port",
                                         str(self.port), *flags], stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "the server exited while starting"
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"the server did not become healthy in {start_timeout:g} s")

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.status, r.read()

    def post(self, body, raw: bytes | None = None, timeout=120):
        data = raw if raw is not None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + "/v1/images/generations", data=data,
                                         headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return r.status, json.loads(r.read()), {k.lower(): v for k, v in r.headers.items()}
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read()), {k.lower(): v for k, v in e.headers.items()}

    def metrics(self) -> dict:
        families = prometheus.text_string_to_metric_families(self.get("/metrics")[1].decode())
        return {s.name + json.dumps(s.labels, sort_keys=True): s.value for f in families for s in f.samples}

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)  # and whatever it started (Ray's processes)
        self.log.close()


@pytest.fixture(scope="module")
def server(tiny_engine):
    s = Server(tiny_engine, "--max-wait-ms", "400", "--max-batch", "4", "--max-n", "3", "--max-steps", "40",
               "--max-body-mb", "1")
    yield s
    s.stop()


def image_of(item) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))


def test_health_and_one_request(server):
    assert json.loads(server.get("/health")[1])["status"] == "ok"
    status, body, _ = server.post({"prompt": "a red bicycle", "size": "64x96", "steps": 2, "n": 2, "seed": 11})
    assert status == 200 and [d["seed"] for d in body["data"]] == [11, 12]
    for item in body["data"]:
        with image_of(item) as image:
            assert image.size == (64, 96) and image.mode == "RGB"
    assert {"text", "base", "vae", "total"} <= set(body["timings"]) and body["created"] > 0


def test_concurrent_requests_are_merged_and_keep_their_seeds(server):
    before = server.metrics()
    bodies = [{"prompt": p, "size": "64x64", "steps": 3, "seed": 100 + i}
              for i, p in enumerate(["a cat", "a dog", "a ship", "a lighthouse"])]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(server.post, bodies))
    assert [a[0] for a in answers] == [200] * 4
    assert max(a[1]["timings"]["batched_requests"] for a in answers) > 1
    after = server.metrics()
    calls = after['sdxl_batch_requests_count{}'] - before.get('sdxl_batch_requests_count{}', 0)
    merged = after['sdxl_batch_requests_sum{}'] - before.get('sdxl_batch_requests_sum{}', 0)
    assert merged == 4 and calls < 4  # four requests in fewer pipeline calls
    assert after['sdxl_images_generated_total{}'] - before.get('sdxl_images_generated_total{}', 0) == 4
    # a request answered alone gets the images it got inside the merged call (same seed → same noise stream)
    status, alone, _ = server.post(bodies[2])
    assert status == 200 and alone["timings"]["batched_requests"] == 1
    import numpy as np

    with image_of(alone["data"][0]) as a, image_of(answers[2][1]["data"][0]) as b:
        assert np.abs(np.asarray(a, int) - np.asarray(b, int)).max() <= 2  # batch size may change float sums


@pytest.mark.parametrize("body, raw, status, says", [
    (None, b"{not json", 400, "not valid JSON"),
    ({"prompt": "a cat", "colour": "red"}, None, 400, "colour"),
    ({"size": "64x64"}, None, 400, "prompt"),
    ({"prompt": "a cat", "size": "65x64"}, None, 400, "multiples of 8"),
    ({"prompt": "a cat", "size": "big"}, None, 400, "size"),
    ({"prompt": "a cat", "n": 4}, None, 400, "at most 3"),
    ({"prompt": "a cat", "n": 0}, None, 400, "n"),
    ({"prompt": "a cat", "steps": 41}, None, 400, "at most 40"),
    ({"prompt": "a cat", "steps": 0}, None, 400, "steps"),
    ({"prompt": "a cat", "sampler": "plms"}, None, 400, "plms"),
    ({"prompt": "a cat", "seed": -1}, None, 400, "seed"),
    ({"prompt": "a cat", "seed": "1"}, None, 400, "seed"),  # strict types: not converted
    ({"prompt": "a cat", "seed": True}, None, 400, "seed"),
    ({"prompt": "a cat", "steps": 2.5}, None, 400, "steps"),
    ({"prompt": "a cat", "guidance": "high"}, None, 400, "guidance"),
    ({"prompt": "a cat", "response_format": "url"}, None, 400, "b64_json"),
    ({"prompt": "a cat", "strength": 0.5}, None, 400, "init_image"),
    ({"prompt": "a cat", "init_image": "not base64!"}, None, 400, "init_image"),
    ({"prompt": "a cat", "size": "64x64", "refiner_start": 1.5}, None, 400, "refiner_start"),
    ({"prompt": "a cat", "lora": [{"name": "style"}]}, None, 400, "--lora-dir"),
    ({"prompt": "a cat", "lora": [{"name": "style", "weight": 1}]}, None, 400, "weight"),
    ({"prompt": "x" * (2 << 20)}, None, 413, "over the limit"),
    (None, b'{"prompt": "\\ud800 a cat", "size": "64x64"}', 400, "not valid text"),  # a lone surrogate: no Unicode
    ({"prompt": "a cat", "init_image": "BOMB"}, None, 400, "too many pixels"),
    # what FastAPI refuses before our model sees it, in our error format too (its own is {"detail": ...})
    (None, b'{"prompt": "a \xff cat"}', 400, "not valid JSON"),  # not UTF-8
    (None, b'{"prompt": "a cat", "seed": ' + b"9" * 5000 + b"}", 400, "not valid JSON"),  # over Python's int digits
    (None, b"[" * 100000 + b"]" * 100000, 400, "not valid JSON"),  # nested past the parser's recursion limit
])
def test_bad_requests_get_4xx_with_a_message(server, body, raw, status, says):
    if body and body.get("init_image") == "BOMB":  # a 1-bit PNG of 20000² pixels: tiny as a file, huge in memory
        import base64
        import io

        from PIL import Image

        buffer = io.BytesIO()
        Image.new("1", (20000, 20000)).save(buffer, format="PNG")
        body = {**body, "init_image": base64.b64encode(buffer.getvalue()).decode()}
    got, answer, _ = server.post(body, raw)
    assert got == status and says in answer["error"]["message"], answer


def test_one_bad_request_does_not_fail_the_requests_merged_with_it(server):
    good = {"prompt": "a cat", "size": "64x64", "steps": 2, "seed": 1}
    bad = {"prompt": "a cat", "size": "64x64", "steps": 2, "seed": 2, "guidance": float("nan")}
    raw_bad = json.dumps(bad).replace("NaN", "1e999").encode()  # JSON has no NaN: an infinite number instead
    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(server.post, good)
        b = pool.submit(server.post, None, raw_bad)
        answers = a.result(), b.result()
    assert answers[0][0] == 200 and answers[1][0] == 400 and "guidance" in answers[1][1]["error"]["message"]


def test_img2img_through_the_api(server):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    status, body, _ = server.post({"prompt": "a red square", "steps": 4, "strength": 0.5, "seed": 3,
                                   "init_image": base64.b64encode(buffer.getvalue()).decode()})
    assert status == 200
    with image_of(body["data"][0]) as image:
        assert image.size == (64, 64)


def test_metrics_parse(server):
    metrics = server.metrics()
    assert any(k.startswith("sdxl_requests_total") for k in metrics)
    assert 'sdxl_stage_seconds_count{"stage": "base"}' in metrics and "sdxl_queue_depth{}" in metrics


def test_a_full_queue_answers_429_with_retry_after(tiny_engine):
    s = Server(tiny_engine, "--max-queue", "1", "--max-batch", "1", "--max-wait-ms", "0")
    try:
        body = {"prompt": "a cat", "size": "128x128", "steps": 30}
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(s.post, [body] * 6))
        codes = sorted(a[0] for a in answers)
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}
        assert all(a[2].get("retry-after") == "1" for a in answers if a[0] == 429)
    finally:
        s.stop()


def test_sigterm_finishes_the_requests_in_flight(tiny_engine):
    s = Server(tiny_engine)
    answer = {}

    def request():
        answer["r"] = s.post({"prompt": "a cat", "size": "256x256", "steps": 100})
        answer["done"] = time.monotonic()

    worker = threading.Thread(target=request)
    worker.start()
    time.sleep(1.0)  # the request is in the pipeline (100 steps at 256x256: several seconds here)
    signalled = time.monotonic()
    s.process.send_signal(signal.SIGTERM)
    worker.join(120)
    assert answer["r"][0] == 200 and len(answer["r"][1]["data"]) == 1
    assert answer["done"] > signalled + 0.2, "the request was not in flight when the signal came"
    assert s.process.wait(60) == 0
    s.stop()


def test_ray_serve_runs_the_same_api_on_two_replicas(tiny_engine):
    """`serve --ray --replicas 2`: a local Ray instance, two replicas of the tiny model behind Ray's proxy."""
    pytest.importorskip("ray.serve")
    s = Server(tiny_engine, "--ray", "--replicas", "2", start_timeout=240)
    try:
        replicas, deadline = set(), time.monotonic() + 120  # a replica may finish its warm-up after the other
        while len(replicas) < 2 and time.monotonic() < deadline:
            replicas.add(json.loads(s.get("/health")[1])["replica"])
            time.sleep(0.05)
        assert len(replicas) == 2, replicas  # Ray's proxy spreads requests over both
        bodies = [{"prompt": f"a kite {i}", "size": "64x96", "steps": 2, "seed": i} for i in range(4)]
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(s.post, bodies))
        assert [a[0] for a in answers] == [200] * 4
        for answer in answers:
            with image_of(answer[1]["data"][0]) as image:
                assert image.size == (64, 96)
        status, bad, _ = s.post({"prompt": "a kite", "size": "65x64"})
        assert status == 400 and "multiples of 8" in bad["error"]["message"]
        s.process.send_signal(signal.SIGTERM)
        assert s.process.wait(120) == 0
    finally:
        s.stop()


# loaded by the server process at start (sitecustomize): a call asking for 100 steps sleeps 10 s first, whatever
# the machine's speed, so that the timeout test's two calls have one outcome each
SLOW_CALLS = """
import time
from sdxl_trt.runtime import pipeline
_call = pipeline.Pipeline.__call__
def _slow(self, *args, **kwargs):
    if kwargs.get("num_inference_steps") == 100:
        time.sleep(10)
    return _call(self, *args, **kwargs)
pipeline.Pipeline.__call__ = _slow
"""


def test_a_request_over_its_time_gets_504_and_the_server_goes_on(tiny_engine, tmp_path):
    """The slow call (made 10 s slower than it is by SLOW_CALLS) is far over the 3 s limit; once it has run out (the
    pipeline is free: its image is counted in the metrics), a 1-step 64x64 call (0.1-0.25 s on the CI machine) is
    far under it and must be answered."""
    (tmp_path / "sitecustomize.py").write_text(SLOW_CALLS)
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    s = Server(tiny_engine, "--timeout-s", "3", env={"PYTHONPATH": path})
    try:
        images = 'sdxl_images_generated_total{}'
        status, body, _ = s.post({"prompt": "a cat", "size": "64x64", "steps": 100})
        assert status == 504 and "3 s" in body["error"]["message"]
        deadline = time.monotonic() + 120
        while s.metrics().get(images, 0) < 1:  # the timed-out call still runs to its end, then frees the pipeline
            assert time.monotonic() < deadline, "the timed-out call never finished"
            time.sleep(0.2)
        status, body, _ = s.post({"prompt": "a cat", "size": "64x64", "steps": 1, "seed": 1})
        assert status == 200 and len(body["data"]) == 1, body
        assert s.metrics()[images] == 2 and s.get("/health")[0] == 200
    finally:
        s.stop()


@pytest.mark.parametrize("argv, says", [
    (["--replicas", "2"], "go with --ray"),
    (["--gpus-per-replica", "2"], "go with --ray"),
    (["--ray", "--gpus-per-replica", "2"], "--gpus-per-replica 2: expected 1, or more with --backend ort-cuda"),
    (["--ray", "--gpus-per-replica", "0"], "--gpus-per-replica 0: expected 1"),
    (["--backend", "ort-cuda", "--ray", "--devices", "0"], "--devices goes without --ray"),
    (["--devices", "0,0"], "--devices 0,0: GPU 0 is given twice"),
    (["--devices", "0,1"], "--devices 0,1: --backend ort-cpu runs on the CPU"),
    (["--ray", "--autoscaling", "{max: 4}"], "--autoscaling: not JSON"),
    (["--ray", "--autoscaling", "[1, 2]"], "JSON object"),
    (["--max-batch", "0"], "--max-batch 0"),
    (["--port", "70000"], "--port 70000"),
    (["--max-wait-ms", "nan"], "--max-wait-ms nan: expected a finite number"),  # a batch that never closes: a hang
    (["--max-wait-ms", "-1"], "--max-wait-ms -1"),
    (["--timeout-s", "-1"], "--timeout-s -1: expected a number above 0"),
    (["--max-body-mb", "0"], "--max-body-mb 0: expected a number above 0"),
    (["--lora-dir", "/nowhere/at/all"], "--lora-dir /nowhere/at/all: not a folder"),
])
def test_serve_bad_flags_are_one_line(tiny_engine, argv, says, capsys):
    from sdxl_trt.runtime.cli import main

    assert main(["serve", str(tiny_engine), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err, err


def test_serve_on_a_missing_directory_says_so_before_starting(tmp_path, capsys):
    from sdxl_trt.runtime.cli import main

    assert main(["serve", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_batcher_survives_a_request_that_times_out_while_waiting_for_company():
    """Batcher logic alone, with a stand-in pipeline that records its calls (the real one is tested above)."""
    import asyncio
    from types import SimpleNamespace

    from sdxl_trt.runtime.server import Batcher, Job, Limits, Metrics

    calls = []

    def pipe(prompts, negatives, seed, image, progress, **kwargs):
        calls.append(list(prompts))
        return SimpleNamespace(images=[f"image of {p}" for p in prompts], timings={"base": 0.01})

    async def scenario():
        batcher = Batcher(pipe, Limits(max_batch=4, max_wait_ms=300, timeout_s=0.05), Metrics())
        batcher.start()
        lonely = Job("lonely", None, 1, [1], {"num_inference_steps": 2})
        future = batcher.submit(lonely)
        try:
            await asyncio.wait_for(asyncio.shield(future), 0.05)
        except asyncio.TimeoutError:
            batcher.cancel(lonely)  # what the endpoint does on its timeout
        await asyncio.sleep(0.4)  # the worker's wait for company ends with its first job gone
        jobs = [Job(p, None, 1, [i], {"num_inference_steps": 2}) for i, p in enumerate(["a", "b"])]
        results = await asyncio.wait_for(asyncio.gather(*(batcher.submit(j) for j in jobs)), 10)
        await batcher.stop()
        return results

    results = asyncio.run(scenario())
    assert [r[0] for r in results] == [["image of a"], ["image of b"]] and results[0][3] == 2  # merged, answered
    assert calls == [["a", "b"]]  # the timed-out request never ran


def test_a_merged_batch_that_runs_out_of_memory_runs_again_request_by_request():
    """Batcher logic alone: a merged call that runs out of device memory (OutOfMemory) is tried again one request at
    a time, so each request gets its image."""
    import asyncio
    from types import SimpleNamespace

    from sdxl_trt.runtime.errors import OutOfMemory
    from sdxl_trt.runtime.server import Batcher, Job, Limits, Metrics

    calls = []

    def pipe(prompts, negatives, seed, image, progress, **kwargs):
        calls.append(list(prompts))
        if len(prompts) > 1:
            raise OutOfMemory("out of memory: lower height and width or n")
        return SimpleNamespace(images=[f"image of {p}" for p in prompts], timings={"base": 0.01})

    async def scenario():
        batcher = Batcher(pipe, Limits(max_batch=4, max_wait_ms=200), Metrics())
        jobs = [Job(p, None, 1, [i], {"num_inference_steps": 2}) for i, p in enumerate(["a", "b"])]
        futures = [batcher.submit(j) for j in jobs]  # both queued before the worker starts: merged
        batcher.start()
        results = await asyncio.wait_for(asyncio.gather(*futures), 10)
        await batcher.stop()
        return results

    results = asyncio.run(scenario())
    assert calls == [["a", "b"], ["a"], ["b"]]
    assert [r[0] for r in results] == [["image of a"], ["image of b"]]


def test_running_out_of_memory_answers_503_with_retry_after_and_the_server_goes_on():
    """Out of memory is the server's condition, not the request's: 503, Retry-After and the one-line reason; the
    next request is served."""
    from types import SimpleNamespace

    from starlette.testclient import TestClient

    from sdxl_trt.runtime.errors import OutOfMemory
    from sdxl_trt.runtime.server import create_app

    from sdxl_trt.runtime.resident import GIB, Resident

    class Stand:
        backend = SimpleNamespace(name="stand-in", resident=Resident(used=lambda: 3 * GIB, budget=8 * GIB,
                                                                     automatic=True))
        loras = ()
        manifest = SimpleNamespace(sha256="0" * 64, data={"sources": {}}, components={})
        roles, main_role, scheduler_config = {}, "base", {}

        def __call__(self, prompts, negatives, seed, image, progress, **kwargs):
            if prompts[0] == "too big":
                raise OutOfMemory("out of memory: lower height and width or n (CUDA failure 2: out of memory)")
            return SimpleNamespace(images=[Image.new("RGB", (64, 64))] * len(prompts), timings={"base": 0.01})

    with TestClient(create_app("stand-in", pipeline=Stand(), warmup=False)) as client:
        answer = client.post("/v1/images/generations", json={"prompt": "too big", "size": "64x64"})
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
        assert answer.json()["error"] == {"message": "out of memory: lower height and width or n (CUDA failure 2: "
                                                     "out of memory)", "type": "unavailable"}
        assert client.post("/v1/images/generations", json={"prompt": "a kite", "size": "64x64"}).status_code == 200
        answer = client.get("/health")
        assert answer.status_code == 200 and answer.json()["device_gib"] == 3.0
        assert {k: answer.json()[k] for k in ("budget_gib", "budget", "evictions")} == \
            {"budget_gib": 8.0, "budget": "automatic", "evictions": 0}


def test_health_answers_503_while_the_sizes_warm_up_and_200_after():
    """Warm-up runs after startup: /health says 503 "warming up" (and requests get 503) until every resident size's
    sessions and graphs are made, then 200. A stand-in pipeline whose warm-up waits for the test."""
    import threading
    from types import SimpleNamespace

    from starlette.testclient import TestClient

    from sdxl_trt.runtime.server import create_app

    release, warmed = threading.Event(), []

    class Stand:
        backend = SimpleNamespace(name="stand-in")
        loras = ()
        # what the server reads to describe its PNGs (metadata.generation_record)
        manifest = SimpleNamespace(sha256="0" * 64, data={"sources": {}}, components={})
        roles, main_role, scheduler_config = {}, "base", {}

        def warm_up(self):
            assert release.wait(30)
            warmed.append(True)
            return {"64x64": 0.01}

        def __call__(self, prompts, negatives, seed, image, progress, **kwargs):
            return SimpleNamespace(images=[Image.new("RGB", (64, 64))] * len(prompts), timings={"base": 0.01})

    with TestClient(create_app("stand-in", pipeline=Stand())) as client:
        answer = client.get("/health")
        assert answer.status_code == 503 and answer.json()["status"] == "warming up"
        assert client.post("/v1/images/generations", json={"prompt": "a kite", "size": "64x64"}).status_code == 503
        release.set()
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        answer = client.get("/health").json()
        assert warmed and answer["status"] == "ok" and answer["warmup_s"] >= 0
        assert client.post("/v1/images/generations", json={"prompt": "a kite", "size": "64x64"}).status_code == 200


@pytest.mark.parametrize("argv, says", [
    (["--buckets", "1024x1020", "--backend", "ort-cuda"], "--buckets '1024x1020'"),
    (["--buckets", "1024x1024", "--backend", "ort-cpu"], "--backend ort-cuda"),
    (["--max-device-memory", "0", "--backend", "ort-cuda"], "--max-device-memory 0"),
    (["--max-device-memory", "nan", "--backend", "ort-cuda"], "--max-device-memory nan"),
])
def test_resident_flags_are_checked_before_anything_loads(tiny_engine, argv, says, capsys):
    from sdxl_trt.runtime.cli import main

    for command in (["serve", str(tiny_engine)], ["generate", str(tiny_engine), "a kite"]):
        assert main([*command, *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err


@pytest.mark.parametrize("replicas, autoscaling, per_replica, gpus, says", [
    (4, None, 2, 4, "4 replicas × 2 GPUs need 8 GPUs; this machine shows 4"),
    (1, None, 1, 0, "1 replica × 1 GPU need 1 GPU; this machine shows 0"),
    (1, {"min_replicas": 3, "max_replicas": 8}, 1, 2, "3 replicas × 1 GPU need 3 GPUs; this machine shows 2"),
    (2, None, 2, 4, None),
    (1, {"min_replicas": 1, "max_replicas": 8}, 1, 4, None),
])
def test_serve_ray_checks_its_gpus_before_ray_starts(monkeypatch, replicas, autoscaling, per_replica, gpus, says):
    """A replica Ray cannot place leaves Serve waiting for ever: the GPUs the replicas ask for are counted against
    the ones this process sees before Ray starts; a local Ray is then given exactly those."""
    from sdxl_trt.runtime import cuda, serve_ray
    from sdxl_trt.runtime.errors import UserError

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(cuda, "device_count", lambda: gpus)
    if says is None:
        assert serve_ray.local_gpus("ort-cuda", replicas, autoscaling, per_replica) == gpus
        return
    with pytest.raises(UserError, match=r"--backend ort-cuda --ray: " + says):
        serve_ray.local_gpus("ort-cuda", replicas, autoscaling, per_replica)
    assert serve_ray.local_gpus("ort-cpu", replicas, autoscaling, per_replica) is None
    monkeypatch.setenv("RAY_ADDRESS", "ray://elsewhere:10001")
    assert serve_ray.local_gpus("ort-cuda", replicas, autoscaling, per_replica) is None
