"""`--quantize int8` keeps int8 weights only where a whole decoding step with them, measured here, beats
the float one: a fake verdict either way takes the right weights, records its reason, says so once."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_model

from gptlab import quantize
from gptlab.inference import generate
from gptlab.kernels import chooser, force
from gptlab.quantize import FLOAT, INT8, Int8Embedding, Int8Linear, quantize_int8_where_faster


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """No choice made yet, in this process or on disk, nothing said yet, torch on two threads (a step is
    compared at one thread and at torch's count); yields the disk cache's path."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    path = tmp_path / "kernels.json"
    monkeypatch.setenv("GPTLAB_KERNEL_CACHE", str(path))
    monkeypatch.setenv("GPTLAB_KERNELS", "auto")
    monkeypatch.setattr(chooser, "_chosen", {})
    monkeypatch.setattr(chooser, "_logged", set())
    yield path
    assert torch.get_num_threads() == 2  # the comparison gave torch its count back
    torch.set_num_threads(threads)


I1, I2, F1, F2 = (f"{variant} at {n}" for variant in (INT8, FLOAT) for n in ("1 thread", "2 threads"))


@pytest.fixture(autouse=True)
def layers_pinned():
    """Each layer's own product pinned: these tests are about the whole step's verdict, and measuring
    every layer at two thread counts takes half a minute on a busy machine."""
    with force(int8="int8 kernel", linear="F.linear", attention="fused", gelu="tanh"):
        yield


def step_verdict(monkeypatch: pytest.MonkeyPatch, int8_ms: float, float_ms: float) -> list[list[str]]:
    """Replace the timing of the whole-step comparison (only) by fixed medians; the layers measure for real.
    Returns the candidates each faked comparison saw."""
    real = chooser._time_candidates
    seen = []

    def timing(candidates, rounds, clock, unavailable, budget=chooser.BUDGET_SECONDS, timed=None):
        if not all(name.startswith((INT8, FLOAT)) for name in candidates):
            return real(candidates, rounds, clock, unavailable, budget, timed)
        seen.append(sorted(candidates))
        for name in candidates:
            candidates[name]()  # the warm-up: each variant runs, so the layers make their own choices
        # at one thread 1 ms slower than at torch's count, whatever that is
        medians = {name: (int8_ms if name.startswith(INT8) else float_ms) / 1e3 + (0.001 if " 1 thread" in name else 0)
                   for name in candidates}
        if timed is not None:
            timed.update({name: [medians[name]] * rounds for name in candidates})
        return medians

    monkeypatch.setattr(chooser, "_time_candidates", timing)
    return seen


def test_where_int8_is_slower_the_float_weights_decode(
    fresh: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    seen = step_verdict(monkeypatch, int8_ms=30.0, float_ms=20.0)
    model = tiny_model(vocab_size=64)
    reference = copy.deepcopy(model)
    idx = torch.tensor([[1, 2, 3]])
    expected = generate(reference, idx, 8, temperature=0)
    weights = {name: p.clone() for name, p in model.named_parameters()}

    assert quantize_int8_where_faster(model) is False
    assert seen == [sorted([I1, I2, F1, F2])]
    assert not any(isinstance(m, (Int8Linear, Int8Embedding)) for m in model.modules())
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())  # the float weights, unchanged
    assert torch.equal(generate(model, idx, 8, temperature=0), expected)

    (key,) = [k for k in json.loads(fresh.read_text()) if "int8 decoding step" in k]
    entry = json.loads(fresh.read_text())[key]
    assert entry["choice"] == F2 and entry["seconds"] == pytest.approx({I1: 0.031, I2: 0.03, F1: 0.021, F2: 0.02})
    assert entry["reason"] == (f"a decoding step at batch 1: {I1} 31 ms, {I2} 30 ms, {F1} 21 ms, {F2} 20 ms "
                               f"(median of {quantize.STEP_ROUNDS} interleaved rounds); {F2} fastest")

    # a second model in this process, its verdict read from the process's record: said once, not twice
    assert quantize_int8_where_faster(tiny_model(vocab_size=64)) is False
    said = [r.getMessage() for r in caplog.records if r.name == "gptlab.quantize"]
    assert len(said) == 1 and "keeping the float weights" in said[0] and f"{I2} 30 ms, {F1} 21 ms" in said[0]
    assert "\n" not in said[0]


def test_a_new_process_takes_the_recorded_verdict_without_measuring(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    step_verdict(monkeypatch, int8_ms=30.0, float_ms=20.0)
    assert quantize_int8_where_faster(tiny_model(vocab_size=64)) is False
    monkeypatch.setattr(chooser, "_chosen", {})  # as a new process on the same machine
    monkeypatch.setattr(chooser, "_time_candidates", lambda *a, **k: pytest.fail("measured again"))
    assert quantize_int8_where_faster(tiny_model(vocab_size=64)) is False


def test_where_int8_is_faster_the_int8_weights_decode(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    step_verdict(monkeypatch, int8_ms=10.0, float_ms=20.0)
    model = tiny_model(vocab_size=64)
    assert quantize_int8_where_faster(model) is True
    assert isinstance(model.lm_head, Int8Linear) and isinstance(model.transformer.wte, Int8Embedding)
    assert model.transformer.wte.shared[0] is model.lm_head
    entry = chooser.entry(next(k for k in chooser._chosen if k[0] == "int8 decoding step"))
    assert entry["choice"] == I2 and f"{I2} fastest" in entry["reason"]


def test_the_real_measurement_leaves_a_working_model_and_its_record(fresh: Path) -> None:
    """Whatever this machine's verdict, the model decodes like the float one up to int8 rounding, and the
    record holds both medians over at least STEP_ROUNDS interleaved rounds."""
    model = tiny_model(vocab_size=64)
    reference = copy.deepcopy(model)
    kept = quantize_int8_where_faster(model)
    entry = chooser.entry(next(k for k in chooser._chosen if k[0] == "int8 decoding step"))
    assert entry["choice"].startswith(INT8 if kept else FLOAT)
    assert set(entry["seconds"]) | set(entry.get("dropped", {})) == {I1, I2, F1, F2}
    assert entry["rounds"] >= quantize.STEP_ROUNDS
    idx = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        torch.testing.assert_close(model(idx).logits, reference(idx).logits, rtol=0, atol=0.02)
    assert not model.training  # it was in eval mode, and stays so


def test_plain_mode_keeps_int8_and_measures_nothing(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPTLAB_KERNELS", "plain")
    monkeypatch.setattr(chooser, "_time_candidates", lambda *a, **k: pytest.fail("measured in plain mode"))
    model = tiny_model(vocab_size=64)
    assert quantize_int8_where_faster(model) is True
    assert isinstance(model.lm_head, Int8Linear)
    generate(model, torch.tensor([[1, 2]]), 3, temperature=0)  # decodes (dequantized products) without measuring
    assert not fresh.exists()


@pytest.mark.parametrize("verdict", [INT8, FLOAT])
def test_force_pins_the_verdict(fresh: Path, monkeypatch: pytest.MonkeyPatch, verdict: str) -> None:
    monkeypatch.setattr(chooser, "_time_candidates", lambda *a, **k: pytest.fail("measured a pinned verdict"))
    model = tiny_model(vocab_size=64)
    with force(int8_step=verdict):
        assert quantize_int8_where_faster(model) is (verdict == INT8)
    assert isinstance(model.lm_head, Int8Linear) is (verdict == INT8)
