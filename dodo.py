"""doit entry point: `doit list` shows the graph, `doit build-red` builds a flavor.

All logic lives in pipeline/; this file only hands doit its configuration and tasks.
Every setting is checked here, before any task runs: a bad environment variable or
flavor file gives one short message and exit status 2, never a traceback.
"""
import sys

from core import env
from core.errors import HintedError
from pipeline import log
from pipeline.config import build_root
from pipeline.errors import ConfigError
from pipeline.files import hold_build_lock
from pipeline.graph import DigestChecker, dodo_tasks

# Commands that only read the graph may run beside a build; anything else takes the lock.
READ_ONLY_COMMANDS = {"list", "info", "help", "graph", "dumpdb", "strace", "tabcompletion"}


def _load() -> dict:
    env.check()
    log.setup()
    build = build_root()
    try:  # doit keeps its state here: a fresh checkout has no build/ yet (`doit list` too)
        build.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the build directory {env.shorten(str(build))}: {exc.strerror}",
                          "set COS_BUILD_DIR to a writable directory") from None
    if not (set(sys.argv[1:]) & READ_ONLY_COMMANDS):
        hold_build_lock(build)
    return dodo_tasks()


try:
    globals().update(_load())
except HintedError as exc:
    print(f"error: {env.redact(str(exc))}", file=sys.stderr)
    sys.exit(2)

DOIT_CONFIG = {
    "dep_file": str(build_root() / ".doit.db"),
    "backend": "sqlite3",                  # the default dbm falls back to a slow pure-python one here
    "check_file_uptodate": DigestChecker,  # sha256 cached by (size, mtime, inode): no re-hash of big files
    "verbosity": 2,                        # stream build logs as they come
    "default_tasks": ["usage"],
}


def task_usage():
    """print how to use this pipeline"""
    return {"actions": ["echo 'usage: doit list  |  doit build-<flavor>  (see README.md)'"],
            "verbosity": 2}
