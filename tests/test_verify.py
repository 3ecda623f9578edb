"""Verified near-duplicates (issue 22): local features under a homography, border trim, the
two-stage `duplicates` and `similar --verify` on a tiny real index of generated covers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw, ImageOps
from typer.testing import CliRunner

from stylegen.apps.cli import app
from stylegen.config import Preprocess
from stylegen.index.store import Index
from stylegen.query import verify
from stylegen.sources import images
from tests.conftest import COVERS_CSV, embed_tiny, needs_real_data


def scene(seed: int, size: int = 192) -> Image.Image:
    """A synthetic 'cover' with structure SIFT can hold on to: random filled shapes."""
    r = np.random.default_rng(seed)
    im = Image.new("RGB", (size, size), tuple(int(v) for v in r.integers(0, 255, 3)))
    d = ImageDraw.Draw(im)
    for _ in range(45):
        x, y = (int(v) for v in r.integers(0, size, 2))
        w, h = (int(v) for v in r.integers(6, size // 4, 2))
        fill = tuple(int(v) for v in r.integers(0, 255, 3))
        (d.ellipse if r.random() < 0.5 else d.rectangle)((x, y, x + w, y + h), fill=fill, outline=(0, 0, 0))
    return im


def border(im: Image.Image, fill=(255, 255, 255)) -> Image.Image:
    return ImageOps.expand(im, border=im.size[0] // 10, fill=fill)


def perspective(im: Image.Image) -> Image.Image:
    """The cover seen at an angle on a grey table, a bigger frame than the cover."""
    import cv2

    a = np.asarray(im)
    h, w = a.shape[:2]
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    dst = np.float32([[70, 40], [230, 52], [250, 230], [50, 220]])
    M = cv2.getPerspectiveTransform(src, dst)
    out = cv2.warpPerspective(a, M, (300, 260), borderValue=(120, 110, 100))
    return Image.fromarray(out)


def test_verify_pair_accepts_copies_and_names_the_transform():
    a = scene(1)
    kp = verify.keypoints(a)
    framed = verify.verify_pair(kp, verify.keypoints(border(a)))
    assert framed.copy and framed.transform["flip"] is False
    assert framed.transform["crop"]["a_in_b"] > 0.95 > 0.8 > framed.transform["crop"]["b_in_a"]  # a inside b's frame
    crop = a.crop((20, 20, 172, 172))
    cropped = verify.verify_pair(kp, verify.keypoints(crop))
    assert cropped.copy and cropped.transform["crop"]["a_in_b"] < 0.8
    photo = verify.verify_pair(kp, verify.keypoints(perspective(a)))
    assert photo.copy and photo.transform["perspective"] > 0.03
    flat = verify.verify_pair(kp, verify.keypoints(a.rotate(7, fillcolor=(255, 255, 255))))
    assert flat.copy and abs(abs(flat.transform["rotation"]) - 7) < 2 and flat.transform["perspective"] < 0.03


def test_mirror_is_found_only_when_the_mirror_is_tried():
    a = scene(2)
    m = ImageOps.mirror(a)
    kp, km = verify.keypoints(a), verify.keypoints(m)
    assert not verify.verify_pair(kp, km).copy  # a mirror image does not match as it is
    v = verify.verify_pair(kp, km, lambda: verify.mirror_keypoints(m))
    assert v.copy and v.transform["flip"] is True and abs(v.transform["scale"] - 1) < 0.05


def test_different_covers_are_not_copies():
    kps = [verify.keypoints(scene(s)) for s in (3, 4, 5)]
    for i in range(3):
        for j in range(3):
            if i != j:
                v = verify.verify_pair(kps[i], kps[j], kps[j])
                assert not v.copy and v.inliers < verify.MIN_INLIERS


def test_border_box_finds_frames_and_letterbox_bars_but_not_plain_backgrounds():
    a = scene(6)
    assert images.border_box(a) is None
    box = images.border_box(border(a))
    assert box is not None and all(abs(x - y) <= 2 for x, y in zip(box, (19, 19, 211, 211), strict=True))
    bars = Image.new("RGB", (192, 192))
    bars.paste(a.resize((192, 108)), (0, 42))  # 16:9 in a square: black bars above and below
    assert images.border_box(bars) == (0, 42, 192, 150)
    motif = Image.new("RGB", (192, 192), (255, 255, 255))
    motif.paste(a.resize((60, 60)), (10, 10))  # an off-centre motif on white: not a frame
    assert images.border_box(motif) is None


def test_trim_is_a_recorded_preprocessing_setting():
    old = Preprocess.from_dict({"size": 64, "mean": [0.5] * 3, "std": [0.5] * 3})  # a manifest before trim
    assert old.trim_border is False and "trim_border" not in old.to_dict()  # ids of old indexes unchanged
    on = Preprocess(size=64, trim_border=True)
    assert Preprocess.from_dict(on.to_dict()) == on
    a = scene(7)
    framed = border(a, fill=(0, 0, 0))
    plain, trimmed = images.prepare(a, on), images.prepare(framed, on)
    assert np.abs(plain.astype(int) - trimmed.astype(int)).mean() < 6  # the frame is gone
    assert np.abs(plain.astype(int) - images.prepare(framed, Preprocess(size=64)).astype(int)).mean() > 20


def test_an_index_records_trim_and_an_old_index_decodes_without_it(tmp_path: Path, rng):
    from tests.conftest import write_index

    raw = {p: rng.normal(size=(12, 20)).astype(np.float32) for p in ("style", "content")}
    meta = pd.DataFrame({"image": [f"c{i}" for i in range(12)], "path": [f"c{i}" for i in range(12)],
                         "content_hash": [f"h{i}" for i in range(12)]})
    spec = {"size": 64, "mean": [0.5] * 3, "std": [0.5] * 3}
    write_index(tmp_path / "old", raw, meta, dims=4, preprocess=spec)
    write_index(tmp_path / "new", raw, meta, dims=4, preprocess={**spec, "trim_border": True})
    assert Index.open(tmp_path / "old").preprocess.trim_border is False
    assert Index.open(tmp_path / "new").preprocess.trim_border is True


def test_prepare_with_trim_is_the_same_for_a_path_and_its_bytes(tmp_path: Path):
    path = tmp_path / "framed.jpg"
    border(scene(8)).save(path, quality=90)
    spec = Preprocess(size=64, trim_border=True)
    assert np.array_equal(images.prepare(path, spec), images.prepare(path.read_bytes(), spec))


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """10 generated covers and 3 copies of cover 0-2 (white border, mirror, 80 % crop), embedded
    with the real backbone."""
    root = tmp_path_factory.mktemp("verify")
    rows = []
    for s in range(10):
        scene(100 + s).save(root / f"c{s}.jpg", quality=92)
        rows.append({"image": f"c{s}.jpg", "genre": "x"})
    border(scene(100)).save(root / "copy_border.jpg", quality=92)
    ImageOps.mirror(scene(101)).save(root / "copy_mirror.jpg", quality=92)
    scene(102).crop((15, 25, 169, 179)).save(root / "copy_crop.jpg", quality=92)
    rows += [{"image": f"copy_{n}.jpg", "genre": "x"} for n in ("border", "mirror", "crop")]
    pd.DataFrame(rows).to_csv(root / "covers.csv", index=False)
    embed_tiny(root / "covers.csv", root / "idx")
    index = Index.open(root / "idx")
    row = {Path(p).stem: i for i, p in enumerate(index.metadata["image"])}
    return root, row


def test_duplicates_verifies_candidates_to_exactly_the_copies(tiny_index):
    root, row = tiny_index
    out = CliRunner().invoke(app, ["duplicates", "--index", str(root / "idx"), "--json"])
    assert out.exit_code == 0, out.output
    answer = json.loads(out.output)
    groups = sorted(sorted(Path(m["image"]).stem for m in g) for g in answer["groups"])
    assert groups == [["c0", "copy_border"], ["c1", "copy_mirror"], ["c2", "copy_crop"]]
    mirror = next(m for g in answer["groups"] for m in g if m["image"] == "copy_mirror.jpg")
    assert json.loads(mirror["transform"])["flip"] is True and mirror["inliers"] >= verify.MIN_INLIERS
    assert "verified by local features" in answer["summary"] and "centre squares" in answer["summary"]  # default


def test_vector_only_search_stays_available_and_options_are_checked(tiny_index):
    root, _ = tiny_index
    runner = CliRunner()
    out = runner.invoke(app, ["duplicates", "--index", str(root / "idx"), "--no-verify", "--threshold", "0.99"])
    assert out.exit_code == 0 and "at similarity >= 0.99" in out.output
    bad = runner.invoke(app, ["duplicates", "--index", str(root / "idx"), "--threshold", "0.5"])
    assert bad.exit_code != 0 and "--no-verify" in str(bad.exception)
    bad = runner.invoke(app, ["duplicates", "--index", str(root / "idx"), "--min-inliers", "2"])
    assert bad.exit_code != 0 and "at least 4" in str(bad.exception)


def test_similar_verify_puts_the_verified_original_first(tiny_index, tmp_path: Path):
    root, row = tiny_index
    query = tmp_path / "photo.jpg"
    perspective(scene(104)).save(query, quality=85)  # a photo of cover c4, not in the index
    out = CliRunner().invoke(app, ["similar", str(query), "--index", str(root / "idx"), "-k", "4", "--verify", "--json"])
    assert out.exit_code == 0, out.output
    hits = json.loads(out.output)["neighbours"]
    assert hits[0]["id"] == row["c4"] and hits[0]["verified"] and hits[0]["transform"]["perspective"] > 0.03
    assert not any(h["verified"] for h in hits[1:])
    plain = json.loads(CliRunner().invoke(app, ["similar", str(query), "--index", str(root / "idx"), "-k", "4",
                                                "--json"]).output)["neighbours"]
    assert "verified" not in plain[0]  # without --verify: the vector search as before


@pytest.mark.realdata
@needs_real_data()
def test_altered_real_covers_verify_and_other_real_covers_do_not():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from alterations import ALTERATIONS

    covers = pd.read_csv(COVERS_CSV).sample(6, random_state=3)["image"].tolist()
    kps, ims = [], []
    for i, c in enumerate(covers):
        im = Image.open(COVERS_CSV.parent / c).convert("RGB")
        kp = verify.keypoints(im)
        kps.append(kp)
        ims.append(im)
        for name in ("photo", "text", "border_q20", "mirror"):
            copy = ALTERATIONS[name](im, np.random.default_rng(i))
            v = verify.verify_pair(kp, verify.keypoints(copy), lambda c=copy: verify.mirror_keypoints(c))
            assert v.copy, (c, name, v)
    others = [verify.verify_pair(kps[i], kps[j], verify.mirror_keypoints(ims[j])) for i in range(6) for j in range(6)
              if i != j]
    assert not any(v.copy for v in others)


def test_service_similar_verify_answers_as_the_cli(tiny_index, tmp_path: Path):
    """`POST /similar` with verify=true (the page's "Verify copies") gives the CLI's verified
    order and transform; without it the plain vector search, with no `verified` key."""
    from fastapi.testclient import TestClient

    from stylegen.apps.service import create_app
    from stylegen.query.engine import Engine

    root, row = tiny_index
    query = tmp_path / "photo.jpg"
    perspective(scene(104)).save(query, quality=85)
    cli = json.loads(CliRunner().invoke(app, ["similar", str(query), "--index", str(root / "idx"), "-k", "4",
                                              "--verify", "--json"]).output)["neighbours"]
    with TestClient(create_app(Engine.open(root / "idx"), rate_limit=None), base_url="http://127.0.0.1") as client:
        files = {"image": ("photo.jpg", query.read_bytes(), "image/jpeg")}
        got = client.post("/similar", files=files, data={"k": "4", "verify": "true"}).json()["neighbours"]
        plain = client.post("/similar", files=files, data={"k": "4"}).json()["neighbours"]
    assert [h["id"] for h in got] == [h["id"] for h in cli] and got[0]["id"] == row["c4"]
    assert got[0]["verified"] and got[0]["transform"] == cli[0]["transform"]
    assert "verified" not in plain[0]


def test_centre_vectors_propose_pairs_the_covers_own_vectors_do_not(tiny_index):
    """With one candidate per cover, a pair (i, j) that is not proposed becomes a candidate when
    cover i's centre-square vector is cover j's vector: what a photo of cover j on a table gives."""
    from stylegen.apps.duplicates import candidate_pairs

    root, _ = tiny_index
    index = Index.open(root / "idx")
    base = candidate_pairs(index, k=1, floor=-1.0)
    proposed = set(zip(base["a"], base["b"], strict=True))
    i, j = next((i, j) for i in range(len(index)) for j in range(i + 1, len(index)) if (i, j) not in proposed)
    centre = np.zeros((len(index), index.vectors.shape[1]), np.float32)  # zero rows propose nothing new
    centre[i] = index.vectors[j]
    got = candidate_pairs(index, k=1, floor=-1.0, centre=centre)
    pairs = set(zip(got["a"], got["b"], strict=True))
    assert (i, j) in pairs and proposed <= pairs


def test_centre_vectors_are_the_centre_square_embedded_like_a_query(tiny_index):
    from stylegen.query.engine import Engine

    root, row = tiny_index
    engine = Engine.open(root / "idx")
    path = str(root / "c3.jpg")
    got = verify.centre_vectors(engine, [path, str(root / "missing.jpg")])
    img = Image.open(path).convert("RGB")
    side = verify.CENTRE_CROP * min(img.size)
    left, top = (img.size[0] - side) / 2, (img.size[1] - side) / 2
    crop = img.crop((round(left), round(top), round(left + side), round(top + side)))
    expected = engine.query_many([crop], classify=False)[0][0].vector
    np.testing.assert_allclose(got[0], expected, atol=1e-6)
    assert not np.allclose(got[0], engine.index.vectors[row["c3"]], atol=1e-2)  # not the whole cover
    assert not got[1].any()  # an unreadable image proposes nothing


def test_duplicates_without_centre_squares_finds_the_same_groups_here(tiny_index):
    """--no-photos skips the centre squares (the default proposes them: the first test above);
    on these copies (no photos) both give the same groups."""
    root, _ = tiny_index
    out = CliRunner().invoke(app, ["duplicates", "--index", str(root / "idx"), "--no-photos", "--json"])
    assert out.exit_code == 0, out.output
    groups = sorted(sorted(Path(m["image"]).stem for m in g) for g in json.loads(out.output)["groups"])
    assert groups == [["c0", "copy_border"], ["c1", "copy_mirror"], ["c2", "copy_crop"]]
    assert "centre squares" not in json.loads(out.output)["summary"]
