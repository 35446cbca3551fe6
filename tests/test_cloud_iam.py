"""The AWS IAM policy in docs/clouds.md is the one the code needs, checked by moto's
HTTP server with IAM enforcement on (INITIAL_NO_AUTH_ACTION_COUNT): an IAM user holding
exactly the documented policy (read from the doc's ```json block) publishes with EBS
direct to two regions with sharing and deprecation and runs `doit cloud-gc --apply`;
with any one action taken out, publish or cloud-gc fails with an error that names the
action and docs/clouds.md, and a failed publish leaves no snapshot behind.

moto checks actions, not Resource/Condition. Two moto gaps are bridged in the test proxy
(tests/servers/aws.py): EnableImageDeprecation (not implemented: answered after moto's
IAM check passed) and the signature of body-less CompleteSnapshot requests (re-signed
with the caller's own key; moto still checks ebs:CompleteSnapshot)."""
from __future__ import annotations

import copy
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from cloud.errors import PublishError
from pipeline import publish
from pipeline.config import FlavorContext
from tests.servers.aws import EmptyBodySigner, ImageDeprecations, MotoServer
from tests.servers.fixtures import CLEAR_ENV, cloud_build_dir, flavor_paths, make_flavor, server_logs  # noqa: F401
from tests.servers.proxy import FaultProxy

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "clouds.md"
BOOTSTRAP = 3  # unauthenticated requests moto allows: create the admin user, its policy, its key
ADMIN = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
REGIONS = ["us-east-1", "eu-west-1"]
_names = itertools.count(1)


def doc_policy() -> dict:
    """The ```json block of the doc's AWS IAM policy section."""
    section = DOC.read_text().split("### AWS IAM policy", 1)[1].split("\n### ", 1)[0]
    found = re.search(r"```json\n(.*?)\n```", section, re.S)
    assert found, f"{DOC}: no ```json block in the AWS IAM policy section"
    return json.loads(found.group(1))


def policy_actions(policy: dict) -> list[str]:
    return [a for s in policy["Statement"] for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])]


def without(policy: dict, action: str) -> dict:
    out = copy.deepcopy(policy)
    for statement in out["Statement"]:
        statement["Action"] = [a for a in statement["Action"] if a != action]
    out["Statement"] = [s for s in out["Statement"] if s["Action"]]
    return out


@pytest.fixture(scope="module")
def iam_moto(server_logs):
    """A separate moto that enforces IAM after BOOTSTRAP requests, which make an admin user;
    the server's own clients (state checks) then use the admin's key."""
    server = MotoServer(server_logs, env={"INITIAL_NO_AUTH_ACTION_COUNT": str(BOOTSTRAP)}, name="moto-iam")
    try:
        iam = server.client("iam")
        iam.create_user(UserName="cos-admin")
        iam.put_user_policy(UserName="cos-admin", PolicyName="all", PolicyDocument=json.dumps(ADMIN))
        key = iam.create_access_key(UserName="cos-admin")["AccessKey"]
        server.credentials = (key["AccessKeyId"], key["SecretAccessKey"])
        yield server
    finally:
        server.close()


class Publisher:
    """An IAM user with a given policy, whose key the SDK takes from the environment,
    reaching the enforcing moto through the recording proxy."""

    def __init__(self, moto: MotoServer, policy: dict, monkeypatch, build_dir: Path):
        self.moto = moto
        self.name = f"iam{next(_names)}"
        iam = moto.client("iam")
        iam.create_user(UserName=self.name)
        iam.put_user_policy(UserName=self.name, PolicyName="cos-publish", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=self.name)["AccessKey"]
        self.proxy = FaultProxy(moto.port)
        self.proxy.handlers += [EmptyBodySigner({key["AccessKeyId"]: key["SecretAccessKey"]}, self.proxy.forward),
                                ImageDeprecations(moto, self.proxy.forward)]
        for var in CLEAR_ENV:
            monkeypatch.delenv(var, raising=False)
        for var, value in {"AWS_ENDPOINT_URL": self.proxy.url, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                           "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_DEFAULT_REGION": REGIONS[0],
                           "AWS_EC2_METADATA_DISABLED": "true"}.items():
            monkeypatch.setenv(var, value)
        self.clouds = {"aws": {"regions": REGIONS, "workers": 4, "share_with_accounts": ["111122223333"],
                               "deprecate_after_days": 30},
                       "retention_keep": 1, "retention_orphan_hours": 0}
        self.flavor = make_flavor(self.clouds, name=self.name)
        self.build_dir = build_dir

    def publish(self, seed: int) -> dict:
        return publish.publish_stage(FlavorContext(self.flavor, flavor_paths(self.flavor, seed=seed), "0.1.0"), "aws")

    def leave_orphan(self) -> str:
        """What a killed publish leaves: a started, never completed snapshot (made as admin)."""
        tags = {"cos-flavor": self.name, "cos-image": f"cos-{self.name}-0.0.1-x86_64-000000000000"}
        return self.moto.client("ebs").start_snapshot(
            VolumeSize=1, Tags=[{"Key": k, "Value": v} for k, v in tags.items()])["SnapshotId"]

    def gc_doit(self, *args: str) -> subprocess.CompletedProcess:
        dodo = REPO / "tests" / "servers" / "publish_dodo.py"
        env = {**os.environ, "COS_TEST_FLAVOR": self.name, "COS_TEST_CLOUDS": json.dumps(self.clouds)}
        return subprocess.run([sys.executable, "-m", "doit", "-f", str(dodo), "--dir", str(REPO), "cloud-gc", *args],
                              capture_output=True, text=True, env=env, timeout=300)

    def gc(self) -> None:
        ctx = FlavorContext(self.flavor, flavor_paths(self.flavor, seed=2), "0.1.0")
        publish.gc([ctx], apply=True)

    def images(self, region: str) -> list[dict]:
        return self.moto.client("ec2", region).describe_images(
            Owners=["self"], Filters=[{"Name": "name", "Values": [f"cos-{self.name}-*"]}])["Images"]

    def snapshots(self, orphans_only: bool = False) -> set[str]:
        """This flavor's snapshots in the first region; orphans_only: those whose image does not exist."""
        snaps = self.moto.client("ec2").describe_snapshots(
            OwnerIds=["self"], Filters=[{"Name": "tag:cos-flavor", "Values": [self.name]}])["Snapshots"]
        names = {i["Name"] for i in self.images(REGIONS[0])} if orphans_only else None
        return {s["SnapshotId"] for s in snaps
                if names is None or {t["Key"]: t["Value"] for t in s["Tags"]}.get("cos-image") not in names}

    def close(self) -> None:
        self.proxy.close()


@pytest.fixture
def publisher(iam_moto, monkeypatch, cloud_build_dir):
    made = []

    def make(policy: dict) -> Publisher:
        made.append(Publisher(iam_moto, policy, monkeypatch, cloud_build_dir))
        return made[-1]
    yield make
    for p in made:
        p.close()


def test_moto_enforces_iam(iam_moto):
    """Precondition: without a known key, or without the permission, moto refuses."""
    import boto3
    anonymous = boto3.client("ec2", region_name=REGIONS[0], endpoint_url=iam_moto.url,
                             aws_access_key_id="testing", aws_secret_access_key="testing")
    with pytest.raises(ClientError, match="AuthFailure"):
        anonymous.describe_images(Owners=["self"])


def test_the_documented_policy_publishes_and_collects(publisher):
    policy = doc_policy()
    assert "ec2:RegisterImage" in policy_actions(policy) and "ebs:PutSnapshotBlock" in policy_actions(policy)
    user = publisher(policy)
    first = user.publish(seed=1)
    assert set(first["images"]) == set(REGIONS)
    assert len(user.proxy.seen(lambda r: r.action == "EnableImageDeprecation")) == 2
    assert len(user.proxy.seen(lambda r: "/snapshots/completion/" in r.path)) == 1
    second = user.publish(seed=2)
    orphan = user.leave_orphan()
    assert {first["snapshot"], second["snapshot"], orphan} <= user.snapshots()

    plan = user.gc_doit()
    assert plan.returncode == 0, plan.stderr
    gc = user.gc_doit("--apply")
    assert gc.returncode == 0, gc.stderr
    for region in REGIONS:  # retention_keep 1: the older image goes, in both regions
        assert [i["ImageId"] for i in user.images(region)] == [second["images"][region]]
    assert user.snapshots() == {second["snapshot"]}  # with its snapshot, and the orphan


FAST = {"ebs:PutSnapshotBlock", "ec2:RegisterImage", "ec2:DeregisterImage"}  # one per service/step; the rest: slow


def _actions():
    try:
        actions = policy_actions(doc_policy())
    except (AssertionError, OSError, ValueError):
        actions = ["(docs/clouds.md has no readable AWS policy)"]
    return [pytest.param(a, marks=() if a in FAST else pytest.mark.slow) for a in actions]


@pytest.mark.parametrize("action", _actions())
def test_each_documented_action_is_needed(publisher, action):
    user = publisher(without(doc_policy(), action))
    steps = [("publish", lambda: user.publish(seed=1)), ("publish", lambda: user.publish(seed=2)),
             ("orphan", user.leave_orphan), ("cloud-gc", user.gc)]
    failed = None
    for step, run in steps:
        try:
            run()
        except PublishError as exc:
            failed = (step, str(exc))
            break
    assert failed, f"publish and cloud-gc succeeded without {action}"
    step, text = failed
    assert f"not authorized to perform: {action}" in text
    assert "docs/clouds.md" in text  # the hint: check the IAM permissions listed there
    if step == "publish":  # a failed publish removes its snapshot unless an image already uses it
        assert user.snapshots(orphans_only=True) == set(), text
