"""`p2p token issue`: an end-user token for one user id, signed with the server's `P2P_TOKEN_SECRET`.

The token goes to stdout alone (so `TOKEN=$(p2p token issue --user u1)` works); the server that
shares the secret answers its holder as that user only (pipelines/serve/tokens.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from p2p.userkey import canonical_user_id
from pipelines.serve.tokens import Tokens


def cmd_token(args: argparse.Namespace) -> int:
    user = canonical_user_id(args.user)
    token, expires = Tokens.resolve().issue(user, args.ttl)
    if args.json:
        print(json.dumps({"token": token, "user": user, "expires_at": expires}))
    else:
        print(token)
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expires))
        print(f"p2p token: for user {user!r}, expires {when}", file=sys.stderr)
    return 0
