"""The trajectory API this project maintains: atroposlib 0.4.0's ``run-api`` protocol,
served oldest first, checked at the door, and kept on disk.

    python -m recipe.atropos.api --host 127.0.0.1 --port 9001 --db outputs/api.sqlite3

Environments and trainers speak to it exactly as to ``run-api``. What differs
(docs/atropos_integration.rst, "The trajectory API"):

* one batch is formed per ``GET /batch``, from the oldest groups (by policy version
  where a group names one, else by arrival); ``run-api`` forms every batch at once
  and serves the newest first;
* a group that cannot be trained or sent back as JSON (NaN, shapes that do not line
  up, token ids outside the vocabulary) is refused with 422, the field and the reason,
  and counted per environment (``GET /stats``);
* the queue, the step and the registrations live in SQLite (WAL): a restart, even
  after SIGKILL, loses no accepted group;
* it binds 127.0.0.1 unless told otherwise, and can require a shared token.
"""

from .app import create_app
from .store import Store

__all__ = ["Store", "create_app"]
