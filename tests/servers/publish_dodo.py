"""A dodo file publishing one synthetic flavor with the real publish tasks of pipeline.graph, as
`doit publish-<flavor>` does for the repo's flavors (which configure no clouds here).

Environment: COS_TEST_FLAVOR (name), COS_TEST_CLOUDS (JSON `clouds:` section),
COS_BUILD_DIR (where build/<flavor>/ with its manifest lives). Used by the doit-level
test and by bench/bench_cloud.py.
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline import log  # noqa: E402
from pipeline.config import FlavorPaths, build_root  # noqa: E402
from pipeline.graph import DigestChecker, FlavorContext, cloud_gc_tasks, publish_tasks  # noqa: E402
from tests.servers.fixtures import make_flavor  # noqa: E402

log.setup()

DOIT_CONFIG = {"dep_file": str(build_root() / ".doit-publish.db"), "backend": "sqlite3",
               "check_file_uptodate": DigestChecker, "verbosity": 2}

_flavor = make_flavor(json.loads(os.environ["COS_TEST_CLOUDS"]), name=os.environ["COS_TEST_FLAVOR"])
_ctx = FlavorContext(_flavor, FlavorPaths(_flavor), "0.1.0")


def task_publish():
    yield from publish_tasks(_ctx)


def task_cloud_gc():
    yield from cloud_gc_tasks([_ctx])
