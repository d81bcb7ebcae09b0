"""Scale-out on Ray Serve: N engine replicas behind one OpenAI endpoint.

Each replica is a plain `@serve.deployment` whose `@serve.ingress` app is the same FastAPI
app `enginesmith serve` runs (runtime/server.py) over its own LLM; Ray's proxy routes each
HTTP request to a replica (power-of-two-choices on queue length), holds at most
`max_ongoing_requests` in flight per replica, answers 429 with Retry-After past
`max_queued_requests` waiting at the proxy (back-pressure), restarts a replica whose
`check_health` (the engine loop's heartbeat) fails, and scales between `min_replicas` and
`max_replicas` with an `autoscaling_config`. Nothing here is cluster code of our own.

    enginesmith serve ENGINE_DIR --replicas 2            # this machine, a local Ray
    serve run enginesmith.runtime.serve_ray:app_builder engine_dir=ENGINE_DIR replicas=2

On several machines, `ray start --head` on one and `ray start --address HEAD:6379` on the
others, the engine directory copied to the same path on each, then either command on the head
(RAY_ADDRESS=auto joins the running cluster). docs/serving.md has the walk-through.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

from enginesmith.runtime.errors import BackendUnavailableError
from enginesmith.runtime.server import DEFAULT_HEALTH_TIMEOUT_S, RETRY_AFTER_S

# Requests in flight per replica: the engine's slots plus as many again waiting inside it, so
# its scheduler always has the next request at hand while Ray's router balances the rest.
ONGOING_PER_SLOT = 2


def _serve() -> Any:
    try:
        from ray import serve
    except ImportError as exc:
        raise BackendUnavailableError(
            "--replicas > 1 serves through Ray Serve, which is not installed: "
            'pip install "enginesmith[serve-ray]" (scripts/setup installs it)'
        ) from exc
    return serve


def build_app(
    engine_dir: str | Path,
    *,
    model_name: str,
    replicas: int = 2,
    api_key: str | None = None,
    max_queue: int = 256,
    threads: int | None = None,
    num_cpus: float = 1.0,
    autoscaling_config: dict[str, Any] | None = None,
) -> Any:
    """A Ray Serve Application: REPLICAS copies (or AUTOSCALING_CONFIG's range) of the engine
    in ENGINE_DIR, each with NUM_CPUS of Ray's CPUs, behind the OpenAI routes."""
    serve = _serve()
    from ray.serve.config import BackpressureConfig

    from enginesmith.runtime.engine_dir import read_manifest

    engine_dir = Path(engine_dir).expanduser().resolve()
    max_batch = int(read_manifest(engine_dir, verify_hashes=False)["max_batch"])

    @serve.ingress()
    class EnginesmithReplica:
        """One engine replica: loads the LLM, then serves runtime/server.py's app over it."""

        def __init__(self) -> None:
            from enginesmith.runtime.llm import LLM

            self.replica_id = serve.get_replica_context().replica_tag
            # spin_wait=False: spinning ORT workers starve the replica's event loop.
            self.llm = LLM(engine_dir, threads=threads, max_waiting=max_queue, spin_wait=False)

        def __serve_build_asgi_app__(self) -> Any:
            from enginesmith.runtime.server import create_app

            return create_app(
                self.llm, model_name=model_name, api_key=api_key, replica_id=self.replica_id
            )

        def check_health(self) -> None:
            """Ray restarts the replica when this raises: the engine loop stopped or hung."""
            age = self.llm.loop_heartbeat_age_s
            if age is None or age > DEFAULT_HEALTH_TIMEOUT_S:
                raise RuntimeError(f"engine loop not stepping (heartbeat age {age})")

    options: dict[str, Any] = {
        "name": "enginesmith",
        "max_ongoing_requests": ONGOING_PER_SLOT * max_batch,
        "max_queued_requests": max_queue,
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=RETRY_AFTER_S),
        "ray_actor_options": {"num_cpus": num_cpus},
        "health_check_period_s": 5,
    }
    if autoscaling_config is not None:
        options["autoscaling_config"] = autoscaling_config
    else:
        options["num_replicas"] = replicas
    return serve.deployment(**options)(EnginesmithReplica).bind()


def app_builder(args: dict[str, str]) -> Any:
    """For `serve run enginesmith.runtime.serve_ray:app_builder engine_dir=... [replicas=N]
    [model_name=...] [api_key=...] [max_queue=...] [threads=...] [num_cpus=...]
    [min_replicas=... max_replicas=... target_ongoing_requests=...]` (the last three set
    autoscaling instead of a fixed replica count)."""
    engine_dir = Path(args["engine_dir"]).expanduser().resolve()
    autoscaling = None
    if "max_replicas" in args:
        autoscaling = {
            "min_replicas": int(args.get("min_replicas", 1)),
            "max_replicas": int(args["max_replicas"]),
            "target_ongoing_requests": float(args.get("target_ongoing_requests", 4)),
        }
    return build_app(
        engine_dir,
        model_name=args.get("model_name", engine_dir.name),
        replicas=int(args.get("replicas", 2)),
        api_key=args.get("api_key"),
        max_queue=int(args.get("max_queue", 256)),
        threads=int(args["threads"]) if "threads" in args else None,
        num_cpus=float(args.get("num_cpus", 1.0)),
        autoscaling_config=autoscaling,
    )


def run(
    engine_dir: Path,
    *,
    replicas: int,
    host: str,
    port: int,
    model_name: str,
    api_key: str | None,
    max_queue: int,
    threads: int | None,
) -> int:
    """`enginesmith serve --replicas N`: start (or join, with RAY_ADDRESS) a Ray cluster, deploy
    the replicas, serve on HOST:PORT until SIGTERM/SIGINT, then shut Serve down and return 0."""
    serve = _serve()
    import ray

    app = build_app(
        engine_dir,
        model_name=model_name,
        replicas=replicas,
        api_key=api_key,
        max_queue=max_queue,
        threads=threads,
    )
    ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name="enginesmith", route_prefix="/")
        print(
            f"enginesmith: {replicas} replicas of {engine_dir} serving as `{model_name}` on "
            f"http://{host}:{port}/v1 through Ray Serve",
            flush=True,
        )
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
