"""What every AWS client of ours shares: its botocore config and the one conversion of
botocore errors into PublishError. A module of its own so cloud.aws and cloud.ebs_direct
(whose spawned worker processes import only it) need not import each other."""
from __future__ import annotations

from botocore.config import Config
from botocore.exceptions import ClientError

from .errors import PublishError


def client_config(workers: int) -> Config:
    """Explicit timeouts (uploads stall without them) and adaptive retries (throttling)."""
    return Config(connect_timeout=10, read_timeout=60, max_pool_connections=max(10, workers + 4),
                  retries={"mode": "adaptive", "max_attempts": 10})


def aws_error(exc: Exception, what: str) -> PublishError:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        detail = f"{err.get('Code')}: {err.get('Message')}"
        denied = err.get("Code") in ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException") or (
            exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 403 and "Signature" not in str(err))
        hint = "check the IAM permissions listed in docs/clouds.md" if denied else None
    else:
        detail, hint = str(exc), "check the credentials/endpoint (boto3 default chain, AWS_ENDPOINT_URL)"
    return PublishError(f"aws: {what} failed: {detail}", hint)
