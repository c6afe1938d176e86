"""Connect to a Ray cluster (RAY_ADDRESS / `ray job submit`) or start a local one."""

from __future__ import annotations

import contextlib
import logging
import os
import sys

import ray

from p2p import hub, logs
from p2p.errors import P2PError


class RayStartError(P2PError):
    """Ray could not be started or joined (a timeout, a wrong RAY_ADDRESS, bad resources)."""

    exit_code = 6


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster this job was submitted to, or start a local one on this machine.

    The local cluster advertises more logical CPUs than cores (P2P_RAY_CPUS, default 4 x cores,
    at least 8): training workers each hold a CPU for the whole run, and Ray Data's readers,
    join and actor pools need slots of their own or they wait forever. A failure to start or
    join is one `RayStartError` line (exit 6), not Ray's traceback.
    """
    if ray.is_initialized():
        return
    carried = ("HF_HUB_OFFLINE", hub.DOWNLOAD_ENV, "P2P_CACHE", logs.ENV, "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY")
    env = {"env_vars": {k: v for k, v in os.environ.items() if k in carried}}
    address = os.environ.get("RAY_ADDRESS")
    # Without --verbose, workers' output (DeepSpeed, GGUF bars, the Train controller's warnings)
    # stays in Ray's session logs and the driver's Ray loggers write to the command's log file.
    quiet = {"log_to_driver": logs.verbose()}
    logs.announce()
    logs.to_file("ray")
    logs.native_stderr_to_file()
    try:
        if address:
            ray.init(runtime_env=env, logging_level=logging.WARNING, **quiet)
        else:
            default = max(8, 4 * (os.cpu_count() or 2))
            ray.init(num_cpus=num_cpus or int(os.environ.get("P2P_RAY_CPUS", default)), include_dashboard=False,
                     logging_level=logging.WARNING, runtime_env=env, **quiet)
    except Exception as exc:
        what = f"join the Ray cluster at RAY_ADDRESS={address}" if address else "start a local Ray cluster"
        raise RayStartError(f"could not {what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                            ) from None
    logs.to_file("ray", "ray.data", "ray.train", "ray.serve")  # ray.init configures them again
    _cluster_events_to_file()
    ctx = ray.data.DataContext.get_current()
    # Ray 2.60's datasource V2 spends ~15 s in its ListFiles step per execution on machines
    # without outside network (measured here: 15 s vs 0.4 s to stream 320 rows); V1 reads the
    # same Parquet files at once.
    ctx.use_datasource_v2 = False
    # Surface our own errors (a DataError naming file, column and user) from map tasks, not
    # only their text inside Ray Data's generic UserCodeException.
    ctx.raise_original_map_exception = True
    # Ray Data's bars redraw many lines a second: useful on a terminal, noise in a log.
    ctx.enable_progress_bars = os.environ.get("P2P_PROGRESS", "1" if sys.stderr.isatty() else "0") == "1"


def _cluster_events_to_file() -> None:
    """Without --verbose, the raylet's events (e.g. "N PYTHON worker processes have been started")
    go to the log file too.

    Ray pushes them to the driver as error events, printed by a thread of `ray.init` through
    `print_to_stdstream`, whatever `log_to_driver` says; there is no setting for it, so the
    function is wrapped (looked up at call time by that thread). Other events still print.
    """
    path = os.environ.get(logs.FILE_ENV)
    worker = sys.modules.get("ray._private.worker")
    original = getattr(worker, "print_to_stdstream", None)
    if logs.verbose() or not path or original is None or getattr(original, "p2p_quiet", False):
        return

    def print_to_stdstream(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet":
            return original(data, ignore_prefix)
        with open(path, "a") as f:
            f.writelines(f"(raylet) {line}\n" for line in data.get("lines", []))

    print_to_stdstream.p2p_quiet = True
    worker.print_to_stdstream = print_to_stdstream


STORE_ENV = ("AWS_ENDPOINT_URL", "P2P_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE")
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def store_remote_args() -> dict:
    """`ray_remote_args` giving a job's tasks the driver's object-store settings (endpoint, region, profile).

    Workers of an already running cluster do not see variables the driver set after the cluster
    started; this carries them per actor pool. Never the secrets: Ray shows a runtime env in its
    dashboard, state API and logs. Those travel as a `StoreCredentials` argument instead.
    """
    env = {k: os.environ[k] for k in STORE_ENV if os.environ.get(k)}
    return {"runtime_env": {"env_vars": env}} if env else {}


class StoreCredentials:
    """The driver's S3 credentials, handed to a job's tasks and actors as an argument.

    An argument is serialized into the task itself, which Ray does not display, where a runtime
    env is shown to anyone with the dashboard or `ray list`. A task calls `install()` before it
    opens the store; without credentials in the driver it installs nothing and the worker's own
    (an instance role, its ~/.aws) are used, as before.
    """

    def __init__(self, values: dict[str, str]):
        self._values = dict(values)

    @classmethod
    def of_driver(cls) -> StoreCredentials:
        return cls({k: os.environ[k] for k in SECRET_ENV if os.environ.get(k)})

    def install(self) -> None:
        os.environ.update(self._values)

    def options(self) -> dict:
        """The same credentials as s3fs arguments (for a filesystem object made in the driver and sent to tasks)."""
        names = {"AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_SESSION_TOKEN": "token"}
        return {names[k]: v for k, v in self._values.items()}

    def __repr__(self) -> str:  # never the values, in a log or a trace
        return f"StoreCredentials({', '.join(sorted(self._values)) or 'none'})"


@contextlib.contextmanager
def user_errors():
    """Re-raise a P2PError thrown inside a Ray task or actor as one line, not Ray's wrapped trace."""
    try:
        yield
    except Exception as exc:
        inner = _innermost_user_error(exc)
        if inner is None or inner is exc:
            raise
        raise P2PError(str(inner).splitlines()[0]) from None


def _innermost_user_error(exc: BaseException | None) -> P2PError | None:
    """The original P2PError under Ray's wrappers (RayTaskError.cause, __cause__), if any."""
    found, seen = None, set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, P2PError) and not isinstance(exc, ray.exceptions.RayError):
            found = exc
        exc = getattr(exc, "cause", None) or exc.__cause__
    return found
