"""GCP publishing against fake-gcs-server (via STORAGE_EMULATOR_HOST) and a local
Compute REST server (via COS_GCP_COMPUTE_ENDPOINT; credentials from an ADC file):
the tar.gz goes up by resumable upload and reads back equal; images.insert carries
rawDisk.source, UEFI_COMPATIBLE and the other features, family, labels, architecture;
operations are waited for on the configured endpoint; the family's previous image is
deprecated; re-runs create nothing; throttling/5xx are retried; a killed upload then
re-run gives one image; dry run touches nothing; cloud-gc deletes images and objects,
and the flavor's objects that failed runs could not delete (no image's rawDisk.source)
once older than clouds.retention_orphan_hours: with the default 24 h nothing fresh is
touched; with 0 exactly those are listed, then deleted, never an image's source, another
flavor's leftover or an object without our metadata."""
from __future__ import annotations

import pytest

from cloud.errors import PublishError
from cloud.gcp import GcpUploader
from pipeline import publish
from pipeline.config import FlavorContext
from tests.servers.fixtures import (  # noqa: F401
    cloud_build_dir,
    flavor_paths,
    gcp,
    gcp_servers,
    kill_publish_midway,
    make_flavor,
    server_logs,
)
from tests.servers.gce import GenerationMatch
from tests.servers.proxy import UNAVAILABLE, Reply


def gcp_target(**extra):
    return {"project": "cos-project", "bucket": "cos-images", "family": "cos-red", **extra}


def test_publish_uploads_inserts_and_deprecates_previous(gcp, cloud_build_dir):
    flavor = make_flavor({"gcp": gcp_target(labels={"team": "os"})}, name="gctest")
    first = publish.publish_stage(FlavorContext(flavor, flavor_paths(flavor, seed=1), "0.1.0"), "gcp")
    paths = flavor_paths(flavor, seed=2)
    tar = paths.build / "disk.tar.gz"
    result = publish.publish_stage(FlavorContext(flavor, paths, "0.1.1"), "gcp")

    blob = gcp.storage().bucket("cos-images").get_blob(f"{result['name']}.tar.gz")
    assert blob.download_as_bytes() == tar.read_bytes()
    assert blob.metadata["cos-sha256"] and blob.metadata["cos-flavor"] == "gctest"
    uploads = gcp.proxy.seen(lambda r: "uploadType=resumable" in r.path)
    assert uploads, "the object was not sent with a resumable upload"

    body = gcp.gce.inserts()[-1]
    assert body["name"] == result["name"] and body["family"] == "cos-red" and body["architecture"] == "X86_64"
    # SECURE_BOOT added for a Secure Boot disk; no shieldedInstanceInitialState: GCE's default (Microsoft) keys
    assert [f["type"] for f in body["guestOsFeatures"]] == ["UEFI_COMPATIBLE", "VIRTIO_SCSI_MULTIQUEUE", "GVNIC",
                                                            "SECURE_BOOT"]
    assert "shieldedInstanceInitialState" not in body
    assert body["rawDisk"]["source"].endswith(f"/cos-images/{result['name']}.tar.gz")
    assert body["labels"]["team"] == "os" and body["labels"]["cos-flavor"] == "gctest"
    waits = [p for m, p, _ in gcp.gce.requests if p.endswith("/wait")]
    assert waits, "operations were not waited for on the configured endpoint"

    images = {n: i for (_, n), i in gcp.gce.images.items()}
    assert images[result["name"]]["status"] == "READY"
    assert images[first["name"]]["deprecated"]["state"] == "DEPRECATED"
    assert images[first["name"]]["deprecated"]["replacement"].endswith(f"/images/{result['name']}")
    assert result["deprecated"] == [first["name"]]

    # re-run: nothing is uploaded or inserted
    inserts, sent = len(gcp.gce.inserts()), len(gcp.proxy.seen(lambda r: r.method in ("POST", "PUT")))
    again = publish.publish_stage(FlavorContext(flavor, paths, "0.1.1"), "gcp")
    assert again["images"] == result["images"]
    assert len(gcp.gce.inserts()) == inserts
    assert len(gcp.proxy.seen(lambda r: r.method in ("POST", "PUT"))) == sent


def test_arm64_architecture(gcp, cloud_build_dir):
    flavor = make_flavor({"gcp": gcp_target(family=None)}, name="gcarm", arch="arm64")
    publish.publish_stage(FlavorContext(flavor, flavor_paths(flavor), "0.1.0"), "gcp")
    assert gcp.gce.inserts()[0]["architecture"] == "ARM64"


def test_no_secure_boot_feature_when_the_flavor_opts_out(gcp, cloud_build_dir):
    # boot.secure_boot: false builds an unsigned EFI GRUB: GCE must not enforce Secure Boot on it
    red = make_flavor({}).model_dump()["boot"]
    flavor = make_flavor({"gcp": gcp_target()}, name="gcnosb", boot={**red, "secure_boot": False})
    publish.publish_stage(FlavorContext(flavor, flavor_paths(flavor), "0.1.0"), "gcp")
    assert [f["type"] for f in gcp.gce.inserts()[0]["guestOsFeatures"]] == ["UEFI_COMPATIBLE", "VIRTIO_SCSI_MULTIQUEUE",
                                                                            "GVNIC"]


def test_throttling_and_5xx_are_retried(gcp, cloud_build_dir):
    faults = [gcp.gce.fail("POST", r"/global/images$", 2, 503), gcp.gce.fail("GET", r"/images/cos-", 1, 429),
              gcp.gce.fail("POST", r"/wait$", 1, 500)]
    upload_fault = gcp.proxy.inject(lambda r: r.method == "PUT" and "upload_id" in r.path, 2, UNAVAILABLE)
    flavor = make_flavor({"gcp": gcp_target()}, name="gcfaults")
    paths = flavor_paths(flavor)
    result = publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "gcp")
    assert all(f["hits"] == f["times"] for f in faults) and upload_fault.hits == 2
    assert len(gcp.gce.images) == 1
    blob = gcp.storage().bucket("cos-images").get_blob(f"{result['name']}.tar.gz")
    assert blob.download_as_bytes() == (paths.build / "disk.tar.gz").read_bytes()


def test_failed_insert_surfaces_error_and_removes_object(gcp, cloud_build_dir):
    # images.insert is refused (400, not retried): the error names the call, the fresh object is removed
    flavor = make_flavor({"gcp": gcp_target()}, name="gcfail")
    paths = flavor_paths(flavor)
    bucket = gcp.storage().bucket("cos-images")
    gcp.gce.fail("POST", r"/global/images$", 1000, 400)
    with pytest.raises(PublishError, match="insert image"):
        publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "gcp")
    assert list(bucket.list_blobs()) == []
    assert not (paths.build / "cloud-images.json").exists()


@pytest.mark.slow
def test_killed_upload_then_rerun_gives_one_image(gcp, cloud_build_dir):
    clouds = {"gcp": gcp_target()}
    flavor = make_flavor(clouds, name="gckilled")
    paths = flavor_paths(flavor)
    is_chunk = lambda r: r.method == "PUT" and "upload_id" in r.path  # noqa: E731
    kill_publish_midway(gcp.proxy, "gcp", clouds, "gckilled", is_chunk, after=2, delay_s=0.5,
                        setup="import cloud.gcp\ncloud.gcp.UPLOAD_CHUNK = 256 * 1024  # several chunks to kill between")
    assert gcp.gce.images == {}

    result = publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "gcp")
    assert [n for (_, n) in gcp.gce.images] == [result["name"]]
    blob = gcp.storage().bucket("cos-images").get_blob(f"{result['name']}.tar.gz")
    assert blob.download_as_bytes() == (paths.build / "disk.tar.gz").read_bytes()


def test_dry_run_touches_nothing(gcp, cloud_build_dir, monkeypatch):
    monkeypatch.setenv("COS_PUBLISH_DRY_RUN", "1")
    flavor = make_flavor({"gcp": gcp_target()}, name="gcplan")
    result = publish.publish_stage(FlavorContext(flavor, flavor_paths(flavor), "0.1.0"), "gcp")
    assert any(s.startswith("upload disk.tar.gz") for s in result["plan"])
    assert any("SECURE_BOOT" in s and "Shielded VM" in s for s in result["plan"]), result["plan"]
    assert {m for m, _, _ in gcp.gce.requests} <= {"GET", "POST"} and gcp.gce.inserts() == []
    assert [r for r in gcp.proxy.requests if r.method != "GET"] == []


def test_gc_deletes_old_images_and_objects(gcp, cloud_build_dir):
    flavor = make_flavor({"gcp": gcp_target(family=None)}, name="gcgc")
    names = []
    for seed in (1, 2, 3):
        paths = flavor_paths(flavor, seed=seed)
        names.append(publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "gcp")["name"])
    ctx = FlavorContext(make_flavor({"gcp": gcp_target(family=None), "retention_keep": 1}, name="gcgc"), paths, "0.1.0")
    assert sorted(i.image for i in publish.gc([ctx])) == sorted(names[:2])
    assert len(gcp.gce.images) == 3
    publish.gc([ctx], apply=True)
    assert [n for (_, n) in gcp.gce.images] == [names[2]]
    assert [b.name for b in gcp.storage().bucket("cos-images").list_blobs()] == [f"{names[2]}.tar.gz"]


GCS_REFUSED = Reply(403, b'{"error": {"code": 403, "message": "injected: storage.objects.delete denied"}}',
                    {"Content-Type": "application/json"})


def failed_publish(flavor, seed: int) -> str:
    """A publish whose images.insert is refused; the image name it was for."""
    paths = flavor_paths(flavor, seed=seed)
    with pytest.raises(PublishError, match="insert image"):
        publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "gcp")
    return publish.image_spec(FlavorContext(flavor, paths, "0.1.0"), "gcp").name


def flavor_objects(gcp, flavor: str | None = None) -> set[str]:
    return {b.name for b in gcp.storage().bucket("cos-images").list_blobs()
            if flavor is None or (b.metadata or {}).get("cos-flavor") == flavor}


def test_gc_deletes_orphan_objects_once_old_enough(gcp, cloud_build_dir):
    """fake-gcs-server cannot age an object: the age rule is checked with the default
    (24 h: nothing fresh is touched) and with retention_orphan_hours: 0 (every orphan goes)."""
    flavor = make_flavor({"gcp": gcp_target(family=None)}, name="gcorphans")
    live = publish.publish_stage(FlavorContext(flavor, flavor_paths(flavor, seed=1), "0.1.0"), "gcp")["name"]
    # runs whose images.insert was refused and that could not delete their object either
    gcp.gce.fail("POST", r"/global/images$", 10_000, 400)
    gcp.proxy.inject(lambda r: r.method == "DELETE", 10_000, GCS_REFUSED)
    orphans = [failed_publish(flavor, seed) for seed in (2, 3)]
    other = failed_publish(make_flavor({"gcp": gcp_target(family=None)}, name="gcorphansother"), 4)
    gcp.gce.faults.clear()
    gcp.proxy.faults.clear()
    gcp.storage().bucket("cos-images").blob("notes/readme.txt").upload_from_string(b"not ours")
    everything = {f"{n}.tar.gz" for n in (live, *orphans, other)} | {"notes/readme.txt"}
    assert flavor_objects(gcp) == everything

    paths = flavor_paths(flavor)
    default = FlavorContext(make_flavor({"gcp": gcp_target(family=None)}, name="gcorphans"), paths, "0.1.0")
    assert publish.gc([default]) == [] and publish.gc([default], apply=True) == []
    assert flavor_objects(gcp) == everything  # nothing fresh is touched

    at_once = FlavorContext(make_flavor({"gcp": gcp_target(family=None), "retention_orphan_hours": 0},
                                        name="gcorphans"), paths, "0.1.0")
    deletes = len(gcp.proxy.seen(lambda r: r.method == "DELETE"))
    listed = publish.gc([at_once])
    assert sorted(i.image.split("#")[0] for i in listed) == sorted(f"object:gs://cos-images/{n}.tar.gz" for n in orphans)
    assert sorted(e for i in listed for e in i.extras) == sorted(f"orphan of {n}" for n in orphans)
    assert flavor_objects(gcp) == everything  # the dry run deleted nothing
    assert len(gcp.proxy.seen(lambda r: r.method == "DELETE")) == deletes
    assert not [p for m, p, _ in gcp.gce.requests if m == "DELETE"]

    publish.gc([at_once], apply=True)
    assert flavor_objects(gcp) == everything - {f"{n}.tar.gz" for n in orphans}
    assert [n for (_, n) in gcp.gce.images] == [live]
    assert publish.gc([at_once]) == []


def test_gc_leaves_an_orphan_replaced_since_it_was_listed(gcp, cloud_build_dir):
    """An object re-uploaded (new generation) between the listing and the delete is kept."""
    flavor = make_flavor({"gcp": gcp_target(family=None), "retention_orphan_hours": 0}, name="gcreplaced")
    gcp.gce.fail("POST", r"/global/images$", 10_000, 400)
    gcp.proxy.inject(lambda r: r.method == "DELETE", 10_000, GCS_REFUSED)
    name = failed_publish(flavor, 1)
    gcp.gce.faults.clear()
    gcp.proxy.faults.clear()
    ctx = FlavorContext(flavor, flavor_paths(flavor), "0.1.0")
    (item,) = publish.gc([ctx])
    blob = gcp.storage().bucket("cos-images").blob(f"{name}.tar.gz")
    blob.metadata = {"cos-flavor": "gcreplaced", "cos-image": name}
    blob.upload_from_string(b"a new upload")
    gcp.proxy.handlers.append(GenerationMatch(gcp.gcs.url))  # fake-gcs-server ignores ifGenerationMatch on DELETE
    try:
        GcpUploader(flavor.clouds.gcp, publish.image_spec(FlavorContext(flavor, flavor_paths(flavor), "0.1.0"), "gcp")).gc_delete(item)
    finally:
        gcp.proxy.handlers.pop()
    assert len(gcp.proxy.seen(lambda r: r.method == "DELETE" and "ifGenerationMatch" in r.path)) == 1
    assert gcp.storage().bucket("cos-images").get_blob(f"{name}.tar.gz").download_as_bytes() == b"a new upload"
    publish.gc([ctx], apply=True)  # listed again (new generation), it goes
    assert flavor_objects(gcp) == set()


@pytest.mark.parametrize("source", ["https://storage.googleapis.com/cos-images/dir/a%20b.tar.gz",
                                    "http://127.0.0.1:4443/cos-images/dir/a b.tar.gz", "gs://cos-images/dir/a b.tar.gz"])
def test_raw_disk_source_names_bucket_and_object(source):
    from cloud.gcp import _object_of
    assert _object_of(source) == ("cos-images", "dir/a b.tar.gz")
