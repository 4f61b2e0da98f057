"""An HTTP inference server for a trained CNC model (``cnc serve``): FastAPI routes, a request batcher, a web page.

Concurrent requests are gathered by :class:`~cnc_ad.deploy.serve.batcher.Batcher` into one model call, so the server's
throughput under load approaches in-process batch prediction. :func:`~cnc_ad.deploy.serve.app.create_app` builds the
application around a :class:`cnc_ad.Detector`; the web page (``static/index.html``) needs no build step. The server
needs the ``serve`` extra: ``pip install 'cnc-ad[serve]'``.
"""

from __future__ import annotations

from cnc_ad.deploy.serve.settings import ServeSettings

__all__ = ["ServeSettings"]
