"""``ray start`` for one node of the local cluster, with a registration wait that outlasts a busy machine.

``ray start`` waits a fixed 30 s (hard-coded in ``ray._private.node.Node``) for its raylet to
register with the GCS, then gives up. The raylet registers only after its Python agents (dashboard
agent, runtime-env agent) are up, and on a loaded 2-core machine their imports alone took longer
than that (CI: a worker node refused twice in a row). Ray offers no setting for it, so this runs
Ray's own CLI unchanged except that each lookup of the node keeps asking, up to
``CAROUSEL_RAY_REGISTRATION_WAIT_S`` (default 120 s; `carousel cluster up` waits 180 s for a node), before it reports the node missing.

    python -m carousel.cluster.ray_node start --block --address=... (any `ray start` arguments)
"""

from __future__ import annotations

import os
import sys
import time


def patient(get_node, wait_s: float, sleep=time.sleep, clock=time.monotonic):
    """``get_node`` that retries its "not registered yet" RuntimeError for up to ``wait_s``."""

    def get_node_patiently(*args, **kwargs):
        deadline = clock() + wait_s
        while True:
            try:
                return get_node(*args, **kwargs)
            except RuntimeError:
                if clock() >= deadline:
                    raise
                sleep(0.5)

    return get_node_patiently


def main() -> None:
    import ray._private.services as services
    from ray.scripts.scripts import main as ray_main

    services.get_node = patient(services.get_node, float(os.environ.get("CAROUSEL_RAY_REGISTRATION_WAIT_S", "120")))
    sys.argv[0] = "ray"
    ray_main()


if __name__ == "__main__":
    main()
