"""`p2p serve`: an OpenAI-compatible Ray Serve app that answers each user with that user's adapter.

- `deployment.py`  the Ray Serve deployment (model, engine, adapter cache), `build_app`, `start`
- `api.py`         the FastAPI routes of one replica
- `completions.py` one completion / chat request: prompts, engine jobs, body or SSE stream
- `schemas.py`     request bodies and `Limits`; `responses.py` OpenAI's response shapes
- `auth.py`        service and admin keys, checked before the body is read
- `errors.py`      OpenAI-shaped errors for everything; `users.py` user naming, cache entries, locks
- `store_access.py` every store call, and the one place store errors are classified
"""

from pipelines.serve.deployment import P2PServer, build_app, run_server, start
from pipelines.serve.schemas import Limits

__all__ = ["Limits", "P2PServer", "build_app", "run_server", "start"]
