"""Bad input, as a careless or a hostile user gives it (issue 13).

The corpus: each case is a real `doit list` (or `doit release-red`) with one bad
environment variable, flavor field or flavor file. Each must end with exit status 2,
one short message (under MAX_MESSAGE characters) that names the variable or field,
and no traceback; nothing is built. Then: secrets never reach output or logs, a
release to an unknown repository fails before compressing anything, and a symlink in
an overlay is never followed on the host.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import DOIT, REPO, run_doit

MAX_MESSAGE = 500
RED = (REPO / "flavors" / "red" / "flavor.yaml").read_text()


@dataclass
class Case:
    id: str
    names: str                       # what the message must name (variable, field or file)
    env: dict[str, str] = field(default_factory=dict)
    flavor: str | None = None        # red's flavor.yaml + this text
    replace: str | None = None       # red's flavor.yaml replaced by this text
    setup: str | None = None         # a function below that breaks the flavor tree
    hidden: str | None = None        # a value that must not be shown (a secret)


ENV_CASES = [
    Case("log-level-word", "COS_LOG", {"COS_LOG": "verbose"}),
    Case("sde-not-a-number", "SOURCE_DATE_EPOCH", {"SOURCE_DATE_EPOCH": "abc"}),
    Case("sde-negative", "SOURCE_DATE_EPOCH", {"SOURCE_DATE_EPOCH": "-1"}),
    Case("sde-before-1980", "SOURCE_DATE_EPOCH", {"SOURCE_DATE_EPOCH": "1000"}),
    Case("sde-huge", "SOURCE_DATE_EPOCH", {"SOURCE_DATE_EPOCH": "9" * 40}),
    Case("registry-spaces", "COS_REGISTRY", {"COS_REGISTRY": "not a host"}),
    Case("registry-port-too-big", "COS_REGISTRY", {"COS_REGISTRY": "127.0.0.1:99999"}),
    Case("registry-with-scheme", "COS_REGISTRY", {"COS_REGISTRY": "http://127.0.0.1:5000"}),
    Case("registry-namespace-upper", "COS_REGISTRY", {"COS_REGISTRY": "127.0.0.1:5000/My_Org/"}),
    Case("registry-password-newline", "COS_REGISTRY_PASSWORD", {"COS_REGISTRY_PASSWORD": "tok\nen-s3cret"},
         hidden="en-s3cret"),
    Case("flavors-dir-misspelt", "COS_FLAVORS_DIR", {"COS_FLAVORS_DIR": str(REPO / "flavours")}),
    Case("flavors-dir-is-a-file", "COS_FLAVORS_DIR", {"COS_FLAVORS_DIR": str(REPO / "README.md")}),
    Case("build-dir-under-a-file", "COS_BUILD_DIR", {"COS_BUILD_DIR": "/dev/null/build"}),
    Case("build-dir-newline", "COS_BUILD_DIR", {"COS_BUILD_DIR": "/tmp/a\nb"}),
    Case("version-space", "COS_VERSION", {"COS_VERSION": "1.2.3 beta"}),
    Case("version-huge", "COS_VERSION", {"COS_VERSION": "1" * 5000}),
    Case("mirror-no-scheme", "COS_DEBIAN_MIRROR", {"COS_DEBIAN_MIRROR": "mirror.invalid/debian"}),
    Case("no-cache-maybe", "COS_DOCKER_NO_CACHE", {"COS_DOCKER_NO_CACHE": "maybe"}),
    Case("dry-run-2", "COS_PUBLISH_DRY_RUN", {"COS_PUBLISH_DRY_RUN": "2"}),
    Case("replace-sentence", "COS_RELEASE_REPLACE", {"COS_RELEASE_REPLACE": "yes please"}),
    Case("asset-limit-1", "COS_RELEASE_MAX_ASSET_BYTES", {"COS_RELEASE_MAX_ASSET_BYTES": "1"}),
    Case("asset-limit-word", "COS_RELEASE_MAX_ASSET_BYTES", {"COS_RELEASE_MAX_ASSET_BYTES": "lots"}),
    Case("arch-i386", "COS_ARCH", {"COS_ARCH": "i386"}),
    Case("repository-hash", "GITHUB_REPOSITORY", {"GITHUB_REPOSITORY": "o/n#x"}),
    Case("repository-no-owner", "GITHUB_REPOSITORY", {"GITHUB_REPOSITORY": "just-a-name"}),
    Case("api-url-no-scheme", "GITHUB_API_URL", {"GITHUB_API_URL": "api.github.invalid"}),
    Case("api-url-ftp", "GITHUB_API_URL", {"GITHUB_API_URL": "ftp://127.0.0.1/api"}),
    Case("token-newline", "GITHUB_TOKEN", {"GITHUB_TOKEN": "ghp_firstHALFsecret\nsecondHALFsecret"},
         hidden="HALFsecret"),
    Case("token-space", "GITHUB_TOKEN", {"GITHUB_TOKEN": "ghp_spaced secretVALUE1"}, hidden="secretVALUE1"),
    Case("aws-secret-newline", "AWS_SECRET_ACCESS_KEY", {"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI\nK7MDENGbPxRfiCY"},
         hidden="K7MDENGbPxRfiCY"),
    Case("azure-secret-tab", "AZURE_CLIENT_SECRET", {"AZURE_CLIENT_SECRET": "azSECRETvalue\tmore"},
         hidden="azSECRETvalue"),
    Case("subscription-not-uuid", "AZURE_SUBSCRIPTION_ID", {"AZURE_SUBSCRIPTION_ID": "my-subscription"}),
    Case("arm-endpoint-no-scheme", "COS_AZURE_ARM_ENDPOINT", {"COS_AZURE_ARM_ENDPOINT": "127.0.0.1:8443"}),
    Case("gcp-endpoint-words", "COS_GCP_COMPUTE_ENDPOINT", {"COS_GCP_COMPUTE_ENDPOINT": "no scheme here"}),
]

FIELD_CASES = [
    Case("efi-size-0", "disk.efi", flavor="disk: {efi: {size_mib: 0}}"),
    Case("oem-size-bool", "disk.oem.size_mib", flavor="disk: {oem: {size_mib: true}}"),
    Case("recovery-size-string", "disk.recovery.size_mib", flavor="disk: {recovery: {size_mib: '2048'}}"),
    Case("bios-boot-0", "disk.bios_boot_mib", flavor="disk: {bios_boot_mib: 0}"),
    Case("state-size-huge", "disk.state.size_mib", flavor="disk: {state: {size_mib: 99999999999}}"),
    Case("level-bool", "squashfs.level", flavor="squashfs: {level: true}"),
    Case("level-99", "squashfs.level", flavor="squashfs: {level: 99}"),
    Case("cmdline-menuentry", "boot.cmdline",
         flavor='boot: {cmdline: "quiet\\n}\\nmenuentry evil {\\n  linux /x"}'),
    Case("cmdline-semicolon", "boot.cmdline", flavor="boot: {cmdline: 'quiet; reboot'}"),
    Case("cmdline-variable", "boot.cmdline", flavor="boot: {cmdline: 'root=$root'}"),
    Case("cmdline-huge", "boot.cmdline", flavor="boot: {cmdline: " + "a" * 3000 + "}"),
    Case("package-traversal", "packages.0", flavor="packages: ['../../../tmp']"),
    Case("package-unknown", "packages", flavor="packages: [cos-nothing]"),
    Case("packages-not-a-list", "packages", flavor="packages: cos-setup"),
    Case("image-registry", "image.registry", flavor="image: {registry: 'not a host'}"),
    Case("image-repository", "image.repository", flavor="image: {repository: 'UPPER/Case'}"),
    Case("build-arg-key", "image.build_args", flavor="image: {build_args: {'BAD KEY': x}}"),
    Case("build-arg-number", "image.build_args", flavor="image: {build_args: {HTTP_PROXY: 8080}}"),
    Case("version-long", "version", flavor="version: 1.2.3-" + "x" * 100),
    Case("version-word", "version", flavor="version: latest"),
    Case("description-newline", "description", replace=RED.replace("description:", 'description: "a\\nb" #')),
    Case("arch-number", "arch", flavor="arch: 64"),
    Case("live-label", "boot.live_label", flavor="boot: {live_label: 'cos live'}"),
    Case("efi-label-long", "disk.efi", flavor="disk: {efi: {label: COS_GRUB_LONG}}"),
    Case("aws-region", "clouds.aws.regions.0", flavor="clouds: {aws: {regions: ['us east 1']}}"),
    Case("aws-account", "clouds.aws.share_with_accounts.0",
         flavor="clouds: {aws: {regions: [us-east-1], share_with_accounts: ['12']}}"),
    Case("aws-workers-bool", "clouds.aws.workers", flavor="clouds: {aws: {regions: [us-east-1], workers: true}}"),
    Case("aws-bucket", "clouds.aws.bucket",
         flavor="clouds: {aws: {regions: [us-east-1], upload: s3-import, bucket: 'My Bucket'}}"),
    Case("gcp-project", "clouds.gcp.project", flavor="clouds: {gcp: {project: 'My Project', bucket: b}}"),
    Case("gcp-label", "clouds.gcp.labels", flavor="clouds: {gcp: {project: p, bucket: b, labels: {Team: A}}}"),
    Case("azure-location", "clouds.azure.location",
         flavor="clouds: {azure: {resource_group: rg, location: 'West Europe', storage_account: s}}"),
    Case("azure-subscription", "clouds.azure.subscription_id",
         flavor="clouds: {azure: {resource_group: rg, location: l, storage_account: s, subscription_id: x}}"),
    Case("base-ref-shell", "base.ref", replace=RED.replace("ref: debian:bookworm", "ref: 'debian:bookworm; rm -rf /'")),
    Case("bootstrap-mirror-no-scheme", "base.bootstrap.mirror",
         replace=RED.replace("suite: bookworm", "suite: bookworm\n    mirror: mirror.invalid/debian")),
    Case("suite-traversal", "base.bootstrap.suite", replace=RED.replace("suite: bookworm", "suite: ../x")),
]


def _not_utf8(fdir: Path) -> None:
    (fdir / "red" / "flavor.yaml").write_bytes(RED.encode() + b"\ndescription2: caf\xe9\n")


def _directory(fdir: Path) -> None:
    (fdir / "red" / "flavor.yaml").unlink()
    (fdir / "red" / "flavor.yaml").mkdir()


def _fifo(fdir: Path) -> None:  # reading it would block forever
    (fdir / "red" / "flavor.yaml").unlink()
    os.mkfifo(fdir / "red" / "flavor.yaml")


def _duplicate_key(fdir: Path) -> None:
    (fdir / "red" / "flavor.yaml").write_text(RED + "distro: fedora\n")


def _alias_bomb(fdir: Path) -> None:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    (fdir / "red" / "flavor.yaml").write_text("\n".join(lines) + "\n" + RED)


def _huge(fdir: Path) -> None:
    (fdir / "red" / "flavor.yaml").write_text(RED + "".join(f"# {'x' * 70}\n" for _ in range(2000)))


def _top_level_list(fdir: Path) -> None:
    (fdir / "red" / "flavor.yaml").write_text("- description\n- distro\n")


def _bad_yaml(fdir: Path) -> None:
    (fdir / "red" / "flavor.yaml").write_text(RED + "squashfs: {level: [\n")


def _dockerfile_outside(fdir: Path) -> None:
    (fdir / "red" / "Dockerfile").unlink()
    (fdir / "red" / "Dockerfile").symlink_to("/etc/hostname")


def _overlay_outside(fdir: Path) -> None:
    shutil.rmtree(fdir / "red" / "overlay")
    (fdir / "red" / "overlay").symlink_to("/etc")


def _bad_flavor_name(fdir: Path) -> None:
    shutil.copytree(fdir / "red", fdir / "Red_Copy")


def _no_defaults(fdir: Path) -> None:
    (fdir / "defaults.yaml").unlink()


FILE_CASES = [
    Case("not-utf8", "red/flavor.yaml", setup="_not_utf8"),
    Case("is-a-directory", "red/flavor.yaml", setup="_directory"),
    Case("is-a-fifo", "red/flavor.yaml", setup="_fifo"),
    Case("duplicate-key", "duplicate key 'distro'", setup="_duplicate_key"),
    Case("alias-bomb", "red/flavor.yaml", setup="_alias_bomb"),
    Case("huge-file", "red/flavor.yaml", setup="_huge"),
    Case("top-level-list", "red/flavor.yaml", setup="_top_level_list"),
    Case("not-yaml", "red/flavor.yaml", setup="_bad_yaml"),
    Case("dockerfile-outside", "red/Dockerfile", setup="_dockerfile_outside"),
    Case("overlay-outside", "red/overlay", setup="_overlay_outside"),
    Case("bad-flavor-name", "Red_Copy", setup="_bad_flavor_name"),
    Case("no-defaults", "defaults.yaml", setup="_no_defaults"),
]

CASES = ENV_CASES + FIELD_CASES + FILE_CASES


def test_the_corpus_is_large_and_spans_the_classes():
    assert len(CASES) >= 50 and len(ENV_CASES) >= 15 and len(FIELD_CASES) >= 15 and len(FILE_CASES) >= 10
    assert len({c.id for c in CASES}) == len(CASES)


def _flavors_copy(tmp_path: Path) -> Path:
    fdir = tmp_path / "flavors"
    shutil.copytree(REPO / "flavors", fdir, symlinks=True)
    return fdir


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_short_message_and_exit_2(case, tmp_path):
    build = tmp_path / "build"
    env = {"COS_BUILD_DIR": str(build), **case.env}
    if case.flavor is not None or case.replace is not None or case.setup:
        fdir = _flavors_copy(tmp_path)
        red = fdir / "red" / "flavor.yaml"
        if case.flavor is not None:
            red.write_text(RED + case.flavor + "\n")
        if case.replace is not None:
            red.write_text(case.replace)
        if case.setup:
            globals()[case.setup](fdir)
        env.setdefault("COS_FLAVORS_DIR", str(fdir))
    proc = subprocess.run([*DOIT, "list"], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out, out
    assert case.names in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: ") and "hint: " in proc.stderr, proc.stderr
    shown = proc.stderr.replace(f"{tmp_path}/", "")  # as a user sees it: paths relative to the checkout
    assert len(shown) < MAX_MESSAGE, f"{len(shown)} characters:\n{shown}"
    if case.hidden:
        assert case.hidden not in out
    assert not any(build.rglob("*.json")), "something was built"


def test_doit_list_on_a_fresh_checkout_lists_the_graph(tmp_path):
    """No build directory yet (a fresh clone): doit keeps its state there; it is made."""
    build = tmp_path / "fresh" / "build"
    proc = run_doit("list", env={"COS_BUILD_DIR": str(build)}, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "build-red" in proc.stdout and "release-red" in proc.stdout and "Traceback" not in proc.stderr


def test_a_real_bug_still_shows_its_traceback(tmp_path):
    """Only user input is turned into a message: a bug in a stage keeps its traceback."""
    script = tmp_path / "dodo.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\n"
                      "from pipeline.graph import stage_action\n"
                      "def boom():\n    return {}['missing']\n"
                      "def task_boom():\n    return {'actions': [stage_action(boom)]}\n")
    proc = subprocess.run([*DOIT[:-2], "-f", str(script), "boom"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr + proc.stdout and "KeyError" in proc.stderr + proc.stdout


# ---- secrets ----

from tests.servers.fixtures import aws, cloud_build_dir, flavor_paths, make_flavor, moto_server, server_logs  # noqa: E402,F401
from tests.servers.github_api import GitHubAPIServer  # noqa: E402
from tests.test_cloud_aws import run_dodo  # noqa: E402
from tests.test_release import env_for, make_build  # noqa: E402

TOKEN = "ghs_SeCrEtT0kenValue0123456789abcdef"
SECRETS = {"AWS_SESSION_TOKEN": "FwoGZXIvYXdzSeSsIoNtOkEn0123456789", "AZURE_CLIENT_SECRET": "azure~client~SECRET~42xyz",
           "AZURE_STORAGE_CONNECTION_STRING": "DefaultEndpointsProtocol=https;AccountName=acct;"
                                              "AccountKey=QUNDT1VOVEtFWXNlY3JldA==;EndpointSuffix=core.windows.net"}


def _leaks(text: str, values: list[str]) -> list[str]:
    return [v for v in values if v in text]


def _files_text(root: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in root.rglob("*")
                     if p.is_file() and p.stat().st_size < 1 << 20)


def test_no_secret_reaches_any_output_or_log(tmp_path, aws, cloud_build_dir):
    """release and publish with secrets set: a good token, a bad one, one with a newline;
    none of the values is in stdout, stderr or any file the runs wrote."""
    values = [TOKEN, *SECRETS.values(), "QUNDT1VOVEtFWXNlY3JldA==", "SECONDhalfOFtoken"]
    gh = GitHubAPIServer(token=TOKEN).start()
    try:
        build = make_build(tmp_path / "build")
        # a misbehaving proxy that echoes the token into its error: once (a retry warning
        # is logged), then on every attempt of a second run (the failure message)
        gh.inject("GET", r"/releases/tags/", status=502, message=f"upstream saw token {TOKEN}")
        first = run_doit("release-red", env={**env_for(gh, build), "GITHUB_TOKEN": TOKEN, **SECRETS}, check=False)
        outputs = [first]
        gh.inject("GET", r"/releases/tags/", status=502, times=5, message=f"upstream saw token {TOKEN}")
        outputs.append(run_doit("release-red", env={**env_for(gh, build), "GITHUB_TOKEN": TOKEN}, check=False))
        assert outputs[0].returncode == 0 and "retry 1/4" in outputs[0].stderr, outputs[0].stderr
        assert outputs[1].returncode == 1 and "failed after 5 attempts" in outputs[1].stdout, outputs[1].stdout
        for token, debug in ((TOKEN, "DEBUG"), ("ghs_WrongTokenButSecret9876", "INFO"),
                             ("ghs_firstHALF\nSECONDhalfOFtoken", "INFO")):
            proc = run_doit("release-red", env={**env_for(gh, build), "GITHUB_TOKEN": token, "COS_LOG": debug,
                                                **SECRETS}, check=False)
            outputs.append(proc)
        assert outputs[2].returncode == 0, outputs[2].stderr
        assert outputs[3].returncode == 1 and "GITHUB_TOKEN is missing or lacks" in outputs[3].stdout
        assert outputs[4].returncode == 2 and "GITHUB_TOKEN" in outputs[4].stderr
        values.append("ghs_WrongTokenButSecret9876")
        # publishing too: the AWS secret key and session token are the SDK's credentials
        clouds = {"aws": {"regions": ["us-east-1"], "workers": 4}}
        flavor_paths(make_flavor(clouds, name="secrets"))
        aws_secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYsEcReT"
        pub = run_dodo("publish-secrets", env={"COS_TEST_FLAVOR": "secrets", "COS_TEST_CLOUDS": str(clouds).replace(
            "'", '"'), "AWS_SECRET_ACCESS_KEY": aws_secret, "COS_LOG": "DEBUG", **SECRETS})
        assert pub.returncode == 0, pub.stderr
        values.append(aws_secret)
        outputs.append(pub)
    finally:
        gh.stop()
    text = "\n".join(p.stdout + p.stderr for p in outputs) + _files_text(tmp_path) + _files_text(cloud_build_dir)
    assert not _leaks(text, values)


def test_redaction_covers_escaped_and_split_forms(monkeypatch):
    from core import env
    monkeypatch.setenv("GITHUB_TOKEN", "abcdef123\nsecond456")
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", "AccountName=a;AccountKey=S3cr3tK3y==;")
    text = ("header b'Bearer abcdef123\\nsecond456' then abcdef123 and second456; "
            "https://acct.blob/x?sv=1&sig=SAS%2Fsignature&se=2 AccountKey=S3cr3tK3y==")
    out = env.redact(text)
    for secret in ("abcdef123", "second456", "SAS%2Fsignature", "S3cr3tK3y=="):
        assert secret not in out, out
    assert "sv=1" in out and "se=2" in out


def test_redaction_hides_the_gcp_key_of_the_credentials_file(tmp_path, monkeypatch):
    import json

    from core import env
    key = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----\n"
    creds = tmp_path / "sa.json"
    creds.write_text(json.dumps({"type": "service_account", "private_key_id": "0123456789abcdef0123",
                                 "private_key": key, "client_email": "sa@p.iam"}))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(creds))
    out = env.redact(f"loaded key id 0123456789abcdef0123: {json.dumps(key)} and {key}")
    assert "0123456789abcdef0123" not in out and "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC" not in out, out


def test_log_filter_redacts_messages_and_tracebacks(monkeypatch):
    import logging

    from pipeline.log import REDACT
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "TopSecretKeyValue")
    try:
        raise RuntimeError("failed with TopSecretKeyValue")
    except RuntimeError:
        import sys
        record = logging.LogRecord("cos.x", logging.ERROR, __file__, 1, "key=%s", ("TopSecretKeyValue",),
                                   sys.exc_info())
    REDACT.filter(record)
    assert "TopSecretKeyValue" not in record.getMessage() + (record.exc_text or "")
    assert "RuntimeError" in (record.exc_text or "")


# ---- fail before expensive work ----

def test_release_to_an_unknown_repository_fails_before_compression(tmp_path):
    gh = GitHubAPIServer(token="good-token").start()
    try:
        build = make_build(tmp_path / "build")
        proc = run_doit("release-red", env={**env_for(gh, build), "GITHUB_REPOSITORY": "cos/no-such-repo"},
                        check=False)
    finally:
        gh.stop()
    assert proc.returncode != 0
    assert "404" in proc.stdout and "cos/no-such-repo" in proc.stdout, proc.stdout + proc.stderr
    assert not (build / "release").exists(), "compressed before checking the repository"
    assert gh.log and all(m == "GET" for m, _, _ in gh.log)


# ---- files of a flavor stay inside it ----

def test_overlay_symlink_is_a_link_not_a_host_dependency(tmp_path, monkeypatch):
    from pipeline.config import FlavorPaths, load_flavor
    from pipeline.graph import contexts, image_task
    fdir = _flavors_copy(tmp_path)
    link = fdir / "red" / "overlay" / "etc" / "stolen"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to("/etc/shadow")
    monkeypatch.setenv("COS_FLAVORS_DIR", str(fdir))
    paths = FlavorPaths(load_flavor("red"))
    assert link not in paths.context_files and Path("/etc/shadow") not in paths.context_files
    assert paths.context_links == {"overlay/etc/stolen": "/etc/shadow"}
    ctx = next(c for c in contexts() if c.name == "red")
    deps = [str(Path(d).resolve()) for d in image_task(ctx)["file_dep"]]
    assert not [d for d in deps if not d.startswith((str(fdir.resolve()), str(ctx.paths.build)))], deps
