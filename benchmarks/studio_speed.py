"""imgrec studio's training speed (issue 16), through its HTTP API as the page drives it:
the time from POST .../train to a usable model (the first answer of POST .../predict with the
new model) for 2 classes x 30 photos of ../shared/data/cats-dogs-mini, first cold (an empty
feature cache: every photo runs through the backbone), then warm, after adding 5 more photos
to each class (only theirs are computed).

Targets (2 cores): <= 15 s cold, <= 3 s warm. Writes benchmarks/results/studio_speed.json.

    .venv/bin/python benchmarks/studio_speed.py [--photos 30] [--more 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, write_result  # noqa: E402

PHOTOS = ROOT.parent / "shared" / "data" / "cats-dogs-mini"
API = "/v1/studio/projects/bench"


def upload(client, cls: str, paths: list[Path]) -> None:
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    r = client.post(f"{API}/classes/{cls}/images", files=files)
    assert r.status_code == 200 and r.json()["added"] == len(paths), r.text


def train_to_usable(client, probe: bytes) -> tuple[float, dict]:
    """Seconds from POST train to the first prediction by the new model; the final status."""
    start = time.perf_counter()
    assert client.post(f"{API}/train").status_code == 202
    while (state := client.get(f"{API}/train").json())["state"] == "running":
        time.sleep(0.05)
    assert state["state"] == "done", state
    assert client.post(f"{API}/predict", files={"file": probe}).status_code == 200
    return time.perf_counter() - start, state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=30)
    ap.add_argument("--more", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="imgrec-studio-bench-") as tmp:
        os.environ["IMGREC_CACHE"] = str(Path(tmp) / "features")  # cold: no cached features
        from fastapi.testclient import TestClient

        from imgrec.studio.app import create_app

        client = TestClient(create_app(Path(tmp) / "studio"))
        client.post("/v1/studio/projects", json={"name": "bench"})
        photos = {c: sorted((PHOTOS / "train" / c).glob("*.jpg")) for c in ("cat", "dog")}
        for cls, paths in photos.items():
            client.post(f"{API}/classes", json={"name": cls})
            upload(client, cls, paths[:args.photos])
        probe = sorted((PHOTOS / "validation" / "dog").glob("*.jpg"))[0].read_bytes()
        cold, first = train_to_usable(client, probe)
        while client.get(f"{API}/train").json()["validation"] is None:  # the figures follow
            time.sleep(0.1)
        for cls, paths in photos.items():
            upload(client, cls, paths[args.photos:args.photos + args.more])
        warm, second = train_to_usable(client, probe)
    result = {"machine": machine(), "photos_per_class": args.photos, "added_per_class": args.more,
              "cold_s": round(cold, 2), "warm_s": round(warm, 2),
              "cold_val_accuracy": first["val_accuracy"],
              "warm_val_accuracy": second["val_accuracy"],
              "targets": {"cold_s": 15.0, "warm_s": 3.0}}
    print(f"cold: {cold:.1f} s to a usable model (2 x {args.photos} photos, val accuracy "
          f"{first['val_accuracy']}); warm: {warm:.1f} s after adding 2 x {args.more} "
          f"(val accuracy {second['val_accuracy']})")
    write_result("studio_speed", result)


if __name__ == "__main__":
    main()
