"""Azure publishing against Azurite (blob storage) and a local HTTPS ARM server
(azure-mgmt-compute, with Azure-AsyncOperation polling), reached only through standard
variables: the page blob holds only the VHD's non-zero 4 MiB ranges and reads back equal
to the VHD; the image is Hyper-V generation V2 from that blob; a gallery version is made
from the image; re-runs create nothing; throttling/5xx are retried; a killed upload is
redone on re-run with one image as the result; bad VHDs and gallery mismatches are
refused before any upload; cloud-gc deletes old images with their blobs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from cloud.errors import PublishError
from pipeline import publish
from tests.servers.disks import nonzero_ranges
from tests.servers.fixtures import (arm_server, azure, azurite_server, cloud_build_dir, flavor_paths,  # noqa: F401
                                    make_flavor, server_logs)
from tests.servers.proxy import UNAVAILABLE

CHUNK = 4 * 1024 * 1024
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RG = "cos-rg"


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
    result = publish.publish_cloud(flavor, paths, "0.1.0", "azure")

    blob = azure.blob_service().get_blob_client("images", f"{result['name']}.vhd")
    ranges = [r for r in blob.list_page_ranges() if not r.cleared]
    written = sorted({start // CHUNK for r in ranges for start in range(r.start, r.end + 1, CHUNK)})
    assert written == nonzero_ranges(vhd, CHUNK)  # zero 4 MiB ranges were not sent
    assert sum(r.end - r.start + 1 for r in ranges) <= vhd.stat().st_size // 3
    assert blob.download_blob().readall() == vhd.read_bytes()
    assert blob.get_blob_properties().metadata["cos_sha256"] == json.loads(paths.manifest.read_text())["artifacts"][1]["sha256"]

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
    again = publish.publish_cloud(flavor, paths, "0.1.0", "azure")
    assert again["images"] == result["images"]
    assert len(page_put_requests(azure)) == pages and len(azure.arm.puts("")) == puts
    assert len(azure.arm.of_type("Microsoft.Compute/images")) == 1


def test_throttling_and_5xx_are_retried(azure, cloud_build_dir):
    faults = [azure.arm.fail("PUT", r"/images/cos-", 2, 429), azure.arm.fail("GET", r"/images/cos-", 1, 503),
              azure.arm.fail("PUT", r"/versions/", 1, 503)]
    page_fault = azure.proxy.inject(lambda r: r.method == "PUT" and "comp=page" in r.path, 3, UNAVAILABLE)
    flavor = make_flavor({"azure": gallery_target(azure)}, name="azfaults")
    paths = flavor_paths(flavor)
    result = publish.publish_cloud(flavor, paths, "0.1.0", "azure")
    assert all(f["hits"] == f["times"] for f in faults) and page_fault.hits == 3
    blob = azure.blob_service().get_blob_client("images", f"{result['name']}.vhd")
    assert blob.download_blob().readall() == (paths.build / "disk.vhd").read_bytes()
    assert len(azure.arm.of_type("Microsoft.Compute/images")) == 1


KILL_SCRIPT = """
import sys, logging
logging.basicConfig(level=logging.INFO)
sys.path.insert(0, {repo!r})
from tests.servers.fixtures import make_flavor
from pipeline.config import FlavorPaths
from pipeline import publish
flavor = make_flavor({clouds!r}, name="azkilled")
publish.publish_cloud(flavor, FlavorPaths(flavor), "0.1.0", "azure")
"""


@pytest.mark.slow
def test_killed_upload_then_rerun_gives_one_image(azure, cloud_build_dir):
    clouds = {"azure": azure_target(workers=1)}
    flavor = make_flavor(clouds, name="azkilled")
    paths = flavor_paths(flavor)
    is_page = lambda r: r.method == "PUT" and "comp=page" in r.path  # noqa: E731
    azure.proxy.delay = (is_page, 0.5)
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT.format(repo=REPO, clouds=clouds)],
                            env=os.environ.copy(), cwd=REPO)
    deadline = time.monotonic() + 60
    while len(azure.proxy.seen(is_page)) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the publish finished before it could be killed"
    proc.kill()
    proc.wait()
    azure.proxy.delay = None
    assert azure.arm.of_type("Microsoft.Compute/images") == []

    result = publish.publish_cloud(flavor, paths, "0.1.0", "azure")
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
        publish.publish_cloud(flavor, paths, "0.1.0", "azure")
    assert page_put_requests(azure) == [] and azure.arm.puts("") == []


def test_dev_version_gets_the_image_but_no_gallery_version(azure, cloud_build_dir):
    flavor = make_flavor({"azure": gallery_target(azure)}, name="azdev")
    result = publish.publish_cloud(flavor, flavor_paths(flavor), "0.1.0-g8878b934", "azure")
    assert "gallery_image_version" not in result
    assert len(azure.arm.of_type("Microsoft.Compute/images")) == 1 and azure.arm.puts("/versions/") == []


def test_gallery_architecture_mismatch_is_refused(azure, cloud_build_dir):
    flavor = make_flavor({"azure": gallery_target(azure)}, name="azarm", arch="arm64")
    paths = flavor_paths(flavor)
    with pytest.raises(PublishError, match="V2/Arm64"):
        publish.publish_cloud(flavor, paths, "0.1.0", "azure")
    assert page_put_requests(azure) == []


def test_gc_deletes_old_images_and_blobs(azure, cloud_build_dir):
    from pipeline.graph import FlavorContext
    flavor = make_flavor({"azure": azure_target()}, name="azgc")
    names = []
    for seed in (1, 2, 3):
        paths = flavor_paths(flavor, seed=seed)
        names.append(publish.publish_cloud(flavor, paths, "0.1.0", "azure")["name"])
        time.sleep(1.1)
    ctx = FlavorContext(make_flavor({"azure": azure_target(), "retention_keep": 2}, name="azgc"), paths, "0.1.0")
    assert [i.image for i in publish.gc([ctx])] == [names[0]]
    assert len(azure.arm.of_type("Microsoft.Compute/images")) == 3
    publish.gc([ctx], apply=True)
    assert sorted(r["name"] for r in azure.arm.of_type("Microsoft.Compute/images")) == sorted(names[1:])
    blobs = [b.name for b in azure.blob_service().get_container_client("images").list_blobs()]
    assert f"{names[0]}.vhd" not in blobs and f"{names[2]}.vhd" in blobs
