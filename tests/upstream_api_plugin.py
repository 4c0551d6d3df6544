"""A pytest plugin that points atroposlib's own API tests at a chosen server on a free port.

Atropos's API tests (shipped inside the atroposlib wheel) start ``python -m
atroposlib.cli.run_api --port 8000`` and call ``http://localhost:8000``. Loaded with
``-p tests.upstream_api_plugin``, this plugin changes only those two things: the
command becomes the server under test (``$ATROPOS_API_UNDER_TEST``: ``recipe.atropos.api``
or ``run-api``) on ``$ATROPOS_API_PORT``, and the tests' requests go to that port.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import requests

UPSTREAM_URL = "http://localhost:8000"
UPSTREAM_MODULE = "atroposlib.cli.run_api"


def _server_command(port: str) -> list[str]:
    under_test = os.environ.get("ATROPOS_API_UNDER_TEST", "recipe.atropos.api")
    if under_test == "run-api":
        return [sys.executable, "-m", UPSTREAM_MODULE, "--host", "127.0.0.1", "--port", port]
    db = os.path.join(tempfile.mkdtemp(prefix="atropos-api-"), "api.sqlite3")
    return [sys.executable, "-m", "recipe.atropos.api", "--host", "127.0.0.1", "--port", port, "--db", db]


def pytest_configure(config):
    port = os.environ["ATROPOS_API_PORT"]
    target = f"http://127.0.0.1:{port}"
    original_popen = subprocess.Popen

    class ServerUnderTestPopen(original_popen):
        def __init__(self, args, *rest, **kwargs):
            if isinstance(args, (list, tuple)) and UPSTREAM_MODULE in args:
                args = _server_command(port)
            super().__init__(args, *rest, **kwargs)

    subprocess.Popen = ServerUnderTestPopen

    original_request = requests.Session.request

    def request(self, method, url, *args, **kwargs):
        if isinstance(url, str) and url.startswith(UPSTREAM_URL):
            url = target + url[len(UPSTREAM_URL) :]
        return original_request(self, method, url, *args, **kwargs)

    requests.Session.request = request
