"""``ddpm-rt serve``: an HTTP API and a web page over one shared :class:`Generator`.

Needs the ``serve`` extra (Starlette, uvicorn; python-multipart for the edits route's forms);
the runtime itself never imports this.
"""

from ddpm_rt.tools.serve.api import Limits
from ddpm_rt.tools.serve.app import create_app

__all__ = ["Limits", "create_app"]
