"""cloud/'s one error type, on the shared base core.errors.HintedError (cloud/ needs
nothing from pipeline/); doit tasks show it as one clean failure."""
from __future__ import annotations

from core.errors import HintedError


class PublishError(HintedError):
    """A cloud call or check failed; the message names the cloud, resource and call."""
