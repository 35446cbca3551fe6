"""The cos-setup runner: sources and their order, stages, failure semantics, the log,
dry-run, the CLI and the #cloud-config mapping."""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread

import pytest

from runtime.cloudconfig.cli import main
from runtime.cloudconfig.schema import expand
from runtime.cloudconfig.spec import SpecError

from .cloudconfig_root import log_of, root_fixture, stage, write_config  # noqa: F401 (a fixture)

REPO = Path(__file__).resolve().parents[2]


def marker_doc(tag: str, stage_name: str = "boot") -> str:
    return f"stages:\n  {stage_name}:\n    - commands: ['echo {tag} >> \"$COS_ROOT/order\"']\n"


def order(root: Path) -> list[str]:
    return (root / "order").read_text().split()


def tree(root: Path) -> dict[str, tuple[int, int, bytes]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_mode, st.st_mtime_ns, p.read_bytes() if p.is_file() else b"")
    return out


# -- sources ------------------------------------------------------------------------------
def test_sources_in_order_lexical_yaml_and_yml_only(root: Path) -> None:
    write_config(root, "/usr/local/cloud-config/00.yaml", marker_doc("usrlocal"))
    write_config(root, "/oem/20_b.yml", marker_doc("oem-b"))
    write_config(root, "/oem/10_a.yaml", marker_doc("oem-a"))
    write_config(root, "/oem/30_c.txt", marker_doc("ignored"))
    write_config(root, "/system/oem/90.yaml", marker_doc("system"))
    write_config(root, "/boot-extra/x.yaml", marker_doc("cmdline"))
    assert stage(root, "boot", cmdline="quiet cos.setup=/boot-extra/x.yaml console=ttyS0")
    assert order(root) == ["system", "oem-a", "oem-b", "usrlocal", "cmdline"]


@pytest.fixture
def http_file() -> Iterator[dict[str, bytes]]:
    """A plain HTTP server on 127.0.0.1 serving the dict's paths."""
    files: dict[str, bytes] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write(body or b"")

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Thread(target=httpd.serve_forever, daemon=True).start()
    files["__base__"] = f"http://127.0.0.1:{httpd.server_address[1]}".encode()
    yield files
    httpd.shutdown()
    httpd.server_close()


def test_cos_setup_url_and_missing_path(root: Path, http_file: dict[str, bytes]) -> None:
    base = http_file["__base__"].decode()
    http_file["/config.yaml"] = marker_doc("from-url").encode()
    assert stage(root, "boot", cmdline=f"cos.setup={base}/config.yaml")
    assert order(root) == ["from-url"]
    assert not stage(root, "boot", cmdline=f"cos.setup={base}/missing.yaml")
    assert f"cannot fetch cos.setup={base}/missing.yaml: Not Found" in log_of(root, "boot")
    assert not stage(root, "boot", cmdline="cos.setup=/nope.yaml")
    assert "cos.setup=/nope.yaml: FAILED: /nope.yaml does not exist" in log_of(root, "boot")


# -- stages ----------------------------------------------------------------------------------
def test_boot_stage_runs_before_main_after(root: Path) -> None:
    write_config(root, "/oem/10.yaml", marker_doc("after", "fs.after") + "  fs.before:\n"
                 "    - commands: ['echo before >> \"$COS_ROOT/order\"']\n  fs:\n"
                 "    - commands: ['echo main >> \"$COS_ROOT/order\"']\n")
    assert stage(root, "fs")
    assert order(root) == ["before", "main", "after"]
    assert stage(root, "fs.after")
    assert order(root) == ["before", "main", "after", "after"]


def test_stage_names() -> None:
    assert expand("network") == ["network.before", "network", "network.after"]
    assert expand("after-deploy") == ["after-deploy"]
    with pytest.raises(SpecError, match="unknown stage 'netwrok'"):
        expand("netwrok")


# -- failures ------------------------------------------------------------------------------
def test_bad_documents_are_logged_and_the_rest_runs(root: Path) -> None:
    write_config(root, "/oem/10_bad.yaml", "stages:\n  boot:\n    - commands: [oops\n")
    write_config(root, "/oem/20_stage.yaml", "stages:\n  bot:\n    - commands: [x]\n" + marker_doc("20")[8:])
    write_config(root, "/oem/30_key.yaml", "nmae: x\nstages: {}\n")
    write_config(root, "/oem/40_good.yaml", marker_doc("good"))
    assert not stage(root, "boot")
    assert order(root) == ["20", "good"]
    log = log_of(root, "boot")
    assert "/oem/10_bad.yaml: FAILED: invalid YAML at line 4" in log
    assert "/oem/20_stage.yaml: FAILED: stages: unknown stage 'bot'" in log
    assert "/oem/30_key.yaml: FAILED: document: unknown key 'nmae'" in log


def test_log_is_appended_per_run(root: Path) -> None:
    write_config(root, "/oem/10.yaml", marker_doc("x"))
    assert stage(root, "boot") and stage(root, "boot")
    assert log_of(root, "boot").count("stage boot: done") == 2


def test_dry_run_writes_nothing(root: Path) -> None:
    write_config(root, "/oem/10.yaml", """\
        stages:
          boot:
            - if: "false"
              files: [{path: /etc/new, content: x}]
              users: {alice: {passwd: pw, ssh_authorized_keys: [ssh-ed25519 AAAA]}}
              hostname: dry
              environment: {A: b}
              sysctl: {vm.swappiness: 1}
              commands: ["touch $COS_ROOT/ran"]
        """)
    before = tree(root)
    assert stage(root, "boot", dry_run=True)
    assert tree(root) == before


# -- CLI --------------------------------------------------------------------------------------
def test_cli_exit_codes_and_log(root: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    cmdline = tmp_path / "cmdline"
    write_config(root, "/extra.yaml", marker_doc("extra"))
    cmdline.write_text("root=LABEL=COS_ACTIVE cos.setup=/extra.yaml\n")
    assert main(["--root", str(root), "--cmdline", str(cmdline), "boot"]) == 0
    assert order(root) == ["extra"]
    write_config(root, "/oem/10.yaml", "stages:\n  boot:\n    - name: broken\n      commands: [exit 5]\n")
    assert main(["--root", str(root), "--cmdline", str(cmdline), "boot"]) == 1
    err = capfd.readouterr().err
    assert "/oem/10.yaml: boot: step 'broken': commands: FAILED: command exited 5: exit 5" in err
    assert "step 'broken': commands: FAILED" in log_of(root, "boot")
    assert main(["--root", str(root), "bogus"]) == 2
    assert "cos-setup: error: unknown stage 'bogus'" in capfd.readouterr().err
    assert main(["--root", str(root), "--cmdline", str(tmp_path / "none"), "boot"]) == 2


def test_cli_under_systemd_gives_journal_priorities(root: Path) -> None:
    write_config(root, "/oem/10.yaml", "stages:\n  boot:\n    - name: broken\n      commands: [exit 5]\n")
    proc = subprocess.run([sys.executable, "-m", "runtime.cloudconfig", "--root", str(root), "boot"], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "JOURNAL_STREAM": "8:1234"})
    assert proc.returncode == 1
    assert "<3>/oem/10.yaml: boot: step 'broken': commands: FAILED: command exited 5: exit 5\n" in proc.stderr
    assert "<6>stage boot: root" in proc.stderr


def test_cli_as_a_program_dry_run(root: Path) -> None:
    write_config(root, "/oem/10.yaml", "stages:\n  boot:\n    - files: [{path: /etc/motd, content: hi}]\n")
    proc = subprocess.run([sys.executable, "-m", "runtime.cloudconfig", "--root", str(root), "--dry-run", "boot"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "would write /etc/motd (2 bytes, mode 0644)" in proc.stderr
    assert not (root / "etc/motd").exists() and not (root / "run/cos").exists()


# -- the default config and #cloud-config ------------------------------------------------------
def test_default_config_and_oem_override(root: Path) -> None:
    default = (REPO / "packages/cos-oem/files/system/oem/00_default.yaml").read_text()
    write_config(root, "/system/oem/00_default.yaml", default)
    assert stage(root, "initramfs")
    hashed = next(line.split(":")[1] for line in (root / "etc/shadow").read_text().splitlines()
                  if line.startswith("root:"))
    check = subprocess.run(["openssl", "passwd", "-6", "-salt", hashed.split("$")[2], "cos"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert hashed == check
    assert (root / "etc/hostname").read_text() == "cos\n"
    write_config(root, "/oem/10_host.yaml", "stages:\n  initramfs:\n    - hostname: mine\n")
    assert stage(root, "initramfs")
    assert (root / "etc/hostname").read_text() == "mine\n"


CLOUD_CONFIG = """\
#cloud-config
hostname: cloudy
users:
  - default
  - name: carol
    groups: sudo, adm
    shell: /bin/bash
    lock_passwd: false
    passwd: "$6$salt$hash"
    sudo: "ALL=(ALL) NOPASSWD:ALL"
    ssh_authorized_keys: [ssh-ed25519 AAAACarol carol@x]
ssh_authorized_keys: [ssh-ed25519 AAAARoot root@x]
chpasswd:
  list: |
    root:rootpw
ssh_pwauth: true
write_files:
  - path: /etc/cc-file
    content: aGk=
    encoding: b64
    permissions: '0600'
    owner: carol:carol
bootcmd:
  - echo bootcmd >> "$COS_ROOT/order"
runcmd:
  - echo runcmd >> "$COS_ROOT/order"
  - [sh, -c, 'echo list-form >> "$COS_ROOT/order"']
packages: [vim]
"""


def test_cloud_config_mapping(root: Path) -> None:
    write_config(root, "/oem/50_user.yaml", CLOUD_CONFIG)
    assert stage(root, "initramfs")
    assert (root / "etc/hostname").read_text() == "cloudy\n"
    assert not (root / "etc/cc-file").exists()
    assert stage(root, "boot")
    assert order(root) == ["bootcmd"]
    passwd, shadow = (root / "etc/passwd").read_text(), (root / "etc/shadow").read_text()
    assert "carol:x:1000:1000::/home/carol:/bin/bash\n" in passwd and "carol:$6$salt$hash:" in shadow
    root_hash = next(line.split(":")[1] for line in shadow.splitlines() if line.startswith("root:"))
    assert root_hash.startswith("$6$") and not root_hash.startswith("!")
    assert "sudo:x:27:bob,carol\n" in (root / "etc/group").read_text()
    assert (root / "etc/sudoers.d/90-cloud-config-users").read_text() == "carol ALL=(ALL) NOPASSWD:ALL\n"
    assert (root / "home/carol/.ssh/authorized_keys").read_text() == "ssh-ed25519 AAAACarol carol@x\n"
    assert (root / "root/.ssh/authorized_keys").read_text() == "ssh-ed25519 AAAARoot root@x\n"
    assert "\nPasswordAuthentication yes\n" in (root / "etc/ssh/sshd_config.d/50-cos-pwauth.conf").read_text()
    cc = root / "etc/cc-file"
    assert cc.read_bytes() == b"hi" and cc.stat().st_mode & 0o777 == 0o600 and cc.stat().st_uid == 1000
    assert "#cloud-config keys not supported, ignored: packages" in log_of(root, "boot")
    assert stage(root, "network")
    assert order(root) == ["bootcmd", "runcmd", "list-form"]


def test_cloud_config_bad_input(root: Path) -> None:
    write_config(root, "/oem/50_user.yaml", "#cloud-config\nusers:\n  - name: dave\n    passwd: [1]\n")
    assert not stage(root, "boot")
    assert "/oem/50_user.yaml: boot: step 'cloud-config users': FAILED (not run): users.dave.passwd: " \
           "expected a string, got a list" in log_of(root, "boot")
    write_config(root, "/oem/50_user.yaml", "#cloud-config\nwrite_files: {path: /x}\n")
    assert not stage(root, "boot")
    assert "/oem/50_user.yaml: FAILED: write_files: expected a list" in log_of(root, "boot")


def test_runner_needs_only_the_stdlib_and_yaml(tmp_path: Path) -> None:
    """What the image has: the distro's python3 and PyYAML. The runner is imported from a
    copy of runtime/ alone, so no import of pipeline/, cloud/ or a PyPI package can hide."""
    import shutil

    shutil.copytree(REPO / "runtime", tmp_path / "runtime", ignore=shutil.ignore_patterns("__pycache__"))
    code = """if True:
        import pkgutil, sys
        sys.path.insert(0, sys.argv[1])  # as the image's launcher does
        import runtime.cloudconfig as cc
        for m in pkgutil.walk_packages(cc.__path__, "runtime.cloudconfig."):
            if not m.name.endswith("__main__"):
                __import__(m.name)
        # PyYAML's C loader brings Cython's runtime; a venv's site brings setuptools' hook
        extra = sorted(n for n in {m.split(".")[0] for m in sys.modules} - set(sys.stdlib_module_names)
                       - {"runtime", "yaml", "_yaml", "__main__", "cython_runtime", "_distutils_hack"}
                       if not n.startswith("_cython_"))
        print(" ".join(extra))
    """
    proc = subprocess.run([sys.executable, "-I", "-B", "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""
