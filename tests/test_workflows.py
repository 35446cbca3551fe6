"""The GitHub workflows are valid and only call the repo's own commands.

Proves: every .github/workflows/*.yml validates against the GitHub workflow JSON schema
(check-jsonschema's vendored copy, offline); every `run:` step calls only repo commands
(./dev, doit, .venv/bin/doit, bash .ci/run, the venv's python on bench/ or scripts/) or
a few plain shell utilities, so what CI does a user can run; the doit tasks, their
--options and the ./dev subcommands the workflows name exist; the release workflow runs
on v* tags over every flavor, builds before it publishes, uses OIDC for the clouds and
no stored cloud secret; CI runs `bash .ci/run` and writes the benchmark summary; the
cloud clean-up deletes only when explicitly enabled. The checker itself is tested on
commands it must refuse.
"""
from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

from pipeline.config import flavor_names
from tests.conftest import REPO, run_doit

WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"
AUDIT = REPO / "scripts" / "audit-workflows"
SHELL_UTILS = {"cat", "echo", "printf", "test", "true", "mkdir", "ls", "df", "du", "tee"}
EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


def load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    if True in data:  # YAML 1.1 reads the key `on` as a boolean
        data["on"] = data.pop(True)
    return data


def steps(wf: dict):
    for job_id, job in wf["jobs"].items():
        for step in job.get("steps", []):
            yield job_id, job, step


def matrix_values(job: dict) -> list[dict]:
    matrix = (job.get("strategy") or {}).get("matrix") or {}
    axes = {k: v for k, v in matrix.items() if isinstance(v, list)}
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())] or [{}]


def expand(script: str, values: dict) -> str:
    """Substitute ${{ matrix.x }}; any other expression becomes an opaque word."""
    def sub(m: re.Match) -> str:
        expr = m.group(1)
        if expr.startswith("matrix.") and expr[7:] in values:
            return str(values[expr[7:]])
        return "EXPR"
    return EXPR.sub(sub, script)


def commands(script: str) -> list[list[str]]:
    """Split a run: script into simple commands (argv lists) across ; && || | and lines."""
    script = script.replace("\\\n", " ")
    out = []
    for line in script.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        for part in re.split(r"\s*(?:;|&&|\|\||\|)\s*", line):
            words = shlex.split(part, comments=True)
            while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
                words.pop(0)  # VAR=value prefix
            words = list(itertools.takewhile(lambda w: not re.match(r"^\d?>>?|^<", w), words))
            if words:
                out.append(words)
    return out


def allowed(argv: list[str]) -> bool:
    cmd, args = argv[0], argv[1:]
    if cmd in ("./dev", "doit", ".venv/bin/doit") or cmd.startswith(("bench/", "scripts/")):
        return True
    if cmd == "bash":
        return args == [".ci/run"]
    if cmd == ".venv/bin/python":
        return bool(args) and (args[0].startswith(("bench/", "scripts/")) or args[:2] == ["-m", "pytest"])
    return cmd in SHELL_UTILS


def run_commands():
    for path in WORKFLOWS:
        for _job_id, job, step in steps(load(path)):
            if "run" in step:
                for values in matrix_values(job):
                    for argv in commands(expand(step["run"], values)):
                        yield path.name, step.get("name", step["run"]), argv


def test_there_are_the_three_workflows():
    assert {p.name for p in WORKFLOWS} >= {"ci.yml", "release.yml", "cloud-gc.yml"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_matches_github_schema(path):
    out = subprocess.run([str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.github-workflows", str(path)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_schema_check_catches_a_broken_workflow(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("name: x\non: push\njobs:\n  a:\n    steps:\n      - run: ./dev test\n")  # no runs-on
    out = subprocess.run([str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.github-workflows", str(bad)],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "runs-on" in out.stdout


def test_run_steps_call_only_repo_commands():
    bad = [f"{wf}: {name!r}: {shlex.join(argv)}" for wf, name, argv in run_commands() if not allowed(argv)]
    assert not bad, "run steps must call repo commands only:\n" + "\n".join(bad)


@pytest.mark.parametrize("script", [
    "curl -fsSL https://x | sh", "pip install foo", "docker build .", "sudo apt-get install -y qemu",
    ".venv/bin/python -c 'import os'", "python3 -m build", "bash -c 'make all'", "echo ok && npm ci",
])
def test_checker_refuses_foreign_commands(script):
    assert not all(allowed(argv) for argv in commands(script))


@pytest.mark.parametrize("script", [
    "./dev build red", "bash .ci/run", ".venv/bin/doit release-red", "COS_X=1 .venv/bin/doit cloud-gc --apply",
    ".venv/bin/python bench/summary.py --run > out.md", "cat out.md >> \"$GITHUB_STEP_SUMMARY\"",
])
def test_checker_accepts_repo_commands(script):
    assert all(allowed(argv) for argv in commands(script))


@cache
def doit_tasks() -> set[str]:
    out = run_doit("list", "--all")
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def test_named_doit_tasks_and_options_exist():
    seen = set()
    for wf, name, argv in run_commands():
        if argv[0] in ("doit", ".venv/bin/doit") or argv[:2] == ["./dev", "doit"]:
            words = argv[2:] if argv[0] == "./dev" else argv[1:]
            task, opts = words[0], [w for w in words[1:] if w.startswith("--")]
            assert task in doit_tasks(), f"{wf}: {name!r} runs doit task {task!r}, which `doit list` lacks"
            if opts and (task, tuple(opts)) not in seen:
                seen.add((task, tuple(opts)))
                help_text = run_doit("help", task).stdout
                for opt in opts:
                    assert opt in help_text, f"{wf}: doit {task} has no option {opt}"


def test_named_dev_subcommands_exist():
    dev = REPO / "dev"
    if not dev.is_file():
        if os.environ.get("CI"):
            pytest.fail("./dev is missing")
        pytest.skip("./dev is not in this tree yet")
    text = dev.read_text()
    for wf, name, argv in run_commands():
        if argv[0] == "./dev":
            assert re.search(rf"^\s*{re.escape(argv[1])}\)", text, re.M), \
                f"{wf}: {name!r} calls ./dev {argv[1]}, which ./dev does not handle"


def test_repo_scripts_the_workflows_call_exist():
    for wf, name, argv in run_commands():
        script = argv[1] if argv[0] == ".venv/bin/python" and argv[1] != "-m" else argv[0]
        if script.startswith(("bench/", "scripts/", ".ci/")) or (argv[0] == "bash" and argv[1:]):
            target = argv[1] if argv[0] == "bash" else script
            assert (REPO / target).is_file(), f"{wf}: {name!r} calls {target}, which does not exist"


USES_LINE = re.compile(r"^\s*(?:-\s+)?uses:\s*(?P<ref>[^\s#]+)\s*(?:#\s*(?P<comment>.*?)\s*)?$")
SHA_REF = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")
VERSION_TAG = re.compile(r"^v\d+\.\d+\.\d+(?:[-+][0-9A-Za-z.-]+)?$")


def pin_problem(line: str) -> str | None:
    """Why a `uses:` line is not pinned to a commit with its exact version in a comment."""
    m = USES_LINE.match(line)
    if not m:
        return "not a plain `uses: owner/repo@sha # vX.Y.Z` line"
    if m["ref"].startswith("./"):
        return None  # a local action is part of the checkout itself
    if not SHA_REF.match(m["ref"]):
        return f"{m['ref']} is not pinned to a full 40-hex commit SHA"
    if not (m["comment"] and VERSION_TAG.match(m["comment"])):
        return f"{m['ref']} lacks the version it pins in a comment (# vX.Y.Z)"
    return None


def uses_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if re.match(r"^\s*(?:-\s+)?uses:", line)]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_actions_are_pinned_to_a_commit_with_version_comment(path):
    lines = uses_lines(path)
    # every step's `uses` is on such a line (none hides in flow style or a quoted form)
    declared = sorted(s["uses"] for _, _, s in steps(load(path)) if "uses" in s)
    assert sorted(USES_LINE.match(line)["ref"] for line in lines if USES_LINE.match(line)) == declared
    bad = [f"{path.name}: {line.strip()}: {why}" for line in lines if (why := pin_problem(line))]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("line", [
    "      - uses: actions/checkout@v5",
    "        uses: actions/cache@main # v5.0.5",
    "        uses: actions/cache@27d5ce7 # v5.0.5",
    "        uses: actions/cache@27d5ce7f107fe9357f9df03efb73ab90386fccae",
    "        uses: actions/cache@27d5ce7f107fe9357f9df03efb73ab90386fccae # v5",
    "        uses: actions/cache@27d5ce7f107fe9357f9df03efb73ab90386fccae # cache",
    "        uses: 'actions/cache@27d5ce7f107fe9357f9df03efb73ab90386fccae' # v5.0.5",
])
def test_pin_checker_refuses(line):
    assert pin_problem(line)


@pytest.mark.parametrize("line", [
    "      - uses: actions/checkout@fbc6f3992d24b796d5a048ff273f7fcc4a7b6c09 # v5.1.0",
    "        uses: google-github-actions/auth@7c6bc770dae815cd3e89ee6cdf493a5fab2cc093  #  v3.0.0",
    "        uses: ./.github/actions/local",
])
def test_pin_checker_accepts(line):
    assert pin_problem(line) is None


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_checkouts_do_not_persist_credentials(path):
    checkouts = [s for _, _, s in steps(load(path)) if s.get("uses", "").startswith("actions/checkout@")]
    assert checkouts, f"{path.name} checks nothing out"
    for step in checkouts:
        assert (step.get("with") or {}).get("persist-credentials") is False, \
            f"{path.name}: a checkout leaves the token in .git/config; set persist-credentials: false"


def restores_cache(step: dict) -> bool:
    """A step that brings back state from an earlier run: actions/cache (or its restore
    half), a setup-* action's `cache:` input, or the docker image cache loader."""
    uses = step.get("uses", "")
    if uses.startswith(("actions/cache@", "actions/cache/restore@")):
        return True
    if "cache" in (step.get("with") or {}):
        return True
    return any(argv[:3] == [".venv/bin/python", "scripts/docker_cache.py", "load"]
               for argv in commands(step.get("run", "")))


@pytest.mark.parametrize("step", [
    {"uses": "actions/cache@27d5ce7f107fe9357f9df03efb73ab90386fccae", "with": {"path": "build", "key": "k"}},
    {"uses": "actions/cache/restore@27d5ce7f107fe9357f9df03efb73ab90386fccae", "with": {"key": "k"}},
    {"uses": "actions/setup-python@a26af69be951a213d495a4c3e4e4022e16d87065", "with": {"cache": "pip"}},
    {"run": ".venv/bin/python scripts/docker_cache.py load build/.docker-cache"},
])
def test_cache_checker_finds_restores(step):
    assert restores_cache(step)


def test_release_restores_no_cache():
    wf = load(REPO / ".github/workflows/release.yml")
    found = [s.get("name") or s.get("uses") or s.get("run") for _, _, s in steps(wf) if restores_cache(s)]
    assert not found, f"the release must build from its checkout only, not from caches other refs wrote: {found}"


def run_audit(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(root / "scripts" / "audit-workflows")], check=False, capture_output=True, text=True,
                          timeout=120)


def test_zizmor_audit_finds_nothing():
    out = run_audit(REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "No findings" in out.stdout


def test_zizmor_audit_fails_on_each_fault(tmp_path):
    """The same script on a copy of the repo layout whose release workflow has an unpinned
    action, a credential-persisting checkout and a cache: non-zero, each audit named."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "audit-workflows").symlink_to(AUDIT)
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    wf_dir = tmp_path / ".github" / "workflows"
    wf_dir.mkdir(parents=True)
    (wf_dir / "release.yml").write_text(
        "name: release\non:\n  push:\n    tags: ['v*']\npermissions: {}\njobs:\n  release:\n"
        "    name: release\n    runs-on: ubuntu-24.04\n    steps:\n"
        "      - uses: actions/checkout@v5\n"
        "      - uses: actions/cache@v5\n        with:\n          path: build\n          key: build\n"
        "      - run: ./dev build red\n")
    out = run_audit(tmp_path)
    assert out.returncode != 0
    for audit in ("unpinned-uses", "artipacked", "cache-poisoning"):
        assert audit in out.stdout, f"zizmor did not report {audit}:\n{out.stdout}{out.stderr}"


def test_release_workflow():
    wf = load(REPO / ".github/workflows/release.yml")
    assert wf["on"]["push"]["tags"] == ["v*"]
    assert wf["permissions"] == {"contents": "write", "id-token": "write", "packages": "write"}
    job = wf["jobs"]["release"]
    matrix = job["strategy"]["matrix"]
    assert sorted(matrix["flavor"]) == flavor_names(), "the release matrix must cover every flavor"
    assert set(matrix["arch"]) <= {"x86_64", "arm64"} and matrix["arch"]
    runs = [expand(s.get("run", ""), {"flavor": "red", "arch": "x86_64"}) for s in job["steps"]]
    order = [next(i for i, r in enumerate(runs) if r.startswith(prefix))
             for prefix in ("./dev setup", "./dev build red", ".venv/bin/doit publish-red",
                            ".venv/bin/doit release-red")]
    assert order == sorted(order), "steps must run setup -> build+boot test -> publish -> release"
    uses = {s["uses"].split("@")[0]: s for s in job["steps"] if "uses" in s}
    assert "role-to-assume" in uses["aws-actions/configure-aws-credentials"]["with"]
    assert "client-id" in uses["azure/login"]["with"] and "creds" not in uses["azure/login"]["with"]
    assert "workload_identity_provider" in uses["google-github-actions/auth"]["with"]
    release_step = job["steps"][order[-1]]
    assert release_step["env"]["GITHUB_TOKEN"] == "${{ secrets.GITHUB_TOKEN }}"
    # the OS image is pushed by the build step (build-<f>:push) when COS_REGISTRY is set,
    # with the job's token, so the release's images-*.txt names it by registry digest
    assert job["env"]["COS_REGISTRY"] == "${{ vars.COS_REGISTRY }}"
    build_env = job["steps"][order[1]]["env"]
    assert "secrets.GITHUB_TOKEN" in build_env["COS_REGISTRY_PASSWORD"] and build_env["COS_REGISTRY_USERNAME"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_no_stored_cloud_secrets(path):
    used = set(re.findall(r"secrets\.(\w+)", path.read_text()))
    assert used <= {"GITHUB_TOKEN"}, f"{path.name} uses stored secrets {used - {'GITHUB_TOKEN'}}; use OIDC"


def test_ci_workflow_runs_ci_and_summarises_benchmarks():
    wf = load(REPO / ".github/workflows/ci.yml")
    assert "pull_request" in wf["on"] and wf["on"]["push"]["branches"] == ["main"]
    job_steps = [s for _, _, s in steps(wf)]
    runs = [s.get("run", "").strip() for s in job_steps]
    assert "bash .ci/run" in runs
    assert any("bench/" in r for r in runs) and any("$GITHUB_STEP_SUMMARY" in r for r in runs)
    caches = [s for s in job_steps if s.get("uses", "").startswith("actions/cache@")]
    assert caches and caches[0]["with"]["path"] == "build"
    assert "flavors/**" in caches[0]["with"]["key"] and "packages/**" in caches[0]["with"]["key"]


def test_cloud_gc_deletes_only_when_enabled():
    wf = load(REPO / ".github/workflows/cloud-gc.yml")
    assert wf["on"]["schedule"]
    gc_steps = [s for _, _, s in steps(wf) if "cloud-gc" in s.get("run", "")]
    deleting = [s for s in gc_steps if "--apply" in s["run"]]
    dry = [s for s in gc_steps if "--apply" not in s["run"]]
    assert dry and deleting
    for s in deleting:
        assert "vars.COS_CLOUD_GC_APPLY == 'true'" in s["if"], "deleting must need the repository variable"
    for s in dry:
        assert "vars.COS_CLOUD_GC_APPLY != 'true'" in s["if"]


def test_bench_summary_renders_without_results():
    out = subprocess.run([sys.executable, str(REPO / "bench/summary.py")], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("## Benchmarks")
