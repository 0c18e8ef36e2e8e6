"""Data: Fashion-MNIST discovery and errors, digits, and the batched two-view augmentation."""
import gzip

import pytest
import torch

from replicate.augment import TwoViewBatchAugment
from replicate.data import DEBIAN_FASHION_MNIST, DataError, load_digits_split, load_fashion_mnist

needs_fmnist = pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist not installed")


@needs_fmnist
def test_fashion_mnist_from_debian_package():
    test = load_fashion_mnist(None, "test")
    assert test.images.shape == (10000, 1, 28, 28) and test.labels.shape == (10000,)
    assert 0.0 <= float(test.images.min()) and float(test.images.max()) <= 1.0
    assert torch.equal(torch.bincount(test.labels), torch.full((10,), 1000))


@needs_fmnist
def test_fashion_mnist_from_data_root_in_torchvision_layout(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (raw / name[:-3]).write_bytes(gzip.decompress((DEBIAN_FASHION_MNIST / name).read_bytes()))
    ds = load_fashion_mnist(str(tmp_path), "test")
    assert torch.equal(ds.labels, load_fashion_mnist(None, "test").labels)


def test_malformed_idx_file_is_a_clear_error(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"garbage" * 10)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"garbage" * 10)
    with pytest.raises(DataError, match="not an IDX file"):
        load_fashion_mnist(str(tmp_path), "test")


def test_missing_dataset_offline_names_the_remedies(tmp_path, monkeypatch):
    import replicate.data as data

    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr("torchvision.datasets.FashionMNIST.__init__", offline)
    with pytest.raises(DataError) as e:
        load_fashion_mnist(str(tmp_path / "empty"), "train")
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-root" in msg and "\n" not in msg


def test_digits_split_is_fixed_and_disjoint():
    tr, te = load_digits_split("train", 16), load_digits_split("test", 16)
    assert len(tr) + len(te) == 1797 and tr.images.shape[1:] == (1, 16, 16)
    assert torch.equal(tr.labels, load_digits_split("train", 16).labels)


def test_two_view_augment_shapes_determinism_and_difference():
    x = torch.rand(8, 1, 28, 28)
    aug = TwoViewBatchAugment(28, 0.35, (0.1, 0.6), (0.5,), (0.5,))
    v1, v2 = aug(x, torch.Generator().manual_seed(0))
    w1, w2 = aug(x, torch.Generator().manual_seed(0))
    assert v1.shape == v2.shape == x.shape
    assert torch.equal(v1, w1) and torch.equal(v2, w2)  # a pure function of the generator: exact resume
    assert not torch.allclose(v1, v2)


def test_crop_flip_flips_about_half_and_keeps_constant_images():
    aug = TwoViewBatchAugment(28, 1.0, (0.1, 0.6), (0.0,), (1.0,))
    x = torch.zeros(400, 1, 28, 28)
    x[..., :14] = 1.0  # bright left half
    out = aug.crop_flip(x, torch.Generator().manual_seed(3))
    left_bright = (out[..., :14].mean((1, 2, 3)) > out[..., 14:].mean((1, 2, 3))).float().mean()
    assert 0.4 < float(left_bright) < 0.6
    const = aug.crop_flip(torch.full((4, 1, 28, 28), 0.3), torch.Generator().manual_seed(0))
    assert torch.allclose(const, torch.full_like(const, 0.3), atol=1e-5)
