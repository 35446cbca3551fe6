"""cloud/'s one error type. It subclasses pipeline.errors.PipelineError so doit tasks
show it as one clean failure; pipeline.errors is the only pipeline module cloud/ uses."""
from __future__ import annotations

from pipeline.errors import PipelineError


class PublishError(PipelineError):
    """A cloud call or check failed; the message names the cloud, resource and call."""
