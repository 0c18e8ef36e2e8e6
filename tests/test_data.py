"""Data: Fashion-MNIST discovery and errors, digits, and the batched two-view augmentation."""
import gzip

import pytest
import torch

from replicate.core.augment import TwoViewBatchAugment
from replicate.core.data import DEBIAN_FASHION_MNIST, DataError, load_digits_split, load_fashion_mnist

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
    import replicate.core.data as data

    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr("torchvision.datasets.FashionMNIST.__init__", offline)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as e:
        load_fashion_mnist(str(tmp_path / "empty"), "train")
    assert list((tmp_path / "empty").iterdir()) == []  # a failed download leaves nothing behind
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


# ------------------------------------------------------------------ the RGB recipe and the ImageFolder (paper) path
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_colour_ops_equal_torchvision_per_image(device):
    import torchvision.transforms.functional as TF

    from replicate.core import augment as A

    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 17, 19, generator=g)
    x[0] = 0.5  # a gray image: hue undefined, saturation 0
    cases = [(A.adjust_brightness, TF.adjust_brightness, 0.6, 1.4), (A.adjust_contrast, TF.adjust_contrast, 0.6, 1.4),
             (A.adjust_saturation, TF.adjust_saturation, 0.8, 1.2), (A.adjust_hue, TF.adjust_hue, -0.1, 0.1)]
    for ours, theirs, lo, hi in cases:
        f = lo + (hi - lo) * torch.rand(6, generator=g)
        got = ours(x.to(device), f.view(6, 1, 1, 1).to(device)).cpu()
        want = torch.stack([theirs(x[i], float(f[i])) for i in range(6)])
        assert torch.allclose(got, want, atol=1e-6), ours.__name__
    assert torch.allclose(A.rgb_to_gray(x), TF.rgb_to_grayscale(x), atol=1e-7)


def test_rgb_jitter_and_grayscale_apply_at_their_rates():
    aug = TwoViewBatchAugment(8, 1.0, (0.1, 2.0), (0.5,) * 3, (0.25,) * 3)
    x = torch.rand(2000, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    jittered = aug.jitter_rgb(x, torch.Generator().manual_seed(2))
    changed = (jittered - x).abs().flatten(1).amax(1) > 1e-4
    assert 0.76 < float(changed.float().mean()) < 0.84  # p = 0.8
    assert torch.equal(aug.jitter_rgb(x, torch.Generator().manual_seed(2), p=0.0), x)
    gray = aug.grayscale(x, torch.Generator().manual_seed(3))
    is_gray = (gray[:, 0] == gray[:, 1]).flatten(1).all(1) & (gray[:, 1] == gray[:, 2]).flatten(1).all(1)
    assert 0.17 < float(is_gray.float().mean()) < 0.23  # p = 0.2


def test_grayscale_recipe_unchanged():
    """The augmentation draws the same random numbers in the same order as when the v3 reduced results were made (a
    change here changes every reduced number; the last one, #30's crop that redraws like RandomResizedCrop instead
    of clamping, was made before they were run)."""
    aug = TwoViewBatchAugment(28, 0.35, (0.1, 0.6), (0.286,), (0.353,))
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    v1, v2 = aug(x, torch.Generator().manual_seed(5))
    assert v1.double().sum().item() == pytest.approx(27846.448, abs=0.05)
    assert v2.double().sum().item() == pytest.approx(24009.688, abs=0.05)


def tiny_image_folder(root, classes=2, per_class=8, size=40):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / "train" / f"n{c:08d}"
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size + 7, 3), np.uint8)).save(d / f"{i}.JPEG")
    return root


@pytest.mark.parametrize("device", DEVICES)
def test_folder_batches_crop_in_workers_and_augment_on_device(tmp_path, device):
    from replicate.core.config import Setting
    from replicate.runtime.trainer import FolderBatches, pretrain
    from replicate.study.profiles import SMOKE

    cfg = SMOKE.resolve(Setting()).model_copy(update={"dataset": "imagenet", "image_size": 32, "in_chans": 3,
                                                      "batch_size": 8, "num_workers": 1, "epochs": 2})
    root = tiny_image_folder(tmp_path)
    batches = FolderBatches(cfg, str(root), torch.device(device))
    x1, x2, y = batches.batch(0)
    assert x1.shape == x2.shape == (8, 3, 32, 32) and x1.dtype == torch.float32 and x1.device.type == device
    assert set(y.tolist()) <= {0, 1} and not torch.allclose(x1, x2)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    for v in (x1, x2):  # normalised images of [0, 1] pixels
        pixels = v * std + mean
        assert -1e-5 <= float(pixels.min()) and float(pixels.max()) <= 1 + 1e-5
    result = pretrain(cfg, str(root), progress=False)  # two epochs of two iterations, end to end
    assert result.status == "ok" and result.iterations == 4


def test_compile_is_on_for_gpus_only_unless_asked(monkeypatch):
    from replicate.runtime.trainer import COMPILE_ENV, compile_wanted

    monkeypatch.delenv(COMPILE_ENV, raising=False)
    assert not compile_wanted(torch.device("cpu")) and compile_wanted(torch.device("cuda"))
    monkeypatch.setenv(COMPILE_ENV, "1")
    assert compile_wanted(torch.device("cpu"))
    monkeypatch.setenv(COMPILE_ENV, "0")
    assert not compile_wanted(torch.device("cuda"))


def test_pil_crops_survive_pickling_for_spawned_workers():
    import pickle

    from PIL import Image

    from replicate.core.augment import two_view_pil_crops

    crops = pickle.loads(pickle.dumps(two_view_pil_crops(24, 0.5)))
    a, b = crops(Image.new("RGB", (40, 30), (10, 20, 30)))
    assert a.shape == b.shape == (3, 24, 24) and a.dtype == torch.uint8 and int(a[0, 0, 0]) == 10


def test_translation_places_each_image_whole_at_its_fixed_offset():
    """Image i sits unchanged at row i of the generator seeded by the key (written out here), on zeros; a prefix
    of a split gets the same offsets as the whole split (an offset is a function of (key, i) alone)."""
    from replicate.core.data import TensorSplit, translate

    imgs = torch.rand(5, 1, 28, 28) + 0.1  # no zero pixel, so the paste is visible exactly
    out = translate(TensorSplit(imgs, torch.arange(5)), 40, (2021, 0)).images
    expected = [[9, 9], [6, 12], [8, 7], [6, 4], [7, 8]]  # np.random.default_rng([2021, 0]).integers(0, 13, (5, 2))
    for i, (dy, dx) in enumerate(expected):
        assert torch.equal(out[i, :, dy:dy + 28, dx:dx + 28], imgs[i])
        assert out[i].sum().item() == pytest.approx(imgs[i].sum().item(), rel=1e-6)  # zeros elsewhere
    head = translate(TensorSplit(imgs[:2], torch.arange(2)), 40, (2021, 0)).images
    assert torch.equal(head, out[:2])
    with pytest.raises(DataError, match="cannot hold"):
        translate(TensorSplit(imgs, torch.arange(5)), 20, (2021, 0))


@needs_fmnist
def test_translated_fashion_mnist_statistics_match_the_normalisation():
    from replicate.core.data import TRANSLATED, channel_stats, load_tensor_dataset

    train = load_tensor_dataset(TRANSLATED, "train", None, 40)
    assert train.images.shape == (60000, 1, 40, 40)
    (mean,), (std,) = channel_stats(TRANSLATED, 40)
    assert train.images.mean().item() == pytest.approx(mean, abs=2e-4)
    assert train.images.std().item() == pytest.approx(std, abs=2e-4)
    again = load_tensor_dataset(TRANSLATED, "train", None, 40)
    assert torch.equal(train.images[:100], again.images[:100])


def test_nox_and_the_loader_search_the_same_places(tmp_path, monkeypatch):
    """One list (replicate/core/datapaths.py): the loader reads from it, and nox checks it before building anything;
    the profiles it names are the Fashion-MNIST ones."""
    import replicate.core.data as data
    from replicate.core import datapaths
    from replicate.study.profiles import PROFILES

    assert set(datapaths.FASHION_MNIST_PROFILES) == {n for n, p in PROFILES.items() if "fashion" in p.dataset}
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    monkeypatch.setenv("REPLICATE_DATA", str(tmp_path / "downloads"))
    assert data.fashion_mnist_dirs(None) == datapaths.fashion_mnist_dirs(None, tmp_path / "nowhere") == [
        tmp_path / "nowhere", tmp_path / "downloads" / "FashionMNIST" / "raw"]  # an earlier download is found
    assert len(datapaths.missing_fashion_mnist(None, tmp_path / "nowhere")) == 4
    raw = tmp_path / "downloads" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for stems in datapaths.FMNIST_FILES.values():
        for stem in stems:
            (raw / (stem + ".gz")).write_bytes(b"")
    assert datapaths.missing_fashion_mnist(None, tmp_path / "nowhere") == []


def test_nox_stops_a_table_session_without_data_before_building_anything(tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    pytest.importorskip("nox")
    path = Path(__file__).resolve().parent.parent / "noxfile.py"
    spec = importlib.util.spec_from_file_location("noxfile_under_test", path)
    noxfile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(noxfile)
    monkeypatch.setattr(noxfile, "datapaths", lambda: _paths_without_debian(tmp_path))
    monkeypatch.setenv("REPLICATE_DATA", str(tmp_path / "downloads"))
    problem = noxfile.data_problem(["--profile", "reduced"])
    assert "Fashion-MNIST (profile reduced) not found" in problem and "sudo apt-get install dataset-fashion-mnist" \
        in problem and "--data-root" in problem and "\n" not in problem
    assert noxfile.data_problem(["--profile", "smoke"]) is None  # bundled digits
    assert noxfile.data_problem(["--profile=reduced", "--data-root", str(tmp_path / "no")]).endswith("no such folder")


def _paths_without_debian(tmp_path):
    import types

    from replicate.core import datapaths

    module = types.SimpleNamespace(**vars(datapaths))
    module.missing_fashion_mnist = lambda root: datapaths.missing_fashion_mnist(root, tmp_path / "nowhere")
    module.fashion_mnist_dirs = lambda root: datapaths.fashion_mnist_dirs(root, tmp_path / "nowhere")
    return module
