"""`sdxl-trt serve DIR --ray`: the same app (server.py) as a Ray Serve deployment, N replicas behind Ray's HTTP
proxy — same API, same checks; each replica loads the engines, batches its own requests and keeps its own metrics
(Ray's proxy spreads requests over the replicas; /metrics and /health answer for the replica that gets the request,
and name it by `replica`).

On a GPU backend each replica takes one GPU (`num_gpus: 1`); on `ort-cpu` half a CPU. `--autoscaling JSON` passes
Ray Serve's autoscaling_config through (e.g. '{"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2}')
instead of a fixed --replicas. Ray runs locally (a new instance) unless RAY_ADDRESS names a cluster. SIGTERM or
Ctrl-C shuts Serve down, which lets each replica finish its requests first.
"""

from __future__ import annotations

import signal
import time

from .errors import UserError


def serve_with_ray(engine_dir: str, backend: str, limits, host: str, port: int, replicas: int,
                   autoscaling: dict | None = None, resident: dict | None = None, gpus_per_replica: int = 1) -> None:
    """`resident`: Pipeline.load's buckets and max_device_memory for every replica. `gpus_per_replica`: GPUs Ray
    gives each replica (ort-cuda: with 2, each replica runs one image's guidance halves on its two GPUs, which Ray
    makes its GPUs 0 and 1 through CUDA_VISIBLE_DEVICES). The engine directory is checked
    here, in the driver, before Ray starts (manifest, the components serving needs, every file the backend reads): in a
    replica a broken directory would come back as Ray's "Deploying application failed" after its own traceback."""
    from .pipeline import Pipeline

    if gpus_per_replica < 1 or (gpus_per_replica > 1 and backend != "ort-cuda"):
        raise UserError(f"--gpus-per-replica {gpus_per_replica}: expected 1, or more with --backend ort-cuda")
    if (resident or {}).get("devices") is not None:
        raise UserError("--devices goes without --ray: Ray gives each replica its GPUs (--gpus-per-replica)")
    Pipeline.check_dir(engine_dir, backend)  # the replicas' hashing then finds the files' sha256 remembered
    gpus = local_gpus(backend, replicas, autoscaling, gpus_per_replica)
    try:
        import ray
        from ray import serve
    except ImportError:
        raise UserError("--ray needs Ray Serve: pip install 'ray[serve]'") from None
    from .server import create_app

    resident = {**(resident or {}), "devices": tuple(range(gpus_per_replica)) if backend == "ort-cuda" else None}

    def build():  # evaluated on each replica
        return create_app(engine_dir, backend=backend, limits=limits, warm_up_listening=False, **resident)

    actor = {"num_gpus": gpus_per_replica} if backend != "ort-cpu" else {"num_cpus": 0.5}
    options = {"name": "sdxl-trt", "ray_actor_options": actor, "max_ongoing_requests": limits.max_queue,
               "graceful_shutdown_timeout_s": limits.timeout_s}
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = replicas
    ray.init(include_dashboard=False, log_to_driver=False, **({"num_gpus": gpus} if gpus is not None else {}))
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True

    previous = signal.signal(signal.SIGTERM, on_signal), signal.signal(signal.SIGINT, on_signal)
    try:
        serve.start(http_options={"host": host, "port": port})
        app = serve.deployment(serve.ingress(build)(), **options).bind()
        serve.run(app, name="sdxl-trt", route_prefix="/", blocking=False)
        print(f"sdxl-trt serve: Ray Serve on http://{host}:{port} with "
              f"{'autoscaling ' + str(autoscaling) if autoscaling else f'{replicas} replicas'}", flush=True)
        while not stop["now"]:
            time.sleep(0.2)
    finally:
        serve.shutdown()
        ray.shutdown()
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


def local_gpus(backend: str, replicas: int, autoscaling: dict | None, gpus_per_replica: int) -> int | None:
    """The GPUs a local Ray instance is given (the ones this process sees, CUDA_VISIBLE_DEVICES honoured), checked
    against what the replicas ask: a replica Ray cannot place would leave Serve waiting for ever. None on `ort-cpu`
    and where RAY_ADDRESS names a cluster (its GPUs are not this machine's)."""
    import os

    from . import cuda

    if backend == "ort-cpu" or os.environ.get("RAY_ADDRESS"):
        return None
    gpus = cuda.device_count()
    first = replicas if not autoscaling else int(autoscaling.get("initial_replicas", autoscaling.get("min_replicas", 1)))
    wanted = first * gpus_per_replica
    if wanted > gpus:
        def n(count, what):
            return f"{count} {what}{'s' if count != 1 else ''}"

        raise UserError(f"--backend {backend} --ray: {n(first, 'replica')} × {n(gpus_per_replica, 'GPU')} need "
                        f"{n(wanted, 'GPU')}; this machine shows {gpus}"
                        + (" (CUDA_VISIBLE_DEVICES)" if os.environ.get("CUDA_VISIBLE_DEVICES") is not None else ""))
    return gpus
