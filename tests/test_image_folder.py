"""The image_folder dataset on a generated ImageNet-layout folder: classes, ADM crop, bad files."""

from __future__ import annotations

import pickle
import re
import warnings

import numpy as np
import pytest
import torch
from nestar_plugins.datasets import image_folder as mod
from PIL import Image
from pydantic import ValidationError

from nestar_lab.config.registry import get_registry

ImageFolder = get_registry().get("dataset", "image_folder")
R = 16


def _split_lr(w: int, h: int) -> Image.Image:
    """Left half red, right half blue."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2, 0] = 255
    a[:, w // 2 :, 2] = 255
    return Image.fromarray(a)


def _noise(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(a).convert(mode)


@pytest.fixture
def root(tmp_path):
    """3 classes (sorted: ant, bee, cat; created out of order), mixed sizes and modes, one corrupt file."""
    files = {
        "train/cat/a_split.png": _split_lr(48, 32),  # non-square, short side >= 2R: one BOX halving
        "train/cat/b_gray.jpg": _noise(20, 20, 1, "L"),
        "train/cat/c_big.png": _noise(70, 50, 2, "RGBA"),
        "train/ant/a.jpeg": _noise(30, 17, 3),
        "train/ant/b.JPEG": _noise(16, 40, 4, "CMYK"),
        "train/bee/a.bmp": _noise(25, 25, 5),
        "train/bee/b.webp": _noise(18, 33, 6),
        "val/ant/v.png": _noise(20, 20, 7),
        "val/cat/v.jpg": _noise(33, 21, 8),
    }
    for rel, image in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        image.save(tmp_path / rel)
    (tmp_path / "train/cat/z_corrupt.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    (tmp_path / "train/cat/notes.txt").write_text("not an image")
    return tmp_path


def make(root, **kw):
    return ImageFolder(ImageFolder.Params(root=str(root), resolution=R, **kw))


def adm_center_crop_arr(pil_image, image_size):
    """ADM's ``center_crop_arr`` (guided_diffusion/image_datasets.py), the known answer."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def test_classes_and_shape_known_without_decoding(root, monkeypatch):
    monkeypatch.setattr(mod.Image, "open", lambda *a, **k: pytest.fail("construction decoded an image"))
    ds = make(root)
    assert ds.num_classes == 3 and ds.image_shape == (3, R, R)
    assert ds.classes == ["ant", "bee", "cat"]
    assert ds.labels("train").tolist() == [0, 0, 1, 1, 2, 2, 2, 2]  # notes.txt is not an image
    assert ds.labels("test").tolist() == [0, 2]  # val has no bee: indices still follow train's classes
    assert ImageFolder.Params(root="x").resolution == 256


def test_centre_crop_matches_adm_and_keeps_the_split_centred(root):
    for size in [(100, 70), (31, 64), (16, 16), (17, 40)]:
        image = _noise(*size, seed=sum(size))
        assert np.array_equal(np.asarray(mod.center_crop(image, R)), adm_center_crop_arr(image, R))
    items = make(root).items("train")
    image, label = items[4]  # cat/a_split.png
    assert label == 2 and image.shape == (3, R, R) and image.dtype == torch.float32
    red, blue = torch.tensor([1.0, -1, -1])[:, None, None], torch.tensor([-1.0, -1, 1])[:, None, None]
    torch.testing.assert_close(image[:, :, : R // 2], red.expand(3, R, R // 2))
    torch.testing.assert_close(image[:, :, R // 2 :], blue.expand(3, R, R // 2))
    gray, _ = items[5]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    for i in range(len(items) - 1):  # the last is the corrupt file
        x, _ = items[i]
        assert x.shape == (3, R, R) and x.min() >= -1 and x.max() <= 1


def test_corrupt_file_is_skipped_counted_and_warned_once(root):
    items = make(root).items("train")
    bad = len(items) - 1  # z_corrupt.jpg sorts last: its substitute wraps round to index 0
    with pytest.warns(UserWarning, match=r"z_corrupt\.jpg.*1 skipped so far"):
        image, label = items[bad]
    assert torch.equal(image, items[0][0]) and label == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        items[bad]  # known bad: no second warning, not counted twice
    assert items.skipped == 1 and items.skipped_files[0].endswith("z_corrupt.jpg")


def test_warnings_come_at_powers_of_two(tmp_path):
    (tmp_path / "train/c").mkdir(parents=True)
    _noise(20, 20, 0).save(tmp_path / "train/c/z_good.png")
    for i in range(5):
        (tmp_path / f"train/c/bad{i}.jpg").write_bytes(b"not a jpeg")
    items = make(tmp_path).items("train")
    with pytest.warns(UserWarning) as record:
        assert items[0][0].shape == (3, R, R)
    assert [re.search(r"(\d+) skipped so far", str(w.message)).group(1) for w in record] == ["1", "2", "4"]
    assert items.skipped == 5 and re.search(r"the first \S*bad0\.jpg", str(record[-1].message))


def test_split_stacks_items_and_meets_the_dataset_contract(root):
    ds = make(root)
    with pytest.warns(UserWarning, match="z_corrupt"):
        train = ds.split("train")
    items = ds.items("train")
    assert torch.equal(train.images, torch.stack([items[i][0] for i in range(len(items))]))
    assert torch.equal(train.labels, torch.tensor([items[i][1] for i in range(len(items))]))
    test = ds.split("test")
    assert len(train) > len(test) > 0 and test.images.shape[1:] == ds.image_shape
    assert train.images.min() >= -1 and train.images.max() <= 1
    with pytest.raises(ValueError, match="split"):
        ds.split("validation")


def test_dataloader_and_pickling(root):
    items = make(root, max_per_class=1).items("train")
    assert len(items) == 3
    clone = pickle.loads(pickle.dumps(items))
    batches = list(torch.utils.data.DataLoader(clone, batch_size=2, num_workers=0))
    assert [tuple(x.shape) for x, _ in batches] == [(2, 3, R, R), (1, 3, R, R)]
    assert torch.cat([y for _, y in batches]).tolist() == [0, 1, 2]


def test_errors_name_what_is_wrong(root, tmp_path):
    with pytest.raises(ValueError, match="max_in_memory=3"):
        make(root, max_in_memory=3).split("train")
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        make(missing)
    with pytest.raises(FileNotFoundError, match=re.escape(str(root / "training"))):
        make(root, train_dir="training")
    (root / "val/unicorn").mkdir()
    with pytest.raises(ValueError, match="unicorn"):
        make(root).items("test")
    with pytest.raises(FileNotFoundError, match="missing_val"):
        make(root, test_dir="missing_val").items("test")
    with pytest.raises(ValidationError):
        ImageFolder.Params(root=str(root), extensions=(".JPG",))
    with pytest.raises(ValidationError):
        ImageFolder.Params(root=str(root), resolution=4)
