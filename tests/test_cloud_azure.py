"""Azure publishing against Azurite (blob storage) and a local HTTPS ARM server
(azure-mgmt-compute, with Azure-AsyncOperation polling), reached only through standard
variables: the page blob holds only the VHD's non-zero 4 MiB ranges and reads back equal
to the VHD; the image is Hyper-V generation V2 from that blob; a gallery version is made
from the image; re-runs create nothing; throttling/5xx are retried; a killed upload is
redone on re-run with one image as the result; bad VHDs and gallery mismatches are
refused before any upload; cloud-gc deletes old images with their blobs.

upload: managed-disk (no storage account) against the same ARM server, which keeps each
upload disk's data as a page blob in Azurite behind a SAS URL: the disk is made with
create_option Upload and the VHD's size, only non-zero 4 MiB ranges are written through
the SAS, the bytes read back equal the VHD, access is revoked (also when the upload
fails midway, then the disk is removed), the image is made from the disk, a re-run
creates nothing, an unfinished disk of a stopped run is revoked, deleted and re-made, a
complete one is reused, the dry run changes nothing, cloud-gc deletes the disk with its
image, and page-blob without storage_account is refused with one clear message.

cloud-gc also removes the page blobs and upload disks of this flavor that failed runs
left behind (no image uses them) once older than clouds.retention_orphan_hours: with
the default 24 h nothing fresh is touched; with 0 the dry run lists exactly those and
--apply deletes only them (an ActiveUpload disk is revoked first), never an image's
source or another flavor's leftovers."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from cloud.errors import PublishError
from pipeline import publish
from pipeline.config import FlavorContext, FlavorPaths
from pipeline.files import hash_file
from tests.servers.disks import nonzero_ranges
from tests.servers.fixtures import (  # noqa: F401
    arm_server,
    azure,
    azurite_server,
    cloud_build_dir,
    flavor_paths,
    kill_publish_midway,
    make_flavor,
    server_logs,
)
from tests.servers.proxy import UNAVAILABLE, Reply

CHUNK = 4 * 1024 * 1024
REPO_PATH = Path(__file__).resolve().parents[1]
RG = "cos-rg"


REFUSED = Reply(403, b'<?xml version="1.0" encoding="utf-8"?><Error><Code>AuthorizationFailure</Code>'
                     b'<Message>injected</Message></Error>', {"Content-Type": "application/xml"})


def azure_target(**extra):
    return {"resource_group": RG, "location": "westeurope", "storage_account": "devstoreaccount1",
            "container": "images", "workers": 4, **extra}


def gallery_target(azure, **extra):
    azure.arm.add_gallery_image(azure.subscription, RG, "cosgallery", "cos-red")
    return azure_target(gallery="cosgallery", gallery_image="cos-red", replica_locations=["northeurope"], **extra)


def page_put_requests(azure):
    return azure.proxy.seen(lambda r: r.method == "PUT" and "comp=page" in r.path)


def test_publish_page_blob_image_and_gallery_version(azure, cloud_build_dir):
    flavor = make_flavor({"azure": gallery_target(azure)}, name="aztest")
    paths = flavor_paths(flavor)
    vhd = paths.build / "disk.vhd"
    result = publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "azure")

    blob = azure.blob_service().get_blob_client("images", f"{result['name']}.vhd")
    ranges = [r for r in blob.list_page_ranges() if not r.cleared]
    written = sorted({start // CHUNK for r in ranges for start in range(r.start, r.end + 1, CHUNK)})
    assert written == nonzero_ranges(vhd, CHUNK)  # zero 4 MiB ranges were not sent
    assert sum(r.end - r.start + 1 for r in ranges) <= vhd.stat().st_size // 3
    assert blob.download_blob().readall() == vhd.read_bytes()
    assert blob.get_blob_properties().metadata["cos_uploaded"] == json.loads(paths.manifest.read_text())["artifacts"][1]["sha256"]

    (image_put,) = azure.arm.puts("/images/" + result["name"])
    props = image_put["properties"]
    assert props["hyperVGeneration"] == "V2"
    os_disk = props["storageProfile"]["osDisk"]
    assert os_disk["blobUri"] == blob.url.replace(azure.azurite.url, f"{azure.proxy.url}/devstoreaccount1")
    assert os_disk["osType"] == "Linux" and os_disk["osState"] == "Generalized"
    assert image_put["tags"]["cos-flavor"] == "aztest"
    (version_put,) = azure.arm.puts("/versions/0.1.0")
    assert version_put["properties"]["storageProfile"]["source"]["id"] == result["images"]["westeurope"]
    assert [r["name"] for r in version_put["properties"]["publishingProfile"]["targetRegions"]] == ["westeurope", "northeurope"]
    polls = [p for m, p, _ in azure.arm.requests if p.startswith("/operations/")]
    assert len(polls) >= 4  # both creations were long-running operations, polled to the end
    assert result["gallery_image_version"]["id"].endswith("/versions/0.1.0")

    # a re-run creates nothing and uploads nothing
    pages, puts = len(page_put_requests(azure)), len(azure.arm.puts(""))
    again = publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "azure")
    assert again["images"] == result["images"]
    assert len(page_put_requests(azure)) == pages and len(azure.arm.puts("")) == puts
    assert len(azure.arm.of_type("Microsoft.Compute/images")) == 1


def test_throttling_and_5xx_are_retried(azure, cloud_build_dir):
    faults = [azure.arm.fail("PUT", r"/images/cos-", 2, 429), azure.arm.fail("GET", r"/images/cos-", 1, 503),
              azure.arm.fail("PUT", r"/versions/", 1, 503)]
    page_fault = azure.proxy.inject(lambda r: r.method == "PUT" and "comp=page" in r.path, 3, UNAVAILABLE)
    flavor = make_flavor({"azure": gallery_target(azure)}, name="azfaults")
    paths = flavor_paths(flavor)
    result = publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "azure")
    assert all(f["hits"] == f["times"] for f in faults) and page_fault.hits == 3
    blob = azure.blob_service().get_blob_client("images", f"{result['name']}.vhd")
    assert blob.download_blob().readall() == (paths.build / "disk.vhd").read_bytes()
    assert len(azure.arm.of_type("Microsoft.Compute/images")) == 1


@pytest.mark.slow
def test_killed_upload_then_rerun_gives_one_image(azure, cloud_build_dir):
    clouds = {"azure": azure_target(workers=1)}
    flavor = make_flavor(clouds, name="azkilled")
    paths = flavor_paths(flavor)
    is_page = lambda r: r.method == "PUT" and "comp=page" in r.path  # noqa: E731
    kill_publish_midway(azure.proxy, "azure", clouds, "azkilled", is_page, after=2, delay_s=0.5)
    assert azure.arm.of_type("Microsoft.Compute/images") == []

    result = publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "azure")
    assert len(azure.arm.of_type("Microsoft.Compute/images")) == 1
    blob = azure.blob_service().get_blob_client("images", f"{result['name']}.vhd")
    assert blob.download_blob().readall() == (paths.build / "disk.vhd").read_bytes()


def test_not_a_fixed_vhd_is_refused_before_upload(azure, cloud_build_dir):
    flavor = make_flavor({"azure": azure_target()}, name="azbad")
    paths = flavor_paths(flavor)
    data = json.loads(paths.manifest.read_text())
    vhd = next(a for a in data["artifacts"] if a["kind"] == "azure-vhd")
    raw = next(a for a in data["artifacts"] if a["kind"] == "raw")
    vhd.update(path=raw["path"], sha256=raw["sha256"], size=raw["size"])
    paths.manifest.write_text(json.dumps(data))
    with pytest.raises(PublishError, match="not a fixed VHD"):
        publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "azure")
    assert page_put_requests(azure) == [] and azure.arm.puts("") == []


def test_dev_version_gets_the_image_but_no_gallery_version(azure, cloud_build_dir):
    flavor = make_flavor({"azure": gallery_target(azure)}, name="azdev")
    result = publish.publish_stage(FlavorContext(flavor, flavor_paths(flavor), "0.1.0-g8878b934"), "azure")
    assert "gallery_image_version" not in result
    assert len(azure.arm.of_type("Microsoft.Compute/images")) == 1 and azure.arm.puts("/versions/") == []


def test_gallery_architecture_mismatch_is_refused(azure, cloud_build_dir):
    flavor = make_flavor({"azure": gallery_target(azure)}, name="azarm", arch="arm64")
    paths = flavor_paths(flavor)
    with pytest.raises(PublishError, match="V2/Arm64"):
        publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "azure")
    assert page_put_requests(azure) == []


def test_secure_boot_needs_a_trusted_launch_gallery_definition(azure, cloud_build_dir, monkeypatch):
    """A Secure Boot disk goes only into a definition declaring SecurityType
    TrustedLaunchSupported (read back from ARM); a Standard one is refused before upload."""
    azure.arm.add_gallery_image(azure.subscription, RG, "cosgallery", "cos-std", security_type=None)
    flavor = make_flavor({"azure": {**gallery_target(azure), "gallery_image": "cos-std"}}, name="azstd")
    with pytest.raises(PublishError, match="SecurityType .*needs TrustedLaunchSupported"):
        publish.publish_stage(FlavorContext(flavor, flavor_paths(flavor), "0.1.0"), "azure")
    assert page_put_requests(azure) == []
    monkeypatch.setenv("COS_PUBLISH_DRY_RUN", "1")
    flavor = make_flavor({"azure": gallery_target(azure)}, name="aztl")
    plan = publish.publish_stage(FlavorContext(flavor, flavor_paths(flavor), "0.1.0"), "azure")["plan"]
    assert any("SecurityType TrustedLaunchSupported" in step for step in plan), plan
    gets = [p for m, p, _ in azure.arm.requests if m == "GET" and "/galleries/cosgallery/images/cos-red" in p]
    assert gets  # the definition's features came over the wire


def test_gc_deletes_old_images_and_blobs(azure, cloud_build_dir):
    flavor = make_flavor({"azure": azure_target()}, name="azgc")
    names = []
    for seed in (1, 2, 3):
        paths = flavor_paths(flavor, seed=seed)
        names.append(publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "azure")["name"])
        time.sleep(1.1)
    ctx = FlavorContext(make_flavor({"azure": azure_target(), "retention_keep": 2}, name="azgc"), paths, "0.1.0")
    assert [i.image for i in publish.gc([ctx])] == [names[0]]
    assert len(azure.arm.of_type("Microsoft.Compute/images")) == 3
    publish.gc([ctx], apply=True)
    assert sorted(r["name"] for r in azure.arm.of_type("Microsoft.Compute/images")) == sorted(names[1:])
    blobs = [b.name for b in azure.blob_service().get_container_client("images").list_blobs()]
    assert f"{names[0]}.vhd" not in blobs and f"{names[2]}.vhd" in blobs


# -- upload: managed-disk -----------------------------------------------------------------

@pytest.fixture
def disks(azure):
    """Upload disks' blobs in Azurite; their SAS URLs go through the fault proxy."""
    return azure.arm.use_blob_storage(azure.azurite.connection_string(), f"{azure.proxy.url}/devstoreaccount1")


def disk_target(**extra):
    return {"resource_group": RG, "location": "westeurope", "upload": "managed-disk", "workers": 4, **extra}


def arm_writes(azure) -> list[tuple[str, str]]:
    return [(m, p) for m, p, _ in azure.arm.requests if m in ("PUT", "POST", "PATCH", "DELETE")]


def arm_calls(azure, method: str, suffix: str) -> list:
    return [b for m, p, b in azure.arm.requests if m == method and p.endswith(suffix)]


def written_chunks(ranges) -> list[int]:
    return sorted({start // CHUNK for s, e in ranges for start in range(s, e + 1, CHUNK)})


def compute_client(azure):
    from azure.identity import DefaultAzureCredential
    from azure.mgmt.compute import ComputeManagementClient
    return ComputeManagementClient(DefaultAzureCredential(), azure.subscription, base_url=azure.arm.url)


def test_managed_disk_publish_image_and_gallery_version(azure, disks, cloud_build_dir):
    azure.arm.add_gallery_image(azure.subscription, RG, "cosgallery", "cos-red")
    flavor = make_flavor({"azure": disk_target(gallery="cosgallery", gallery_image="cos-red")}, name="azdisk")
    paths = flavor_paths(flavor)
    vhd = paths.build / "disk.vhd"
    result = publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "azure")
    name = result["name"]
    assert result["disk"].endswith(f"/providers/Microsoft.Compute/disks/{name}")

    (disk_put,) = azure.arm.puts(f"/disks/{name}")
    props = disk_put["properties"]
    assert props["creationData"] == {"createOption": "Upload", "uploadSizeBytes": vhd.stat().st_size}
    assert props["hyperVGeneration"] == "V2" and props["osType"] == "Linux"
    assert disk_put["tags"]["cos-flavor"] == "azdisk"
    (grant,) = arm_calls(azure, "POST", f"/disks/{name}/beginGetAccess")
    assert grant["access"] == "Write" and grant["durationInSeconds"] > 0

    # only the non-zero 4 MiB ranges were written, each once, through the SAS; no account key used
    assert written_chunks(disks.page_ranges[name]) == nonzero_ranges(vhd, CHUNK)
    assert len(page_put_requests(azure)) == len(nonzero_ranges(vhd, CHUNK)) < vhd.stat().st_size // CHUNK
    assert all("sig=" in r.path for r in azure.proxy.requests)
    assert disks.data[name] == vhd.read_bytes()

    # access revoked after the pages, before the image; the disk is marked complete
    order = [p for m, p in arm_writes(azure)]
    assert order.index(f"{result['disk']}/endGetAccess") < order.index(result["images"]["westeurope"])
    disk = compute_client(azure).disks.get(RG, name)
    assert disk.disk_state == "Unattached"
    assert disk.tags["cos-uploaded"] == json.loads(paths.manifest.read_text())["artifacts"][1]["sha256"]

    (image_put,) = azure.arm.puts(f"/images/{name}")
    os_disk = image_put["properties"]["storageProfile"]["osDisk"]
    assert os_disk["managedDisk"]["id"] == result["disk"] and "blobUri" not in os_disk
    assert image_put["properties"]["hyperVGeneration"] == "V2"
    (version_put,) = azure.arm.puts("/versions/0.1.0")
    assert version_put["properties"]["storageProfile"]["source"]["id"] == result["images"]["westeurope"]

    # a re-run creates, grants and writes nothing
    writes, pages = len(arm_writes(azure)), len(page_put_requests(azure))
    again = publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "azure")
    assert again["images"] == result["images"] and again["disk"] == result["disk"]
    assert len(arm_writes(azure)) == writes and len(page_put_requests(azure)) == pages
    assert len(azure.arm.of_type("Microsoft.Compute/disks")) == 1


@pytest.mark.parametrize("delete_fails", [False, True], ids=["removed", "delete-refused"])
def test_managed_disk_upload_failing_midway_revokes_and_removes_the_disk(azure, disks, cloud_build_dir, delete_fails):
    flavor = make_flavor({"azure": disk_target(workers=1)}, name="azdiskfail")
    paths = flavor_paths(flavor)
    seen = []

    def third_page_on(req):  # let two pages through, then refuse every page write
        if req.method == "PUT" and "comp=page" in req.path:
            seen.append(req)
            return len(seen) > 2
        return False

    azure.proxy.inject(third_page_on, 1000, REFUSED)
    if delete_fails:
        azure.arm.fail("DELETE", r"/disks/", 100, 409)
    with pytest.raises(PublishError, match="upload pages of azure managed disk"):  # the upload's error, not cleanup's
        publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "azure")
    name = publish.image_spec(FlavorContext(flavor, paths, "0.1.0"), "azure").name
    order = [(m, p.rsplit("/", 1)[-1]) for m, p in arm_writes(azure) if f"/disks/{name}" in p]
    assert order[:4] == [("PUT", name), ("POST", "beginGetAccess"), ("POST", "endGetAccess"), ("DELETE", name)]
    assert len(disks.page_ranges[name]) >= 1  # it did fail midway
    assert azure.arm.of_type("Microsoft.Compute/images") == []
    if delete_fails:  # left behind, but revoked: not stuck in ActiveUpload, and not marked complete
        (disk,) = azure.arm.of_type("Microsoft.Compute/disks")
        assert disk["properties"]["diskState"] == "Unattached" and "cos-uploaded" not in disk["tags"]
    else:
        assert azure.arm.of_type("Microsoft.Compute/disks") == []


def leave_unfinished_disk(azure, name: str, vhd) -> None:
    """What a publish killed during its upload leaves: an upload disk in ActiveUpload with
    some pages written (made with the same SDK calls, no uploader code)."""
    from azure.mgmt.compute.models import CreationData, Disk, DiskProperties, GrantAccessData
    from azure.storage.blob import BlobClient
    compute = compute_client(azure)
    compute.disks.begin_create_or_update(RG, name, Disk(location="westeurope", properties=DiskProperties(
        os_type="Linux", creation_data=CreationData(create_option="Upload", upload_size_bytes=vhd.stat().st_size))),
        polling_interval=0).result()
    sas = compute.disks.begin_grant_access(RG, name, GrantAccessData(access="Write", duration_in_seconds=600),
                                           polling_interval=0).result().access_sas
    BlobClient.from_blob_url(sas).upload_page(vhd.read_bytes()[:CHUNK], offset=0, length=CHUNK)
    assert compute.disks.get(RG, name).disk_state == "ActiveUpload"


def test_unfinished_disk_of_a_stopped_run_is_remade_and_a_complete_one_reused(azure, disks, cloud_build_dir, monkeypatch):
    flavor = make_flavor({"azure": disk_target()}, name="azdiskrerun")
    paths = flavor_paths(flavor)
    vhd = paths.build / "disk.vhd"
    name = publish.image_spec(FlavorContext(flavor, paths, "0.1.0"), "azure").name
    leave_unfinished_disk(azure, name, vhd)
    azure.arm.requests.clear()

    monkeypatch.setenv("COS_PUBLISH_DRY_RUN", "1")
    plan = publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "azure")["plan"]
    assert any("delete unfinished managed disk" in step and "ActiveUpload" in step for step in plan)
    assert arm_writes(azure) == []
    monkeypatch.delenv("COS_PUBLISH_DRY_RUN")

    result = publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "azure")
    order = [(m, p.rsplit("/", 1)[-1]) for m, p in arm_writes(azure) if f"/disks/{name}" in p]
    assert order[:3] == [("POST", "endGetAccess"), ("DELETE", name), ("PUT", name)]
    assert disks.data[name] == vhd.read_bytes()
    assert len(azure.arm.of_type("Microsoft.Compute/images")) == 1

    # the image gone (say, removed by hand), the complete disk is reused: nothing uploaded again
    compute_client(azure).images.begin_delete(RG, name, polling_interval=0).result()
    writes, pages = len(arm_writes(azure)), len(page_put_requests(azure))
    again = publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "azure")
    new = arm_writes(azure)[writes:]
    assert [m for m, p in new] == ["PUT"] and new[0][1] == again["images"]["westeurope"]
    assert len(page_put_requests(azure)) == pages and again["disk"] == result["disk"]


def test_managed_disk_dry_run_changes_nothing(azure, disks, cloud_build_dir, monkeypatch):
    monkeypatch.setenv("COS_PUBLISH_DRY_RUN", "1")
    flavor = make_flavor({"azure": disk_target()}, name="azdiskdry")
    paths = flavor_paths(flavor)
    out = publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "azure")
    assert out["dry_run"] is True
    plan = " | ".join(out["plan"])
    for step in ("create managed disk", "grant write access", "revoke access", "from the managed disk"):
        assert step in plan
    assert arm_writes(azure) == [] and azure.proxy.requests == []
    assert azure.arm.of_type("Microsoft.Compute/disks") == [] and not (paths.build / "cloud-images.json").exists()


def test_gc_deletes_old_images_with_their_managed_disks(azure, disks, cloud_build_dir):
    flavor = make_flavor({"azure": disk_target()}, name="azdiskgc")
    names = []
    for seed in (1, 2):
        paths = flavor_paths(flavor, seed=seed)
        names.append(publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "azure")["name"])
        time.sleep(1.1)
    ctx = FlavorContext(make_flavor({"azure": disk_target(), "retention_keep": 1}, name="azdiskgc"), paths, "0.1.0")
    (item,) = publish.gc([ctx])
    assert item.image == names[0] and len(item.extras) == 1
    assert item.extras[0].endswith(f"/providers/Microsoft.Compute/disks/{names[0]}")
    assert len(azure.arm.of_type("Microsoft.Compute/disks")) == 2  # the dry run deleted nothing
    publish.gc([ctx], apply=True)
    assert [r["name"] for r in azure.arm.of_type("Microsoft.Compute/images")] == [names[1]]
    assert [r["name"] for r in azure.arm.of_type("Microsoft.Compute/disks")] == [names[1]]


def test_page_blob_without_storage_account_is_a_clear_config_error(tmp_path):
    from cloud.targets import AzureTarget
    from pipeline.config import load_flavor
    from pipeline.errors import ConfigError
    flavors = tmp_path / "flavors"
    (flavors / "azcfg").mkdir(parents=True)
    (flavors / "defaults.yaml").write_text((REPO_PATH / "flavors/defaults.yaml").read_text())
    (flavors / "azcfg" / "Dockerfile").write_text("FROM scratch\n")
    (flavors / "azcfg" / "flavor.yaml").write_text((REPO_PATH / "flavors/red/flavor.yaml").read_text()
                                                   + "clouds:\n  azure: {resource_group: rg, location: westeurope}\n")
    with pytest.raises(ConfigError) as err:
        load_flavor("azcfg", flavors)
    assert "clouds.azure" in str(err.value) and "upload: page-blob needs storage_account" in str(err.value)
    assert AzureTarget(resource_group="rg", location="l", upload="managed-disk").storage_account is None


def test_vhd_too_small_for_a_managed_disk_is_refused_before_any_call(azure, disks, cloud_build_dir):
    from tests.servers.disks import make_raw, make_vhd
    flavor = make_flavor({"azure": disk_target()}, name="azdisksmall")
    paths = flavor_paths(flavor)
    small = make_vhd(make_raw(paths.build / "small.raw", size=8 * 1024 * 1024), paths.build / "small.vhd")
    data = json.loads(paths.manifest.read_text())
    vhd = next(a for a in data["artifacts"] if a["kind"] == "azure-vhd")
    vhd.update(path=small.name, sha256=hash_file(small), size=small.stat().st_size)
    paths.manifest.write_text(json.dumps(data))
    with pytest.raises(PublishError, match="managed disk upload needs at least 20972032"):
        publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "azure")
    assert arm_writes(azure) == []


@pytest.mark.slow
def test_killed_managed_disk_upload_then_rerun_gives_one_image(azure, disks, cloud_build_dir):
    clouds = {"azure": disk_target(workers=1)}
    flavor = make_flavor(clouds, name="azkilled")
    paths = flavor_paths(flavor)
    is_page = lambda r: r.method == "PUT" and "comp=page" in r.path  # noqa: E731
    kill_publish_midway(azure.proxy, "azure", clouds, "azkilled", is_page, after=2, delay_s=0.5)
    (left,) = azure.arm.of_type("Microsoft.Compute/disks")
    assert left["properties"]["diskState"] == "ActiveUpload"  # what a killed run leaves

    result = publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "azure")
    assert len(azure.arm.of_type("Microsoft.Compute/images")) == 1
    assert len(azure.arm.of_type("Microsoft.Compute/disks")) == 1
    assert disks.data[result["name"]] == (paths.build / "disk.vhd").read_bytes()


# -- cloud-gc: leftovers of failed runs ----------------------------------------------------

def refuse_pages_after(azure, n: int):
    """Let n page writes through the proxy, then refuse every later one (403)."""
    seen = []

    def match(req) -> bool:
        if req.method == "PUT" and "comp=page" in req.path:
            seen.append(req)
            return len(seen) > n
        return False
    return azure.proxy.inject(match, 10_000, REFUSED)


def failed_publish(flavor, seed: int, error: str) -> str:
    """Publish a synthetic build that fails with `error`; the image name it was for."""
    paths = flavor_paths(flavor, seed=seed)
    with pytest.raises(PublishError, match=error):
        publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "azure")
    return publish.image_spec(FlavorContext(flavor, paths, "0.1.0"), "azure").name


def gc_contexts(target: dict, name: str):
    """cloud-gc of flavor `name` with the default orphan age (24 h) and with 0 h."""
    paths = FlavorPaths(make_flavor({"azure": target}, name=name))
    return (FlavorContext(make_flavor({"azure": target}, name=name), paths, "0.1.0"),
            FlavorContext(make_flavor({"azure": target, "retention_orphan_hours": 0}, name=name), paths, "0.1.0"))


def flavor_blobs(azure, flavor: str) -> dict[str, dict]:
    container = azure.blob_service().get_container_client("images")
    return {b.name: b.metadata for b in container.list_blobs(include=["metadata"])
            if (b.metadata or {}).get("cos_flavor") == flavor}


def test_gc_deletes_orphan_page_blobs_once_old_enough(azure, cloud_build_dir):
    """Azurite cannot age a blob: the age rule is checked with the default (24 h: nothing
    fresh is touched) and with retention_orphan_hours: 0 (every orphan goes)."""
    flavor = make_flavor({"azure": azure_target(workers=1)}, name="azorphans")
    live = publish.publish_stage(FlavorContext(flavor, flavor_paths(flavor, seed=1), "0.1.0"), "azure")["name"]
    azure.proxy.inject(lambda r: r.method == "DELETE", 10_000, REFUSED)  # failed runs cannot remove their blobs
    pages = refuse_pages_after(azure, 2)
    unfinished = failed_publish(flavor, 2, "upload pages")      # upload failed midway
    azure.proxy.faults.remove(pages)
    azure.arm.fail("PUT", r"/images/", 10_000, 400)
    uploaded = failed_publish(flavor, 3, "create image")       # uploaded, image refused
    other_flavor = make_flavor({"azure": azure_target()}, name="azorphansother")
    other = failed_publish(other_flavor, 4, "create image")    # another flavor's, just as orphaned
    azure.proxy.faults.clear()
    azure.arm.faults.clear()
    blobs = flavor_blobs(azure, "azorphans")
    assert set(blobs) == {f"{live}.vhd", f"{unfinished}.vhd", f"{uploaded}.vhd"}
    # the completion marker is set only once every page was in
    assert "cos_uploaded" not in blobs[f"{unfinished}.vhd"] and len(blobs[f"{uploaded}.vhd"]["cos_uploaded"]) == 64
    assert set(flavor_blobs(azure, "azorphansother")) == {f"{other}.vhd"}

    default, at_once = gc_contexts(azure_target(), "azorphans")
    assert publish.gc([default]) == [] and publish.gc([default], apply=True) == []
    assert set(flavor_blobs(azure, "azorphans")) == set(blobs)  # nothing fresh is touched

    deletes, writes = len(azure.proxy.seen(lambda r: r.method == "DELETE")), len(arm_writes(azure))
    listed = publish.gc([at_once])
    assert sorted(i.image for i in listed) == sorted([f"blob:{unfinished}.vhd", f"blob:{uploaded}.vhd"])
    assert {e for i in listed for e in i.extras} == {f"orphan of {unfinished} (unfinished)",
                                                     f"orphan of {uploaded} (uploaded)"}
    assert set(flavor_blobs(azure, "azorphans")) == set(blobs)  # the dry run deleted nothing
    assert len(azure.proxy.seen(lambda r: r.method == "DELETE")) == deletes and len(arm_writes(azure)) == writes

    publish.gc([at_once], apply=True)
    assert set(flavor_blobs(azure, "azorphans")) == {f"{live}.vhd"}
    assert set(flavor_blobs(azure, "azorphansother")) == {f"{other}.vhd"}
    assert [r["name"] for r in azure.arm.of_type("Microsoft.Compute/images")] == [live]
    assert publish.gc([at_once]) == []


def test_gc_deletes_orphan_managed_disks_once_old_enough(azure, disks, cloud_build_dir):
    """As above for upload: managed-disk; a disk left in ActiveUpload is revoked, then deleted."""
    flavor = make_flavor({"azure": disk_target(workers=1)}, name="azdiskorphans")
    live = publish.publish_stage(FlavorContext(flavor, flavor_paths(flavor, seed=1), "0.1.0"), "azure")["name"]
    refuse_pages_after(azure, 2)
    azure.arm.fail("POST", r"/endGetAccess$", 10_000, 409)
    active = failed_publish(flavor, 2, "upload pages")          # neither revoked nor deleted
    azure.arm.faults.clear()
    azure.arm.fail("DELETE", r"/disks/", 10_000, 409)
    revoked = failed_publish(flavor, 3, "upload pages")         # revoked, delete refused
    azure.proxy.faults.clear()
    azure.arm.faults.clear()
    # another flavor's leftover, just as orphaned: an upload disk with that flavor's tags
    from azure.mgmt.compute.models import CreationData, Disk, DiskProperties
    other = "cos-azdiskorphansother-0-1-0-x86-64-cccccccccccc"
    compute_client(azure).disks.begin_create_or_update(RG, other, Disk(
        location="westeurope", tags={"cos-flavor": "azdiskorphansother", "cos-image": other},
        properties=DiskProperties(os_type="Linux", creation_data=CreationData(
            create_option="Upload", upload_size_bytes=21 * 1024 * 1024 + 512))), polling_interval=0).result()
    states = {d["name"]: d["properties"]["diskState"] for d in azure.arm.of_type("Microsoft.Compute/disks")}
    assert states == {live: "Unattached", active: "ActiveUpload", revoked: "Unattached", other: "ReadyToUpload"}

    default, at_once = gc_contexts(disk_target(), "azdiskorphans")
    assert publish.gc([default]) == [] and publish.gc([default], apply=True) == []
    assert len(azure.arm.of_type("Microsoft.Compute/disks")) == 4  # nothing fresh is touched

    writes = len(arm_writes(azure))
    listed = publish.gc([at_once])
    assert sorted(i.image for i in listed) == sorted([f"disk:{active}", f"disk:{revoked}"])
    assert {e for i in listed for e in i.extras} == {f"orphan of {active} (ActiveUpload)",
                                                     f"orphan of {revoked} (Unattached)"}
    assert len(arm_writes(azure)) == writes  # the dry run wrote nothing

    publish.gc([at_once], apply=True)
    done = [(m, p.rsplit("/", 1)[-1]) for m, p in arm_writes(azure)[writes:]]
    assert done.index(("POST", "endGetAccess")) < done.index(("DELETE", active))
    assert sorted(r["name"] for r in azure.arm.of_type("Microsoft.Compute/disks")) == sorted([live, other])
    assert [r["name"] for r in azure.arm.of_type("Microsoft.Compute/images")] == [live]
    assert publish.gc([at_once]) == []
