"""GitHub Release of a flavor: `doit release-<flavor>` (issue 5).

plan.py prepares (local), sync.py makes the release match (network), github.py is the
Releases API client.

One release per tag v<version> holds every flavor and arch, so each file is named
per flavor/arch and each flavor owns one marked section of the release notes.
"""
from .plan import LIMIT_ENV, REPLACE_ENV, Asset, Plan, ReleaseError, part_size, prepare
from .sync import compare, merge_section, publish, release_stage

__all__ = ["LIMIT_ENV", "REPLACE_ENV", "Asset", "Plan", "ReleaseError", "compare", "merge_section",
           "part_size", "prepare", "publish", "release_stage"]
