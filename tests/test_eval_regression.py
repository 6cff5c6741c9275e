"""Quality regression: every shipped configuration on the shipped testbed stays within tolerance of its
stored baseline (tests/baselines/regression_testbed.json), and a deliberately degraded one does not.

Regenerate the baselines with ``python -m dit_accel.eval.regression --update`` and review the diff.
One evaluation run (dense once per prompt, shared) serves every test of this module.
"""

from __future__ import annotations

import pytest

from dit_accel.eval import regression as R
from dit_accel.testbed import WEIGHTS_DIR

HAVE_WEIGHTS = (WEIGHTS_DIR / "model_index.json").is_file()
BASELINES = R.load_baselines() if R.BASELINE_PATH.is_file() else {"configs": {}}

DEGRADED = "cache:fixed(interval=6,warmup_steps=1,final_steps=0,max_consecutive_reuse=5)"
"""``cache:fixed`` made to reuse almost every step: must fail against the ``cache:fixed`` baseline."""
DEGRADED_BASELINE = "cache:fixed"

needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="shipped testbed weights not present")


@pytest.fixture(scope="module")
def current() -> dict:
    specs = list(BASELINES["configs"]) + [DEGRADED]
    return R.run_regression(specs)["metrics"]


# ------------------------------------------------------------------------------------------ unit


def test_compare_passes_within_and_fails_beyond_tolerance() -> None:
    base = {"psnr": 30.0, "ssim": 0.95, "density": 0.6, "compute_fraction": None}
    assert R.compare(dict(base), base) == []
    near = base | {"psnr": 30.9, "ssim": 0.959, "density": 0.619}
    assert R.compare(near, base) == []
    far = base | {"psnr": 28.5, "density": 1.0}
    failures = R.compare(far, base)
    assert len(failures) == 2 and failures[0].startswith("psnr: baseline 30, now 28.5")
    assert "density" in failures[1]
    # both directions count: a method that silently became dense is a regression
    assert R.compare(base | {"psnr": 45.0}, base)[0].startswith("psnr")
    # above the clip PSNR differences are float noise
    assert R.compare(base | {"psnr": 100.0}, base | {"psnr": 60.0}) == []
    assert "missing" in R.compare(base | {"compute_fraction": 0.5}, base)[0]


def test_shipped_configs_cover_the_registries() -> None:
    import dit_accel
    from dit_accel.presets import preset_names

    specs = R.shipped_configs()
    for cache in dit_accel.available_caches():
        assert any(s == f"cache:{cache}" or s.startswith(f"cache:{cache}(") for s in specs)
    for preset in preset_names():
        assert f"preset:{preset}" in specs
    for method in dit_accel.available_methods():
        assert (f"attention:{method}({R.SPARSE_OPTIONS})" in specs) == (method not in R.YARDSTICKS)


# ------------------------------------------------------------------------------- against baselines


@needs_weights
def test_baselines_were_made_with_the_shipped_weights() -> None:
    assert BASELINES.get("weights_fingerprint") == R.weights_fingerprint(), (
        "the testbed weights changed: run `python -m dit_accel.eval.regression --update` and review the diff"
    )


@needs_weights
def test_every_shipped_configuration_has_a_baseline() -> None:
    missing = sorted(set(R.shipped_configs()) - set(BASELINES["configs"]))
    assert not missing, f"no baseline for {missing}: run `python -m dit_accel.eval.regression --update` and review"


@needs_weights
@pytest.mark.parametrize("label", sorted(BASELINES["configs"]))
def test_configuration_within_tolerance(current: dict, label: str) -> None:
    failures = R.compare(current[label], BASELINES["configs"][label])
    assert not failures, f"{label} drifted from its baseline:\n  " + "\n  ".join(failures)


@needs_weights
def test_degraded_configuration_fails(current: dict) -> None:
    assert DEGRADED_BASELINE in BASELINES["configs"]
    failures = R.compare(current[DEGRADED], BASELINES["configs"][DEGRADED_BASELINE])
    keys = {f.split(":")[0] for f in failures}
    assert {"psnr", "compute_fraction"} <= keys, failures
