"""The uwsfmt Jupyter server extension: REST endpoints for the JupyterLab panels.

Enabled on install through ``etc/jupyter/jupyter_server_config.d/jupyter_ext.json``; the routes
are listed in :mod:`jupyter_ext.server.handlers`.

>>> from jupyter_ext.server import handlers
>>> [r for r, _ in handlers.ROUTES][:3]
['config', 'store', 'errors']
"""

from __future__ import annotations

import atexit
from typing import Any

#: URL prefix under the server's base_url
PREFIX = "uwsfmt"


def _load_jupyter_server_extension(serverapp: Any) -> None:
    """Register the handlers (called by jupyter_server when the extension is enabled)."""
    from jupyter_server.utils import url_path_join

    # lazy: the extension is found and listed (`jupyter server extension list`) without importing
    # tornado handlers, uwsfmt or torch; they load when a server loads the extension
    from .handlers import ROUTES, StoreCache
    from .tasks import Jobs

    web_app = serverapp.web_app
    jobs = Jobs()
    stores = StoreCache()
    web_app.settings["uwsfmt_jobs"] = jobs
    web_app.settings["uwsfmt_stores"] = stores
    base = web_app.settings["base_url"]
    web_app.add_handlers(".*$", [(url_path_join(base, PREFIX, route), handler) for route, handler in ROUTES])
    serverapp.log.info("uwsfmt server extension: /%s/ endpoints registered", PREFIX)

    def _stop() -> None:
        jobs.cancel_all()
        stores.close()

    # cancel running jobs when the server process ends: their temporary builds are removed
    atexit.register(_stop)


# loaded as ``jupyter_ext.server`` or through the package ``jupyter_ext``
load_jupyter_server_extension = _load_jupyter_server_extension
