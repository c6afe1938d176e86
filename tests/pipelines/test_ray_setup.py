"""What the driver hands to Ray: store settings in the runtime env, the secrets never.

Ray shows every runtime env in its dashboard, `ray list` and logs, so S3 credentials travel as
task arguments (`StoreCredentials`). That they still reach the workers is tested end to end by the
moto S3 refresh (test_store_refresh.py) and serving (test_serve.py) tests, whose credentials are
set after the cluster started.
"""

import os
import pickle

from pipelines.ray_setup import SECRET_ENV, STORE_ENV, StoreCredentials, store_remote_args
from pipelines.refresh_plan import arrow_fs
from pipelines.serve.deployment import build_app

SECRET = "s3cr3t-do-not-show"


def test_secrets_stay_out_of_every_runtime_env_and_travel_as_arguments(monkeypatch):
    for name in STORE_ENV + SECRET_ENV:  # the session's moto server sets some of them
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", SECRET + "-token")
    args = store_remote_args()
    assert args["runtime_env"]["env_vars"] == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    app = build_app("s3://bucket/store", service_key="svc", admin_key="adm")
    options = app._bound_deployment.ray_actor_options
    assert SECRET not in repr(options) and "AKIA-test" not in repr(options)
    assert options["runtime_env"]["env_vars"]["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"
    # The replica's first argument carries them; printed, it names the variables only.
    credentials = app._bound_deployment.init_args[0]
    assert isinstance(credentials, StoreCredentials) and SECRET not in repr(credentials)
    # A worker that starts without them gets them from the argument.
    shipped = pickle.loads(pickle.dumps(credentials))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name)
    shipped.install()
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET and os.environ["AWS_ACCESS_KEY_ID"] == "AKIA-test"
    # Ray Data's read tasks get the filesystem object, with the credentials inside it.
    fs = pickle.loads(pickle.dumps(arrow_fs("s3://bucket/users"))).handler.fs
    assert fs.key == "AKIA-test" and fs.secret == SECRET
    # Without credentials in the driver nothing is installed: the worker's own (an instance role) are used.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name)
    assert repr(StoreCredentials.of_driver()) == "StoreCredentials(none)"
    StoreCredentials.of_driver().install()
    assert "AWS_SECRET_ACCESS_KEY" not in os.environ
