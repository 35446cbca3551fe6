"""doit entry point: `doit list` shows the graph, `doit build-red` builds a flavor.

All logic lives in pipeline/; this file only hands doit its configuration and tasks.
"""
import sys

from pipeline import log
from pipeline.config import build_root
from pipeline.errors import ConfigError
from pipeline.files import hold_build_lock
from pipeline.graph import DigestChecker, dodo_tasks

log.setup()

# Commands that only read the graph may run beside a build; anything else takes the lock.
READ_ONLY_COMMANDS = {"list", "info", "help", "graph", "dumpdb", "strace", "tabcompletion"}
if not (set(sys.argv[1:]) & READ_ONLY_COMMANDS):
    hold_build_lock(build_root())

DOIT_CONFIG = {
    "dep_file": str(build_root() / ".doit.db"),
    "backend": "sqlite3",                  # the default dbm falls back to a slow pure-python one here
    "check_file_uptodate": DigestChecker,  # sha256 cached by (size, mtime, inode): no re-hash of big files
    "verbosity": 2,                        # stream build logs as they come
    "default_tasks": ["usage"],
}

try:
    globals().update(dodo_tasks())
except ConfigError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)


def task_usage():
    """print how to use this pipeline"""
    return {"actions": ["echo 'usage: doit list  |  doit build-<flavor>  (see README.md)'"],
            "verbosity": 2}
