"""The FID's bootstrap interval: its fast Frechet distance equals torch-fidelity's, its spread shrinks with more
samples, it is seeded, and it brackets the FID."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def _reference(d: int):
    from torch_fidelity.metric_fid import fid_features_to_statistics

    g = torch.Generator().manual_seed(1)
    return fid_features_to_statistics(torch.randn(3000, d, generator=g) + 0.1)


@pytest.mark.parametrize("n,d", [(400, 64), (50, 96)])  # n > d and n < d: both sides of the Gram trick
def test_the_fast_frechet_distance_is_torch_fidelitys(n: int, d: int) -> None:
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    from infra.metrics import frechet_distance

    ref = _reference(d)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(2)) * 1.3 + 0.2
    expected = fid_statistics_to_metric(fid_features_to_statistics(x), ref, False)["frechet_inception_distance"]
    s2 = np.asarray(ref["sigma"], np.float64)
    w, v = np.linalg.eigh(s2)
    ours = frechet_distance(x.double().numpy(), np.asarray(ref["mu"], np.float64), s2,
                            (v * np.sqrt(np.clip(w, 0, None))) @ v.T)
    assert ours == pytest.approx(expected, rel=1e-6)


def test_the_interval_brackets_the_fid_is_seeded_and_narrows_with_more_samples() -> None:
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    from infra.metrics import fid_interval

    ref = _reference(32)
    widths = []
    for n in (100, 1600):
        x = torch.randn(n, 32, generator=torch.Generator().manual_seed(3)) * 1.2
        fid = fid_statistics_to_metric(fid_features_to_statistics(x), ref, False)["frechet_inception_distance"]
        iv = fid_interval(x, ref, 50, fid)
        assert iv["fid_low"] < fid < iv["fid_high"] and iv["fid_boot_std"] > 0
        assert fid_interval(x, ref, 50, fid) == iv  # same seed, same interval
        widths.append(iv["fid_high"] - iv["fid_low"])
    assert widths[1] < widths[0] / 2  # 16x the samples: about a quarter of the width
