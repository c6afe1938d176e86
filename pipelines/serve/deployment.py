"""The Ray Serve deployment: a `Replica` with Serve's multiplexed adapter cache and the HTTP app.

`@serve.multiplexed` is an LRU per replica keyed by user id, which also lets Serve route a
user's requests to a replica that has the adapter when the `serve_multiplexed_model_id` header
names the user. Everything else a replica does is the plain `Replica` (pipelines/serve/replica.py).
"""

from __future__ import annotations

import logging
import os
import time

from ray import serve

from p2p import logs
from pipelines.ray_setup import StoreCredentials, ensure_ray, store_remote_args
from pipelines.serve.api import build_api
from pipelines.serve.auth import Keys
from pipelines.serve.replica import Replica
from pipelines.serve.schemas import Limits
from pipelines.serve.store_access import StoreAccess
from pipelines.serve.users import Slot

log = logging.getLogger("ray.serve")
CACHE_SIZE = int(os.environ.get("P2P_ADAPTER_CACHE", "256"))


@serve.deployment(max_ongoing_requests=64)
@serve.ingress()
class P2PServer(Replica):
    def __init__(self, credentials: StoreCredentials, *args):
        credentials.install()  # before the store is opened: an argument, not the runtime env Ray displays
        super().__init__(*args)

    @serve.multiplexed(max_num_models_per_replica=CACHE_SIZE)
    async def get_slot(self, user_id: str) -> Slot:
        return await self.load_slot(user_id)

    def __serve_build_asgi_app__(self):
        return build_api(self)

    def __del__(self):
        self.close()


def build_app(store: str, hypernet_id: str | None = None, base: str | None = None, unknown_user: str = "base",
              replicas: int = 1, recheck_s: float = 5.0, max_batch_size: int = 16, batching: str = "continuous",
              batch_wait_s: float = 0.05, service_key: str | None = None, admin_key: str | None = None,
              limits: Limits | None = None, cpus_per_replica: float = 1):
    """The bound application: `serve.run(build_app(...))`.

    Keys: the arguments, else `P2P_SERVICE_KEY` / `P2P_ADMIN_KEY` (see pipelines/serve/auth.py),
    read here in the driver and passed to the replicas. Replicas get the driver's store settings (in
    the runtime env) and credentials (as an argument: Ray displays runtime envs).
    """
    options = {**store_remote_args(), "num_cpus": cpus_per_replica}  # torch uses this many threads
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "P2P_CACHE") if os.environ.get(k)}
    if env:
        options.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(env)
    deployment = P2PServer.options(num_replicas=replicas, ray_actor_options=options)
    keys = Keys.resolve(service_key, admin_key)
    return deployment.bind(StoreCredentials.of_driver(), store, hypernet_id, base, unknown_user, recheck_s, max_batch_size, batching, batch_wait_s,
                           keys, limits or Limits())


def start(store: str, host: str = "127.0.0.1", port: int = 8000, **kwargs) -> str:
    """Start Serve's HTTP proxy on host:port and deploy the app; returns the base URL once it answers."""
    StoreAccess(store, kwargs.get("hypernet_id"))  # an unreachable or empty store fails here, in one line
    ensure_ray()
    logs.to_file("ray.serve")  # configured on `import ray.serve`: else "Started Serve in namespace" reaches the terminal
    serve.start(http_options={"host": host, "port": port})
    logs.to_file("ray.serve")  # and again, should serve.start configure it anew
    serve.run(build_app(store, **kwargs), name="p2p", route_prefix="/", blocking=False)
    return f"http://{host}:{port}"


def run_server(store: str, host: str = "127.0.0.1", port: int = 8000, **kwargs) -> None:
    """`p2p serve`: serve until Ctrl-C, then shut Serve down."""
    url = start(store, host, port, **kwargs)
    keys = Keys.resolve(kwargs.get("service_key"), kwargs.get("admin_key"))
    auth = ("OPEN: no keys set (P2P_SERVICE_KEY, P2P_ADMIN_KEY), anyone can call every endpoint" if keys.open
            else f"service key {'set' if keys.service else 'NOT set'}, admin key {'set' if keys.admin else 'NOT set'}, "
                 f"end-user tokens {'on' if keys.tokens.enabled else 'off'}")
    print(f"p2p serve: {url}/v1 (OpenAI API; health {url}/healthz; docs {url}/docs); auth: {auth}; Ctrl-C stops",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()

