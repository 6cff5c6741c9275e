"""Calibration to a PSNR target: the search on a modelled cost (with synthetic evaluations), the settings'
errors, and one real calibration of a tiny model that writes a preset file which ``apply`` loads and a model of
another configuration refuses."""

from __future__ import annotations

import json
import math

import pytest
import torch
from sparse_helpers import tiny_testbed

import dit_accel
from dit_accel.calibration.target import Candidate, CostModel, Evaluation, ModelFacts, Search, TargetSettings
from dit_accel.preset_file import load_preset_file, model_config_hash, read_preset_file, without_timing


def _facts(layers: int = 4) -> ModelFacts:
    """Layer 0 always dense; sparse layers cost what their top_p keeps (0.9 -> 0.8, 0.6 -> 0.5, 0.3 -> 0.3)."""
    costs = {0.9: 0.8, 0.6: 0.5, 0.3: 0.3}
    return ModelFacts(layers=layers, sparse_layers=list(range(1, layers)), attention_share=0.5,
                      valve_share={i: (1.0 if i == 0 else 0.2) for i in range(layers)},
                      cost={(i, p): c for i in range(1, layers) for p, c in costs.items()},
                      density={(i, p): c for i in range(1, layers) for p, c in costs.items()},
                      refresh_period=5, num_blocks=6)


SCHEDULES = {0.75: {"schedule": [1, 1, 1, 0], "order": 0, "compute_fraction": 0.75},
             0.5: {"schedule": [1, 1, 0, 0], "order": 1, "compute_fraction": 0.5}}


class FakeSearch(Search):
    """Evaluations from a synthetic error model: each part adds its squared error per prompt."""

    ATTN_MSE = {0.9: 1e-4, 0.6: 4e-4, 0.3: 4e-3}
    CACHE_MSE = {0.75: 2e-4, 0.5: 2e-3}

    def __init__(self, settings: TargetSettings) -> None:
        model = CostModel(_facts(), settings, SCHEDULES)
        super().__init__(None, None, ["a", "b"], [torch.zeros(1)] * 2, model, settings, None)
        self.calls: list[str] = []

    def evaluate(self, c: Candidate, source: str) -> Evaluation:
        if c.key in self.evaluated:
            return self.evaluated[c.key]
        if len(self.evaluated) >= self.settings.max_evals:
            from dit_accel.calibration.target import _Stop

            raise _Stop("max_evals")
        mse = (0.0 if c.budget is None else self.CACHE_MSE[c.budget])
        if c.top_p is not None:
            mse += sum(self.ATTN_MSE[p] for p in c.top_p) / len(c.top_p)
        psnr = 10 * math.log10(1 / mse)
        self.calls.append(c.key)
        e = Evaluation(c, psnr, [psnr] * 2, [mse] * 2, self.model.cost(c), 0.0, None, None, None, source)
        self.evaluated[c.key] = e
        return e


def test_search_picks_the_cheapest_configuration_that_meets_the_target():
    s = TargetSettings(target_psnr=30.0, budgets=(0.75, 0.5), top_ps=(0.9, 0.6, 0.3), layer_groups=2)
    search = FakeSearch(s)
    search.run()
    best = search.best()
    # cache 0.5 misses (27 dB); cache 0.75 alone 37 dB; attention 0.6 passes (34 dB), 0.3 misses (24 dB)
    assert best.psnr >= 30.0
    passing = [e for e in search.evaluated.values() if e.psnr >= 30.0]
    assert best.modelled_cost == min(e.modelled_cost for e in passing)
    assert best.candidate == Candidate((0.6, 0.6), 0.75)  # the combination beats each part alone
    assert search.model.cost(best.candidate) < search.model.cost(Candidate(None, 0.75))
    # the same settings give the same sequence of evaluations (deterministic ranking)
    again = FakeSearch(s)
    again.run()
    assert again.calls == search.calls


def test_modelled_cost_counts_valves_planning_and_the_cache():
    s = TargetSettings(target_psnr=30.0, budgets=(0.5,), top_ps=(0.6,), plan_cost=0.05)
    model = CostModel(_facts(), s, SCHEDULES)
    assert model.cost(Candidate(None, None)) == 1.0
    sparse = 0.2 + 0.8 * (0.5 + 0.05 / 5)
    attention = (1.0 + 3 * sparse) / 4  # layer 0 is dense
    assert model.attention_cost((0.6, 0.6)) == pytest.approx(attention)
    assert model.cost(Candidate((0.6, 0.6), 0.5)) == pytest.approx(0.5 * (0.5 + 0.5 * attention))
    assert model.layer_top_p((0.9, 0.3)) == [None, 0.9, 0.3, 0.3]


def test_search_stops_at_max_evals_and_keeps_the_best_so_far():
    s = TargetSettings(target_psnr=30.0, budgets=(0.75, 0.5), top_ps=(0.9, 0.6, 0.3), max_evals=2)
    search = FakeSearch(s)
    from dit_accel.calibration.target import _Stop

    with pytest.raises(_Stop):
        search.run()
    assert len(search.evaluated) == 2 and search.best() is not None


@pytest.mark.parametrize("bad", [0, -3, 100, float("nan"), "30", True])
def test_bad_target_is_refused(bad):
    with pytest.raises(ValueError, match="target_psnr must be a number of dB in"):
        TargetSettings(target_psnr=bad)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="budgets must be below 1"):
        TargetSettings(target_psnr=30, budgets=(1.0,))
    with pytest.raises(ValueError, match="precision must be one of"):
        TargetSettings(target_psnr=30, precision="int4")


def test_calibration_of_a_tiny_model_writes_a_preset_file_that_apply_loads(tmp_path):
    pipe = tiny_testbed(num_layers=2)
    out = tmp_path / "tiny.json"
    prompts = ["a small red circle moving left on a striped background"]
    with pytest.raises(ValueError, match="target_psnr must be"):
        dit_accel.calibrate(pipe, prompts, target_psnr=-1, num_steps=4)
    data = dit_accel.calibrate(
        pipe, prompts, target_psnr=30, out=out, model_id="tiny", num_steps=4, budgets=(0.5,), top_ps=(0.5,),
        max_evals=2, timing_prompts=1, progress=False,
        call_kwargs=dict(height=128, width=128, num_frames=4, guidance_scale=1.0))
    saved = read_preset_file(out)
    assert saved["format"] == "dit-accel-preset" and saved["version"] == 1
    assert saved["model"]["config_hash"] == model_config_hash(pipe) and saved["device"] == "cpu"
    assert saved["calibration"]["num_steps"] == 4 and saved["calibration"]["prompts"] == prompts
    assert saved["timing"]["speedup"] > 0 and "created" in saved
    assert without_timing(json.loads(out.read_text())) == without_timing(saved)
    assert saved["measured"]["met_target"] is (saved["measured"]["psnr"] is not None)
    if saved["measured"]["psnr"] is not None:
        assert saved["measured"]["psnr"] >= 30
    assert data["search"]["evaluated"] and data["search"]["attention_flop_share"] > 0
    # apply loads it; the settings are the file's
    handle = dit_accel.apply(pipe, preset=str(out))
    assert handle.preset.name == "tiny-30db"
    assert (handle.cache is None) == (saved["settings"]["cache"] is None)
    dit_accel.remove(pipe)
    # another model configuration is refused, naming both hashes
    other = tiny_testbed(num_layers=3)
    with pytest.raises(ValueError, match=f"file config_hash {model_config_hash(pipe)}.*{model_config_hash(other)}"):
        dit_accel.apply(other, preset=str(out))
    with pytest.raises(ValueError, match="calibrated for another model configuration"):
        load_preset_file(out, other)
    assert dit_accel.get_handle(other) is None


def test_preset_file_errors(tmp_path):
    pipe = tiny_testbed(num_layers=1)
    with pytest.raises(ValueError, match="does not exist"):
        dit_accel.apply(pipe, preset=str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "dit-accel-cache-schedule", "version": 1}))
    with pytest.raises(ValueError, match="'format' must be 'dit-accel-preset'"):
        dit_accel.apply(pipe, preset=str(bad))


def test_cli_refuses_a_bad_target_before_loading_and_one_mode_per_run(tmp_path, capsys):
    from dit_accel.cli import main

    assert main(["calibrate", "--steps", "4", "--target-psnr", "-3", "--out", str(tmp_path / "p.json")]) == 2
    assert "target_psnr must be a number of dB in (0, 100), got -3.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["calibrate", "--steps", "4", "--target-psnr", "30", "--budget", "0.5", "--out", str(tmp_path / "p.json")])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize(("steps", "shown"), [("0", "0"), ("2", "2"), ("x", "'x'")])
def test_cli_refuses_too_few_steps_naming_the_option(steps, shown, tmp_path, capsys):
    from dit_accel.calibration.cli import MIN_STEPS
    from dit_accel.cli import main

    for mode in (["--target-psnr", "30"], ["--budget", "0.5"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["calibrate", "--steps", steps, *mode, "--out", str(tmp_path / "p.json")])
        assert exit_info.value.code == 2
        assert f"argument --steps: expected an integer >= 3, got {shown}" in capsys.readouterr().err
    with pytest.raises(ValueError, match="num_steps must be an int >= 3"):  # the bound the option mirrors
        TargetSettings(target_psnr=30.0, num_steps=MIN_STEPS - 1)
    TargetSettings(target_psnr=30.0, num_steps=MIN_STEPS)


def test_an_interrupted_calibration_writes_the_best_result_so_far(tmp_path, monkeypatch):
    from dit_accel.calibration import target

    pipe = tiny_testbed(num_layers=2)
    original = target.Search.evaluate

    def evaluate_then_interrupt(self, c, source):
        if self.evaluated:
            raise KeyboardInterrupt("SIGTERM")
        return original(self, c, source)

    monkeypatch.setattr(target.Search, "evaluate", evaluate_then_interrupt)
    out = tmp_path / "cut.json"
    data = dit_accel.calibrate(
        pipe, ["a small red circle moving left on a striped background"], target_psnr=20, out=out, num_steps=4,
        budgets=(0.75, 0.5), top_ps=(0.5,), progress=False,
        call_kwargs=dict(height=128, width=128, num_frames=4, guidance_scale=1.0))
    saved = read_preset_file(out)
    assert saved["search"]["interrupted"] == "interrupted (SIGTERM)" and len(saved["search"]["evaluated"]) == 1
    assert saved["measured"]["candidate"] == saved["search"]["evaluated"][0]["candidate"]  # it met 20 dB
    assert "speedup" not in saved["timing"] and data["settings"]["cache"] == "procache"
