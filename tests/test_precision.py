"""bf16 asked for first, then measured: `--dtype auto` never picks an emulated bf16, a busy moment does not
decide the choice, and an explicit `--dtype bfloat16` on a CPU that emulates it says so once."""

from __future__ import annotations

import pytest
import torch

from gptlab import precision
from gptlab.train import device as device_module
from gptlab.train import train
from gptlab.train.config import build_train_config
from gptlab.train.device import resolve_dtype

CPU = torch.device("cpu")


def never(*args, **kwargs) -> float:
    raise AssertionError("bf16 was timed on a device without native bf16")


def test_auto_never_times_nor_picks_an_emulated_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """An AVX2 CPU whose float32 probe read 0.2 GFLOP/s on a busy moment: nothing is timed, float32 it is."""
    monkeypatch.setattr(precision, "bf16_native", lambda device: False)
    monkeypatch.setattr(device_module, "matmul_peak", never)
    assert resolve_dtype("auto", CPU) == "float32"
    assert resolve_dtype("auto", CPU, speedup=lambda: 100.0) == "float32"  # even a fabulous reading


@pytest.mark.parametrize("speedup, expected", [(2.0, "bfloat16"), (1.5, "bfloat16"), (1.2, "float32"), (0.1, "float32")])
def test_auto_takes_native_bf16_only_where_it_measures_faster(
    monkeypatch: pytest.MonkeyPatch, speedup: float, expected: str
) -> None:
    monkeypatch.setattr(precision, "bf16_native", lambda device: True)
    assert resolve_dtype("auto", CPU, speedup=lambda: speedup) == expected
    assert resolve_dtype("bfloat16", CPU, speedup=never) == "bfloat16"  # an explicit choice is kept, untimed


def test_auto_probes_bf16_and_float32_in_interleaved_rounds_keeping_each_best(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine is busy during the first float32 reading (0.2 GFLOP/s): the later, quiet rounds win."""
    monkeypatch.setattr(precision, "bf16_native", lambda device: True)
    readings = {torch.float32: [0.2e9, 100e9, 98e9], torch.bfloat16: [120e9, 118e9, 119e9]}
    order = []

    def peak(device, dtype, seconds, **shapes) -> float:
        order.append(dtype)
        return readings[dtype].pop(0)

    monkeypatch.setattr(device_module, "matmul_peak", peak)
    assert resolve_dtype("auto", CPU) == "float32"  # 1.2x: not the 1.5x bf16 must earn; 600x on one reading
    assert order == [torch.bfloat16, torch.float32] * 3


def test_interleaved_speedup_is_best_over_best() -> None:
    readings = iter([10.0, 1.0, 30.0, 20.0, 5.0, 2.0])  # bf16, fp32, bf16, fp32, ...
    assert precision.interleaved_speedup(lambda dtype: next(readings)) == pytest.approx(30.0 / 20.0)


def test_the_capability_question_matches_what_onednn_says() -> None:
    assert precision.bf16_native(CPU) == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert precision.bf16_native("meta") is False


def test_product_rate_measures_a_positive_rate() -> None:
    assert precision.product_rate(CPU, torch.float32, shapes=((32, 16, 8),)) > 0


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "_warned", set())


def test_explicit_bf16_on_an_emulating_cpu_warns_once_with_the_factor(
    monkeypatch: pytest.MonkeyPatch, fresh_warnings: None
) -> None:
    monkeypatch.setattr(precision, "bf16_speedup", lambda device: 1 / 25)  # 25x slower, as measured on AVX2
    monkeypatch.setattr(precision, "bf16_native", lambda device: False)
    said: list[str] = []
    assert precision.warn_if_emulated("bfloat16", CPU, said.append) == pytest.approx(0.04)
    precision.warn_if_emulated(torch.bfloat16, "cpu", said.append)  # a second loader in the same process
    assert len(said) == 1
    assert "25.0x slower than float32" in said[0] and "--dtype auto" in said[0] and "emulated" in said[0]


def test_bf16_that_measures_faster_or_another_dtype_says_nothing(
    monkeypatch: pytest.MonkeyPatch, fresh_warnings: None
) -> None:
    monkeypatch.setattr(precision, "bf16_speedup", lambda device: 2.5)
    said: list[str] = []
    assert precision.warn_if_emulated("bfloat16", CPU, said.append) == 2.5
    monkeypatch.setattr(precision, "bf16_speedup", never)
    assert precision.warn_if_emulated("float32", CPU, said.append) is None
    assert said == []


def test_training_with_explicit_bf16_on_an_emulating_cpu_warns(
    char_data, tmp_path, monkeypatch: pytest.MonkeyPatch, fresh_warnings: None, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(precision, "bf16_speedup", lambda device: 1 / 12.5)
    config = build_train_config(overrides=dict(
        n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=2, max_iters=1, eval_iters=1, sample_tokens=0,
        dtype="bfloat16", data=str(char_data), out=str(tmp_path / "run")))
    train(config, show_progress=False)
    err = capsys.readouterr().err
    assert err.count("--dtype bfloat16: this CPU multiplies bf16 matrices 12.5x slower than float32") == 1


EMULATED_25X = "--dtype bfloat16: this CPU multiplies bf16 matrices 25.0x slower than float32"


def test_sampling_and_serving_with_explicit_bf16_on_an_emulating_cpu_warn_once(
    tiny_run, monkeypatch: pytest.MonkeyPatch, fresh_warnings: None, capsys: pytest.CaptureFixture
) -> None:
    """`sample` and `serve` load through one function (inference.loading): both say it, with their way out."""
    import socket

    import uvicorn

    from gptlab.cli import main

    monkeypatch.setattr(precision, "bf16_speedup", never)  # float32, the default: nothing measured, nothing said
    assert main(["sample", str(tiny_run), "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert "warning" not in capsys.readouterr().err
    monkeypatch.setattr(precision, "bf16_speedup", lambda device: 1 / 25)
    assert main(["sample", str(tiny_run), "--dtype", "bfloat16", "--max-new-tokens", "2", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert err.count(EMULATED_25X) == 1 and "--dtype float32 is the faster here" in err

    monkeypatch.setattr(precision, "_warned", set())  # serve is another process in real life
    import gptlab.serve.runner as runner

    served = []
    create_app = runner.create_app
    monkeypatch.setattr(runner, "create_app", lambda model, *a, **k: served.append(model) or create_app(model, *a, **k))
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: [s.close() for s in sockets])
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    assert main(["serve", str(tiny_run), "--dtype", "bfloat16", "--port", str(port), "--device", "cpu"]) == 0
    assert served[0].transformer.wte.weight.dtype == torch.bfloat16  # what it would serve
    assert capsys.readouterr().err.count(EMULATED_25X) == 1


def test_the_peak_probe_keeps_the_best_of_one_thread_and_all(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a busy machine a two-thread product waits for its descheduled thread (0.5 GFLOP/s read where one
    thread ran at 17): the probe times both counts and keeps each product's best, then restores the count."""
    from gptlab import throughput
    from gptlab.config import GPTConfig

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = set()

        def timed(p, operands, device) -> float:
            seen.add(torch.get_num_threads())
            return p.flops / (17e9 if torch.get_num_threads() == 1 else 0.5e9)

        monkeypatch.setattr(throughput, "_time_product", timed)
        peak = throughput.matmul_peak("cpu", torch.float32, seconds=0.0, config=GPTConfig(
            vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32), rows=64)
        assert seen == {1, 2} and torch.get_num_threads() == 2
        assert peak == pytest.approx(17e9)
    finally:
        torch.set_num_threads(before)
