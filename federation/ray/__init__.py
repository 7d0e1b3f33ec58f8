"""The controller on Ray: the only package that imports `ray`.

Actors are thin wrappers around `federation.controller` classes; placement pins the state owner
(store and CA keys) to one node, while discovery agents may run anywhere.
"""

import os as _os

# Worker logs reach the controller's stderr (`log_to_driver`, see `driver.init_ray`) exactly as the
# workers wrote them: without Ray's "(Actor pid=…)" prefix, which would break a JSON line, and
# without Ray's de-duplication, which folds similar lines ("cluster east up", "cluster west up")
# into one. Ray reads both when it is imported, so they are set here, before any `import ray`.
_os.environ.setdefault("RAY_DISABLE_WORKER_LOG_PREFIX", "1")
_os.environ.setdefault("RAY_DEDUP_LOGS", "0")
