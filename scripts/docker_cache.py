"""Keep the pipeline's docker images between CI runs (actions/cache stores the directory).

    .venv/bin/python scripts/docker_cache.py save [DIR]   # every cos-pipeline/* image -> DIR/images.tar
    .venv/bin/python scripts/docker_cache.py load [DIR]   # docker load DIR/images.tar when present

Images are reached through pipeline.docker_engine (the same daemon the build uses). A
saved tar is written under a temporary name and renamed; `save` skips the write when
the set of image ids is unchanged since the last save (DIR/images.json).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import docker_engine, log  # noqa: E402
from pipeline.files import atomic_path, write_json_atomic  # noqa: E402

PREFIX = "cos-pipeline/"
DEFAULT_DIR = Path("build/.docker-cache")


def ours() -> dict[str, str]:
    """tag -> image id of every image the pipeline made (bootstrap base, packages, OS)."""
    out = {}
    for image in docker_engine.client().images.list():
        for tag in image.tags:
            if tag.startswith(PREFIX):
                out[tag] = image.id
    return out


def save(directory: Path) -> None:
    images = ours()
    index = directory / "images.json"
    if not images:
        print("docker cache: no cos-pipeline images to save")
        return
    if index.is_file() and json.loads(index.read_text()) == images and (directory / "images.tar").is_file():
        print(f"docker cache: {len(images)} images unchanged, not re-saved")
        return
    with atomic_path(directory / "images.tar") as tmp, open(tmp, "wb") as f:
        # one tar for all images (shared layers stored once): GET /images/get?names=...;
        # the SDK's get_image() takes a single name only
        api = docker_engine.api()
        resp = api._get(api._url("/images/get"), params={"names": sorted(images)}, stream=True)
        resp.raise_for_status()
        for chunk in resp.iter_content(4 * 1024 * 1024):
            f.write(chunk)
    write_json_atomic(index, images)
    print(f"docker cache: saved {len(images)} images to {directory / 'images.tar'}")


def load(directory: Path) -> None:
    tar = directory / "images.tar"
    if not tar.is_file():
        print(f"docker cache: {tar} not present (cold cache)")
        return
    with open(tar, "rb") as f:
        loaded = docker_engine.client().images.load(f)
    print(f"docker cache: loaded {len(loaded)} images from {tar}")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("save", "load"):
        print(__doc__, file=sys.stderr)
        return 2
    log.setup()
    directory = Path(argv[1]) if len(argv) > 1 else DEFAULT_DIR
    (save if argv[0] == "save" else load)(directory)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
