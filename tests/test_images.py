"""Real photos as verification inputs (`--images`): reading, preprocessing, agreement, and bad image files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import skimage.data as skdata  # its wheel ships real photos (a test dependency)
from PIL import Image

from deploykit import DeployError, ExportConfig, export_model
from deploykit.images import FACE_BGR, IMAGENET, Preprocessing, image_files, load_images

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Four real photos from scikit-image's wheel, saved in three formats."""
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(skdata.astronaut()).save(folder / "astronaut.png")
    Image.fromarray(skdata.chelsea()).save(folder / "chelsea.jpg", quality=92)
    Image.fromarray(skdata.coffee()).save(folder / "coffee.webp")
    Image.fromarray(skdata.rocket()).save(folder / "rocket.jpeg")
    (folder / "notes.txt").write_text("not an image, and not picked up: only image suffixes are")
    return folder


def test_a_directory_gives_its_images_in_name_order(photos):
    assert [p.name for p in image_files([photos])] == ["astronaut.png", "chelsea.jpg", "coffee.webp", "rocket.jpeg"]


def test_images_are_resized_centre_cropped_and_normalised(photos):
    batch = load_images([photos / "chelsea.jpg"], (3, 56, 64), IMAGENET)
    assert batch.shape == (1, 3, 56, 64) and batch.dtype == np.float32
    # the same transform written out with Pillow directly: shorter side to 64 / 0.875, centre crop, ImageNet stats
    with Image.open(photos / "chelsea.jpg") as image:
        scale = max(56 / image.height, 64 / image.width) / 0.875
        resized = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)),
                                              Image.Resampling.BILINEAR)
    left, top = (resized.width - 64) // 2, (resized.height - 56) // 2
    pixels = np.asarray(resized.crop((left, top, left + 64, top + 56)), dtype=np.float32).transpose(2, 0, 1) / 255
    expected = (pixels - np.array(IMAGENET.mean, np.float32)[:, None, None]) / np.array(IMAGENET.std,
                                                                                      np.float32)[:, None, None]
    np.testing.assert_allclose(batch[0], expected, atol=1e-6)
    assert 0.5 < batch.std() < 2.0  # a photo, normalised: not a constant, not raw 0-255 values


def test_the_face_preprocessing_is_bgr_in_minus_one_to_one(photos):
    rgb = load_images([photos / "astronaut.png"], (3, 96, 96), Preprocessing(FACE_BGR.mean, FACE_BGR.std, 1.0))
    bgr = load_images([photos / "astronaut.png"], (3, 96, 96), FACE_BGR)
    np.testing.assert_array_equal(bgr[0], rgb[0, ::-1])
    assert -1.0 <= bgr.min() < -0.5 and 0.5 < bgr.max() <= 1.0


def test_mean_and_std_override_the_models_own(photos):
    plain = load_images([photos / "coffee.webp"], (3, 32, 32), IMAGENET.with_statistics((0.0,), (1.0,)))
    assert 0.0 <= plain.min() and plain.max() <= 1.0 and plain.std() > 0.05


@pytest.mark.parametrize("make, message", [
    (lambda d: (d / "broken.jpg").write_bytes(b"this is text, not a JPEG"), "is not a readable image"),
    (lambda d: (d / "cut.png").write_bytes((Path(skdata.__file__).parent / "astronaut.png").read_bytes()[:2000]),
     "is not a readable image"),
    (lambda d: (d / "empty").mkdir(), "holds no image files"),
    (lambda d: None, "does not exist"),
])
def test_bad_image_files_are_one_sentence(tmp_path, make, message):
    make(tmp_path)
    target = next(iter(tmp_path.iterdir()), tmp_path / "missing.png")
    with pytest.raises(DeployError, match=message) as raised:
        load_images([target], (3, 32, 32))
    assert str(raised.value).count(". ") == 0 and str(raised.value).endswith(".")


class _Classifier(torch.nn.Module):
    """A small convnet with 10 class scores."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 12, 3, stride=2), torch.nn.BatchNorm2d(12),
                                            torch.nn.ReLU(), torch.nn.Conv2d(12, 16, 3, stride=2), torch.nn.ReLU())
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def test_verification_on_real_photos_reports_agreement(photos, tmp_path):
    torch.manual_seed(0)
    result = export_model(ExportConfig(model=_Classifier().eval(), input_shape=(1, 3, 48, 48), images=[photos],
                                       output_dir=tmp_path))
    verification = result.report["verification"]
    assert result.verdict == "passed" and len(verification["samples"]) == 4
    assert [c["shape"][0] for c in verification["outputs"]] == [1, 3]  # batches of 1 and N-1: one file, two sizes
    assert verification["agreement"]["top1"] == 1.0 and verification["agreement"]["top5"] == 1.0
    assert verification["agreement"]["cosine_min"] > 0.9999
    assert result.report["config"]["images"] == [str(photos)]


def test_export_py_on_real_photos_and_the_polygraphy_replay(photos, tmp_path):
    """A zoo checkpoint verified on real photos from the command line, then replayed without deploykit."""
    checkpoint = tmp_path / "od_resnet18.pt"
    subprocess.run([sys.executable, "-m", "models", "od_resnet18", "-o", str(checkpoint)], cwd=ROOT, check=True,
                   capture_output=True)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "export.py", "--model", str(checkpoint), "--input-shape", "1x3x96x96",
                           "--images", str(photos / "chelsea.jpg"), str(photos / "rocket.jpeg"),
                           str(photos / "coffee.webp"), "-o", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["verdict"] == "passed" and report["verification"]["agreement"]["top1"] == 1.0
    assert "3 image(s)" in done.stderr
    replay = subprocess.run(report["reproduce"], shell=True, cwd=out, capture_output=True, text=True)
    assert replay.returncode == 0, replay.stdout + replay.stderr

    bad = tmp_path / "photo.png"
    bad.write_text("plain text")
    done = subprocess.run([sys.executable, "export.py", "--model", str(checkpoint), "--images", str(bad), "-o",
                           str(tmp_path / "bad-out")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"error: --images: {bad} is not a readable image (cannot " \
                                                   f"identify image file '{bad}')."
    assert not (tmp_path / "bad-out").exists()

