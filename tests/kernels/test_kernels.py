"""Kernels: every candidate computes the plain operation, and the measured choice takes the faster one."""

from __future__ import annotations

import importlib
import itertools
import subprocess
import sys
import json
import os
import platform
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import needs_compile, tiny_model

from gptlab import kernels
from gptlab.kernels import chooser
from gptlab.config import GPTConfig
from gptlab.inference.cache import SlotCache
from gptlab.kernels import can_prepack, fastest, force, matvec_rows, prepacked_product, sigmoid_form_gelu, tall_product
from gptlab.model import GPT

from gptlab.kernels import products as linear_module  # noqa: E402


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No choice made yet, in this process or on disk; returns the disk cache's path."""
    path = tmp_path / "kernels.json"
    monkeypatch.setenv("GPTLAB_KERNEL_CACHE", str(path))
    monkeypatch.setenv("GPTLAB_KERNELS", "auto")  # these tests measure, also where CI runs the rest plain
    monkeypatch.setattr(chooser, "_chosen", {})
    return path


class FakeClock:
    """A clock that only the fake candidates move, each by its own fixed cost: no real timing."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def candidate(self, name: str, cost: float):
        def run() -> None:
            self.calls.append(name)
            self.now += cost
        return run


@pytest.mark.parametrize("costs", [{"a": 3.0, "b": 1.0}, {"a": 1.0, "b": 3.0}, {"a": 2.0, "b": 2.5, "c": 0.5}])
def test_the_choice_is_the_fastest_candidate(fresh: Path, costs: dict[str, float]) -> None:
    clock = FakeClock()
    build = lambda name: clock.candidate(name, costs[name])  # noqa: E731
    chosen = fastest(("op", 1), tuple(costs), build, plain="a", rounds=3, clock=clock)
    assert chosen == min(costs, key=costs.get)
    assert sorted(clock.calls) == sorted(list(costs) * 4)  # one warm-up call and 3 timed rounds each


def test_a_candidate_is_judged_by_its_median_round_not_its_luckiest(fresh: Path) -> None:
    """On a busy machine: b has one lucky round (0.4) and is otherwise slow (a row-block product that
    took 0.4 ms once and 10 ms a call after): its median, not its fastest round, is its figure."""
    clock = FakeClock()
    b_costs = iter([9.0] + [9.0, 0.4, 9.0, 9.0, 9.0] + [9.0] * 40)  # warm-up, then rounds
    candidates = {"a": clock.candidate("a", 1.0)}

    def b() -> None:
        clock.now += next(b_costs)

    candidates["b"] = b
    assert fastest(("op", 2), ("a", "b"), candidates.get, plain="a", rounds=5, clock=clock) == "a"
    assert json.loads(fresh.read_text())[str(("op", 2))]["seconds"] == {"a": 1.0, "b": 9.0}


def test_rounds_are_interleaved_and_go_on_while_the_figures_spread(fresh: Path) -> None:
    """A busy machine: a's rounds are disturbed at first; the rounds go on (past the minimum of 3)
    until every median is within 10% of its candidate's fastest round, each round in the other order."""
    clock = FakeClock()
    a_costs = iter([5.0] + [3.0, 1.0, 3.0, 1.0, 1.0, 1.0] + [1.0] * 40)

    def a() -> None:
        clock.calls.append("a")
        clock.now += next(a_costs)

    candidates = {"a": a, "b": clock.candidate("b", 1.5)}
    chosen = fastest(("op", 6), ("a", "b"), candidates.get, plain="a", rounds=3, clock=clock)
    # medians after rounds 3, 4, 5: 3, 2, 1 (> 1.1 x 1 until the fifth); a wins by its median of 1
    assert chosen == "a" and clock.calls.count("b") == 1 + 5
    assert clock.calls[2:6] == ["a", "b", "b", "a"]  # after the warm-ups: the order reverses every round
    assert json.loads(fresh.read_text())[str(("op", 6))]["rounds"] == 5


def test_a_slow_candidate_stops_being_timed_after_three_rounds(fresh: Path) -> None:
    """A clearly slower candidate (a 150-ms dequantizing head beside 6-ms products) costs three rounds, not all."""
    clock = FakeClock()
    costs = {"quick": 1.0, "slow": 25.0}
    build = lambda name: clock.candidate(name, costs[name])  # noqa: E731
    assert fastest(("op", 7), tuple(costs), build, plain="quick", rounds=9, clock=clock) == "quick"
    assert clock.calls.count("slow") == 1 + 3 and clock.calls.count("quick") == 1 + 9


def test_a_choice_is_measured_once_per_machine(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    costs = {"slow": 2.0, "quick": 1.0}
    build = lambda name: clock.candidate(name, costs[name])  # noqa: E731
    assert fastest(("op", 3), tuple(costs), build, plain="slow", clock=clock) == "quick"
    measured = len(clock.calls)

    def no_build(name: str):
        raise AssertionError("measured again")

    assert fastest(("op", 3), tuple(costs), no_build, plain="slow") == "quick"  # this process remembers
    assert json.loads(fresh.read_text()) == {str(("op", 3)): {"choice": "quick", "seconds": costs, "rounds": 5}}
    monkeypatch.setattr(chooser, "_chosen", {})  # as a new process on the same machine
    assert fastest(("op", 3), tuple(costs), no_build, plain="slow") == "quick"
    assert len(clock.calls) == measured
    # a choice on disk that is not a candidate (an older version's) is measured again
    fresh.write_text(json.dumps({str(("op", 3)): {"choice": "gone"}}))
    monkeypatch.setattr(chooser, "_chosen", {})
    assert fastest(("op", 3), tuple(costs), build, plain="slow", clock=clock) == "quick"


def test_the_disk_cache_can_be_turned_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GPTLAB_KERNEL_CACHE", "off")
    monkeypatch.setenv("GPTLAB_KERNELS", "auto")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(chooser, "_chosen", {})
    clock = FakeClock()
    assert fastest(("op", 4), ("x",), lambda name: clock.candidate(name, 1.0), plain="x", clock=clock) == "x"
    assert list(tmp_path.iterdir()) == []


def test_measuring_leaves_the_random_state_alone(fresh: Path) -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    fastest(("op", 5), ("draws",), lambda name: lambda: torch.rand(100), plain="draws")
    assert torch.equal(torch.rand(3), expected)


def test_force_pins_a_choice_and_checks_its_name() -> None:
    with pytest.raises(ValueError, match="attention must be one of"):
        with force(attention="quick"):
            pass
    with pytest.raises(ValueError, match="no choice named 'matmul'"):
        with force(matmul="F.linear"):
            pass
    with force(linear="row blocks"):
        assert kernels.linear_path(torch.zeros(1, 8), torch.zeros(4, 8)) == "row blocks"


def test_the_real_operations_go_through_the_choice(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the timing replaced by a fixed verdict, each operation runs the candidate it was told is fastest."""
    winners = ("W @ x^T", "textbook", "sigmoid")
    monkeypatch.setattr(chooser, "_time_candidates", lambda candidates, *args: {
        name: 0.0 if name in winners else 1.0 for name in candidates})
    called = []
    for table, name in zip((kernels.LINEAR_PRODUCTS, kernels.ATTENTION_PATHS, kernels.GELU_FORMS), winners):
        monkeypatch.setitem(table, name, lambda *a, f=table[name], n=name: called.append(n) or f(*a))
    x = torch.randn(2, 1, 32)
    q = torch.randn(2, 2, 8, 16)
    with torch.inference_mode():
        kernels.linear(x, torch.randn(64, 32))
        kernels.attention(q, q, q)
        kernels.gelu(x)
    assert called == list(winners)


def test_training_products_take_f_linear_without_measuring(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chooser, "fastest", lambda *a, **k: pytest.fail("measured a training product"))
    w = torch.randn(64, 32, requires_grad=True)
    kernels.linear(torch.randn(1, 32), w).sum().backward()  # autograd on: F.linear
    with torch.inference_mode():
        kernels.linear(torch.randn(kernels.DECODE_ROWS + 1, 32), w)  # a prefill's many rows: F.linear


@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("rows", [1, 2, 4, 7])
def test_every_linear_candidate_equals_f_linear(n_threads: int, rows: int) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        g = torch.Generator().manual_seed(rows)
        weight = torch.randn(1001, 300, generator=g)  # 1001 rows: a remainder for 2 and for 3 threads
        bias = torch.randn(1001, generator=g)
        x = torch.randn(rows, 1, 300, generator=g)  # (B, T, in) as a decoding step has it
        with torch.inference_mode():
            for b in (bias, None):
                for product in (matvec_rows, tall_product, *([prepacked_product] if can_prepack(weight) else [])):
                    got = product(x, weight, b)
                    assert got.shape == (rows, 1, 1001)
                    # row-major like F.linear's: a transposed result sends attention to its slow math kernel
                    assert got.is_contiguous(), product.__name__
                    torch.testing.assert_close(got, F.linear(x, weight, b), rtol=0, atol=1e-4)
    finally:
        torch.set_num_threads(before)


def test_a_prepacked_weight_follows_changes_to_the_weight() -> None:
    """The reordered copy is made once, reused, and made again after the weight changes in place."""
    weight = torch.randn(64, 32)
    if not can_prepack(weight):
        pytest.skip("this torch build has no oneDNN (mkldnn), so there is no prepacked product")
    x = torch.randn(3, 32)
    with torch.inference_mode():
        first = kernels.prepacked_weight(weight)
        assert kernels.prepacked_weight(weight) is first
    with torch.no_grad():
        weight.mul_(2)  # as load_state_dict or an optimizer step changes a parameter
    with torch.inference_mode():
        assert kernels.prepacked_weight(weight) is not first
        torch.testing.assert_close(prepacked_product(x, weight), F.linear(x, weight), rtol=0, atol=1e-5)


class GrowingCache:
    """The plainest cache the model's protocol allows: each layer's keys and values concatenated, no mask
    (the queries sit at the end of the keys). The engine's own cache is tested in test_generation."""

    def __init__(self, n_layer: int) -> None:
        self.kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layer
        self.length = 0

    def positions(self, T: int) -> torch.Tensor:
        return torch.arange(self.length, self.length + T)

    def layer(self, i: int):
        cache = self

        class Layer:
            def update(self, k: torch.Tensor, v: torch.Tensor):
                old = cache.kv[i]
                cache.kv[i] = (k, v) if old is None else (torch.cat([old[0], k], 2), torch.cat([old[1], v], 2))
                return (*cache.kv[i], None)

        return Layer()


def cached_step(model: GPT, idx: torch.Tensor, cache: GrowingCache) -> torch.Tensor:
    """(B, T) tokens after the cache's contents -> (B, V) logits of the last one, as decoding runs it."""
    h = model.hidden_states(idx, cache)
    cache.length += idx.size(1)
    return model.lm_head(h[:, -1])


@pytest.mark.parametrize("path", kernels.LINEAR_PRODUCTS)
def test_decoding_through_each_linear_candidate_matches_the_uncached_model(path: str) -> None:
    if path == "prepacked" and not can_prepack(torch.zeros(2, 2)):
        pytest.skip("this torch build has no oneDNN (mkldnn), so there is no prepacked product")
    if path == linear_module.FP16:
        pytest.skip("offered for bf16 weights only (this model is float32): "
                    "test_the_fp16_weight_product_is_offered_for_bf16_weights_only_and_rounds_as_bf16 checks it")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=1101, block_size=24, n_layer=2, n_head=4, n_embd=256)).eval()
    seq = torch.randint(0, 1101, (6, 24), generator=torch.Generator().manual_seed(3))
    expected = model(seq).logits  # (B, T, V)
    for rows in (1, 2, 6):
        cache = GrowingCache(model.config.n_layer)
        with torch.inference_mode(), force(linear=path):
            got = [cached_step(model, seq[:rows, :3], cache)]
            got += [cached_step(model, seq[:rows, t : t + 1], cache) for t in range(3, 24)]
        torch.testing.assert_close(torch.stack(got, 1), expected[:rows, 2:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("path", kernels.ATTENTION_PATHS)
def test_decoding_through_each_attention_path_matches_the_uncached_model(path: str) -> None:
    """Both paths with the caches' masks: a prefill after cached keys, single steps, rows at different
    lengths (the engine's slot cache: a mask per row)."""
    model = tiny_model(block_size=16)
    seq = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(1))
    expected = model(seq).logits
    cache = GrowingCache(model.config.n_layer)
    with torch.inference_mode(), force(attention=path):
        got = [cached_step(model, seq[:, :5], cache), cached_step(model, seq[:, 5:9], cache)]
        got += [cached_step(model, seq[:, t : t + 1], cache) for t in range(9, 16)]
    torch.testing.assert_close(torch.stack(got, 1), expected[:, [4, 8, *range(9, 16)]], rtol=0, atol=1e-5)
    slots = SlotCache(model.config, device=torch.device("cpu"), dtype=torch.float32)
    slots.ensure(2, 16)
    with torch.inference_mode(), force(attention=path):
        model.hidden_states(seq[:2, :8], slots.prefill(0, 2))  # row 1 uses only its first 5 positions
        for at in ([8, 5], [9, 6]):
            idx = seq[torch.arange(2), torch.tensor(at)][:, None]
            got = model.lm_head(model.hidden_states(idx, slots.decode(at))[:, -1])
            torch.testing.assert_close(got, expected[torch.arange(2), torch.tensor(at)], rtol=0, atol=1e-5)


@pytest.mark.parametrize("path", kernels.ATTENTION_PATHS)
def test_each_attention_path_in_bfloat16_is_float32_up_to_rounding(path: str) -> None:
    model = tiny_model(block_size=16)
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = model(idx).logits
    with torch.autocast("cpu", dtype=torch.bfloat16), force(attention=path):
        logits = model(idx).logits
    assert logits.dtype == torch.bfloat16
    error = (logits.float() - reference).abs().max().item()
    assert error < 0.02 * reference.abs().max().item(), error


def test_the_sigmoid_form_is_the_tanh_gelu_forward_and_backward() -> None:
    x = torch.linspace(-12, 12, 4001, dtype=torch.float64, requires_grad=True)
    expected = F.gelu(x, approximate="tanh")
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    got = sigmoid_form_gelu(x)
    (got_grad,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_grad, expected_grad, rtol=0, atol=1e-12)
    erf = F.gelu(x)  # the control: the exact GELU is a different function at this tolerance
    assert (erf - expected).abs().max().item() > 1e-4


@pytest.mark.slow
@needs_compile()
@pytest.mark.parametrize("form", kernels.GELU_FORMS)
def test_a_compiled_graph_takes_the_measured_gelu_form(
    fresh: Path, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    """The choice is made while torch.compile traces (eagerly, once) and lands in the graph as a constant."""
    torch._dynamo.reset()
    verdicts = []

    def verdict(candidates, *args):
        verdicts.append(sorted(candidates))
        return {name: 0.0 if name == form else 1.0 for name in candidates}

    monkeypatch.setattr(chooser, "_time_candidates", verdict)
    traced = []
    monkeypatch.setitem(kernels.GELU_FORMS, form, lambda x, f=kernels.GELU_FORMS[form]: traced.append(1) or f(x))
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    eager = F.gelu(x, approximate="tanh")
    (eager_grad,) = torch.autograd.grad(eager.sum(), x)
    compiled_gelu = torch.compile(kernels.gelu)
    compiled = compiled_gelu(x)
    (compiled_grad,) = torch.autograd.grad(compiled.sum(), x)
    assert traced  # the graph holds the chosen form
    compiled_gelu(x)
    assert verdicts == [["sigmoid", "tanh"]]  # measured once, while tracing
    torch.testing.assert_close(compiled, eager)  # float32's default tolerances: another formula rounds otherwise
    torch.testing.assert_close(compiled_grad, eager_grad)


def test_decoding_candidates_are_timed_on_weights_read_from_memory(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoding step reads each weight after all the others: the candidates must not all meet one
    cache-resident matrix. They see copies in turn, equal to the weight, twice the cache in all."""
    monkeypatch.setattr(linear_module, "largest_cache_bytes", lambda: 4096)
    weight = torch.randn(16, 32)  # 2 KiB: four copies make twice the fake 4 KiB cache
    seen: list[torch.Tensor] = []

    def recording(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        seen.append(w)
        return F.linear(x, w, bias)

    monkeypatch.setattr(linear_module, "LINEAR_PRODUCTS", {"F.linear": recording})
    with torch.inference_mode():
        kernels.linear_path(torch.randn(1, 32), weight)
    copies = {w.data_ptr(): w for w in seen}
    assert len(copies) == 4 and weight.data_ptr() in copies
    spans = sorted((w.data_ptr(), w.data_ptr() + w.nbytes) for w in copies.values())
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))  # four separate matrices
    assert all(torch.equal(w, weight) for w in seen)
    big = list(itertools.islice(itertools.cycle(kernels.from_memory(torch.randn(64, 64))), 5))  # 16 KiB > twice the cache
    assert all(w is big[0] for w in big)


def test_measurement_copies_reuse_scratch_memory_no_live_copy_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    """from_memory's copies live in scratch buffers kept between measurements (fresh memory costs a page
    fault per 4 KiB: 460 ms against 34 ms for GPT-2's copies of one weight), never shared by live copies."""
    monkeypatch.setattr(linear_module, "largest_cache_bytes", lambda: 4096)
    kernels.release_scratch()
    a, b = torch.randn(16, 32), torch.randn(16, 32)  # 2 KiB each: three copies beside the weight
    first = kernels.from_memory(a)
    second = kernels.from_memory(b)  # while the first copies live: other memory
    assert all(torch.equal(c, a) for c in first) and all(torch.equal(c, b) for c in second)
    assert not {c.data_ptr() for c in first[1:]} & {c.data_ptr() for c in second[1:]}
    reused = first[1].data_ptr()
    del first
    again = kernels.from_memory(torch.randn(16, 32))
    assert again[1].data_ptr() == reused  # the first copies are gone: their memory serves again
    ints = kernels.from_memory(torch.randint(-127, 128, (64, 32), dtype=torch.int8))  # 2 KiB of int8
    assert all(c.dtype == torch.int8 and torch.equal(c, ints[0]) for c in ints)
    kernels.release_scratch()
    assert linear_module._scratch == []


def test_prepacked_copies_are_reordered_before_the_clock_starts(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each copy a decoding candidate meets is reordered once, before timing: a timed call that
    reorders would charge the prepacked product for work a decoding step never does."""
    weight = torch.randn(16, 32)
    if not can_prepack(weight):
        pytest.skip("this torch build has no oneDNN (mkldnn), so there is no prepacked product")
    monkeypatch.setattr(linear_module, "largest_cache_bytes", lambda: 4096)  # four copies of the 2 KiB weight
    timing = chooser._time_candidates
    reordered_while_timed = []

    def spy(candidates, *args):
        before = len(linear_module._PREPACKED)
        seconds = timing(candidates, *args)
        reordered_while_timed.append(len(linear_module._PREPACKED) - before)
        return seconds

    monkeypatch.setattr(chooser, "_time_candidates", spy)
    with torch.inference_mode():
        kernels.linear_path(torch.randn(1, 32), weight)
    assert reordered_while_timed == [0]


def test_decoding_rows_share_a_measurement_per_power_of_two(fresh: Path) -> None:
    """A server's batch passes through every size: 5, 6, 7 and 8 rows take one measurement, not four."""
    weight = torch.randn(64, 32)
    with torch.inference_mode():
        for rows in (5, 6, 7, 8):
            kernels.linear(torch.randn(rows, 1, 32), weight)
    assert [key[1] for key in chooser._chosen if key[0] == "linear"] == [8]


@pytest.mark.slow
def test_the_engine_warms_up_every_batch_size_it_will_decode(fresh: Path) -> None:
    """Engine.warm_up (the server runs it before its first request) makes the kernels' choices for batch
    sizes 1, 2, 4, 8 up to max_batch, so no request waits on a measurement."""
    from gptlab.inference import Engine

    model = tiny_model()
    Engine(model, max_batch=6).warm_up()
    rows = {key[1] for key in chooser._chosen if key[0] == "linear"}
    assert rows == {1, 2, 4, 8}


# --- the guard: a candidate that cannot run here is never chosen -----------------------------------


class Broken(RuntimeError):
    pass


def breaking_at(stage: str, clock: FakeClock):
    """A build for candidates "broken" (the fastest, were it to run) and "ok", where "broken" raises
    at `stage`: while it is built, at its warm-up call, or in a timed round."""
    def build(name: str):
        if name == "ok":
            return clock.candidate("ok", 2.0)
        if stage == "build":
            raise Broken("needs an instruction this CPU lacks")
        calls = itertools.count()

        def run() -> None:
            if next(calls) == (0 if stage == "warm-up" else 2):
                raise Broken("needs an instruction this CPU lacks")
            clock.now += 0.5
        return run
    return build


@pytest.mark.parametrize("stage", ["build", "warm-up", "timing"])
def test_a_candidate_that_raises_is_never_chosen_and_is_recorded_with_its_reason(
    fresh: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, stage: str
) -> None:
    monkeypatch.setattr(chooser, "_logged", set())
    for n in (1, 2):  # two keys, one failure: logged once
        clock = FakeClock()
        assert fastest(("op", stage, n), ("broken", "ok"), breaking_at(stage, clock), plain="ok", clock=clock) == "ok"
        entry = json.loads(fresh.read_text())[str(("op", stage, n))]
        assert entry["choice"] == "ok" and set(entry["seconds"]) == {"ok"}
        assert entry["unavailable"] == {"broken": "Broken: needs an instruction this CPU lacks"}
    logged = [r.getMessage() for r in caplog.records if r.name == "gptlab.kernels"]
    assert len(logged) == 1 and "'broken' is unavailable" in logged[0] and "needs an instruction" in logged[0]
    assert "\n" not in logged[0]


def test_a_key_whose_every_candidate_fails_takes_the_plain_call(fresh: Path) -> None:
    def build(name: str):
        raise Broken(f"{name} cannot run here")

    assert fastest(("op", "all fail"), ("a", "b"), build, plain="plain") == "plain"
    entry = json.loads(fresh.read_text())[str(("op", "all fail"))]
    assert entry["choice"] == "plain" and set(entry["unavailable"]) == {"a", "b"}


def test_a_linear_candidate_that_raises_leaves_the_others_measured(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As oneDNN's bf16 reorder did on an AVX2 CPU: one candidate fails to build and decoding goes on."""
    def failing(x, w, b=None):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert")

    monkeypatch.setitem(linear_module.LINEAR_PRODUCTS, "row blocks", failing)
    weight, x = torch.randn(64, 32), torch.randn(1, 32)
    with torch.inference_mode():
        y = kernels.linear(x, weight)
    torch.testing.assert_close(y, F.linear(x, weight), rtol=0, atol=1e-5)
    (entry,) = json.loads(fresh.read_text()).values()
    assert entry["choice"] != "row blocks" and "avx_ne_convert" in entry["unavailable"]["row blocks"]


def test_prepacking_is_offered_only_for_dtypes_onednn_runs_here() -> None:
    """oneDNN's bf16 reorder raises where the CPU lacks AVX-512 (or avx_ne_convert): ask before trying."""
    bf16 = can_prepack(torch.zeros(4, 4, dtype=torch.bfloat16))
    assert bf16 == (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert not can_prepack(torch.zeros(4, 4, dtype=torch.float16))


# --- GPTLAB_KERNELS=plain ------------------------------------------------------------------------


def test_plain_mode_runs_plain_torch_and_measures_nothing(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPTLAB_KERNELS", "plain")
    monkeypatch.setattr(chooser, "_time_candidates", lambda *a: pytest.fail("measured in plain mode"))
    called = []
    for table, name in ((kernels.LINEAR_PRODUCTS, "F.linear"), (kernels.ATTENTION_PATHS, "fused"),
                        (kernels.GELU_FORMS, "tanh")):
        for other in table:
            monkeypatch.setitem(table, other, lambda *a, f=table[other], n=other: called.append(n) or f(*a))
    int8_module = importlib.import_module("gptlab.kernels.int8")
    for other, product in int8_module.INT8_PRODUCTS.items():
        monkeypatch.setitem(int8_module.INT8_PRODUCTS, other, lambda *a, f=product, n=other: called.append(n) or f(*a))
    values, scales = torch.randint(-127, 128, (64, 32), dtype=torch.int8), torch.rand(64)
    with torch.inference_mode():
        kernels.linear(torch.randn(1, 32), torch.randn(64, 32))
        kernels.attention(*[torch.randn(2, 2, 8, 16)] * 3)
        kernels.gelu(torch.randn(1, 32))
        kernels.int8_linear(torch.randn(1, 32), values, scales)
    assert called == ["F.linear", "fused", "tanh", "dequantized"]
    assert not fresh.exists()


def test_an_unknown_kernels_mode_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from gptlab.errors import GptlabError

    monkeypatch.setenv("GPTLAB_KERNELS", "fast")
    with pytest.raises(GptlabError, match="GPTLAB_KERNELS must be 'auto' or 'plain' \\(or unset\\), got 'fast'"):
        kernels.gelu(torch.randn(4))


def test_the_machine_fingerprint_tells_a_limited_process_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process held to fewer instruction sets (or plain) never reads the choices of a full one."""
    # ATen and oneDNN read ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA once, when first asked: not below
    chooser._machine_fingerprint()
    limits = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "default", "GPTLAB_KERNELS": "plain"}
    for name in ("GPTLAB_KERNEL_CACHE", *limits):
        monkeypatch.delenv(name, raising=False)
    full = chooser.cache_path()
    for name, value in limits.items():
        with monkeypatch.context() as m:
            m.setenv(name, value)
            assert chooser.cache_path() != full, name


# --- a lesser CPU: torch and oneDNN held to AVX2 -------------------------------------------------


@pytest.mark.skipif(not (os.environ.get("ATEN_CPU_CAPABILITY") or os.environ.get("ONEDNN_MAX_CPU_ISA")),
                    reason="no instruction-set limit in the environment (`make test` runs this file again with one)")
def test_the_instruction_set_limits_in_the_environment_take_effect() -> None:
    """`make test` runs the kernel tests again as a lesser CPU would: the limits must really hold."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the limits are x86 instruction sets")
    levels = ["DEFAULT", "AVX2", "AVX512"]  # ATen's on x86, lowest first; a CPU below the limit keeps its own
    capability = os.environ.get("ATEN_CPU_CAPABILITY", "").upper()
    if capability in levels:
        assert levels.index(torch.backends.cpu.get_cpu_capability()) <= levels.index(capability)
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in ("SSE41", "AVX", "AVX2"):
        assert not torch.ops.mkldnn._is_mkldnn_bf16_supported()  # oneDNN's bf16 needs AVX-512 or avx_ne_convert
        assert not can_prepack(torch.zeros(4, 4, dtype=torch.bfloat16))


LESSER_CPU = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
SAMPLE_BOTH_WAYS = """
import contextlib, io, json, os, sys, torch
from gptlab.cli import main
from gptlab.kernels import can_prepack
out = {"bf16 onednn": torch.ops.mkldnn._is_mkldnn_bf16_supported(),
       "capability": torch.backends.cpu.get_cpu_capability(),
       "prepack bf16": can_prepack(torch.zeros(4, 4, dtype=torch.bfloat16))}
for dtype in ("float32", "bfloat16", "int8"):
    for mode in ("auto", "plain"):
        os.environ["GPTLAB_KERNELS"] = mode
        text, err = io.StringIO(), io.StringIO()
        how = ["--quantize", "int8"] if dtype == "int8" else ["--dtype", dtype]
        with contextlib.redirect_stdout(text), contextlib.redirect_stderr(err):
            code = main(["sample", sys.argv[1], "--max-new-tokens", "24", "--seed", "0", "--prompt", "All:", *how])
        out[dtype + " " + mode] = [code, text.getvalue(), err.getvalue()]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_sampling_on_an_avx2_cpu_works_and_matches_the_plain_path(tiny_run: Path, tmp_path: Path) -> None:
    """On a CPU without AVX-512 (emulated by holding torch and oneDNN to AVX2), `gptlab sample` in float32,
    bfloat16 and int8 runs, measured kernels or plain; float32's sampled tokens (a seed: every probability
    counts, not only the largest) equal the plain path's."""
    from helpers import child_env

    env = child_env(**LESSER_CPU, GPTLAB_KERNEL_CACHE=str(tmp_path / "kernels.json"))
    done = subprocess.run([sys.executable, "-c", SAMPLE_BOTH_WAYS, str(tiny_run)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["capability"] == "AVX2" and out["bf16 onednn"] is False and out["prepack bf16"] is False
    for run in ("float32", "bfloat16", "int8"):
        for mode in ("auto", "plain"):
            code, text, err = out[f"{run} {mode}"]
            assert code == 0 and "Traceback" not in err and text.startswith("All:") and len(text) == 4 + 24 + 1, (run, err)
    assert out["float32 auto"][1] == out["float32 plain"][1]


def test_the_one_thread_attention_is_the_fused_one_and_gives_the_threads_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoding step's small attention may run on one thread (a 2-thread parallel region stalled 8 ms a
    call on a shared 2-core CPU); it computes the fused kernel's numbers, and torch's thread count is
    restored afterwards, also when the kernel raises. It is offered only with several threads and no autograd."""
    from gptlab.kernels import attention_paths

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8)
        torch.testing.assert_close(attention_paths.one_thread_fused_attention(q, k, k), kernels.fused_attention(q, k, k),
                                   rtol=0, atol=0)
        seen = []

        def failing(*args):
            seen.append(torch.get_num_threads())
            raise RuntimeError("kernel failed")

        monkeypatch.setattr(attention_paths, "fused_attention", failing)
        with pytest.raises(RuntimeError):
            attention_paths.one_thread_fused_attention(q, k, k)
        assert seen == [1] and torch.get_num_threads() == 2
        offered = []
        monkeypatch.setattr(chooser, "fastest", lambda key, names, build, **kw: offered.append(names) or names[0])
        attention_paths.attention_path(kernels.attention_key(q, k, None, 0.0))
        torch.set_num_threads(1)
        attention_paths.attention_path(kernels.attention_key(q, k, None, 0.0))
        assert attention_paths.ONE_THREAD in offered[0] and attention_paths.ONE_THREAD not in offered[1]
    finally:
        torch.set_num_threads(before)


def test_the_bf16_copy_of_an_int8_weight_is_offered_only_where_onednn_runs_bf16() -> None:
    """An int8 layer may decode through a bf16 copy of its dequantized weight (oneDNN's bf16 product reads
    memory faster than torch's int8 kernel computes on an AVX-512-bf16 CPU); where the CPU lacks bf16
    instructions (AVX2: oneDNN's bf16 reorder raises) it is not a candidate. Its numbers are the
    dequantized product's up to bf16 rounding, and the copy is freed when no choice uses it."""
    from gptlab.kernels.int8 import KEPT_BF16, FloatCopy, _available
    from gptlab.quantize import Int8Linear

    weight = torch.randint(-127, 128, (96, 64), dtype=torch.int8)
    native = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert (KEPT_BF16 in _available(torch.zeros(1, 64), weight, FloatCopy())) == native
    assert KEPT_BF16 not in _available(torch.zeros(1, 64, dtype=torch.bfloat16), weight, FloatCopy())
    assert KEPT_BF16 not in _available(torch.zeros(1, 64), weight, None)
    if not native:
        return
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 96))
    x = torch.randn(3, 64)
    reference = F.linear(x.double(), layer.weight.double() * layer.scales.double()[:, None], layer.bias.double())
    with torch.inference_mode():
        with force(int8=KEPT_BF16):
            got = layer(x)
        assert layer.float_copy.values.keys() == {KEPT_BF16}
        assert (got.double() - reference).abs().max() <= 2e-2 * reference.abs().max()  # bf16: 8 significant bits
        with force(int8="int8 kernel"):
            layer(x)
    assert layer.float_copy.value is None


# --- fbgemm: int8 x int8 products with activations quantized on the fly, and float16 copies of bf16 weights ----


def dynamic_int8_bound(x: torch.Tensor, dequantized: torch.Tensor) -> torch.Tensor:
    """The most fbgemm's dynamic int8 product may differ from x @ dequantized^T, per output: it rounds every
    activation to a grid of 127 steps spanning [min(x, 0), max(x, 0)] (one scale for the rows, 7 bits:
    `reduce_range`), i.e. by at most half a step each, and multiplies the int8 weights exactly (int32 sums):
    |error_j| <= step / 2 * sum_i |W_ji|, plus float32 rounding of the result."""
    step = (x.max().clamp(min=0) - x.min().clamp(max=0)) / 127
    return step / 2 * dequantized.abs().sum(1) * (1 + 1e-3) + 1e-5


def test_the_fbgemm_int8_product_is_the_dequantized_one_up_to_its_activation_rounding() -> None:
    """An int8 layer may multiply through fbgemm's packed int8 product (the activations quantized per call):
    offered for float32 rows where torch's quantized engine is fbgemm's, for any number of rows; within the
    activation-rounding bound of the dequantized float product (about 1.5% relative on random rows, where
    weight-only int8 is float32-exact), the packed copy counted in the layer's bytes and freed when no choice
    uses it."""
    from gptlab.kernels.int8 import FBGEMM, FloatCopy, _available
    from gptlab.kernels.products import fbgemm_engine
    from gptlab.quantize import Int8Linear

    weight = torch.randint(-127, 128, (96, 64), dtype=torch.int8)
    engine = torch.backends.quantized.engine in ("x86", "fbgemm")
    assert fbgemm_engine() == engine
    assert (FBGEMM in _available(torch.zeros(1, 64), weight, FloatCopy())) == engine
    assert FBGEMM not in _available(torch.zeros(1, 64, dtype=torch.bfloat16), weight, FloatCopy())
    assert FBGEMM not in _available(torch.zeros(1, 64), weight, None)
    if not engine:
        pytest.skip(f"torch's quantized engine here is {torch.backends.quantized.engine!r}, not fbgemm's")
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 96))
    dequantized = layer.weight.double() * layer.scales.double()[:, None]
    with torch.inference_mode():
        for rows in (1, 3, 40):
            x = torch.randn(rows, 64)
            reference = F.linear(x.double(), dequantized, layer.bias.double())  # (R, out)
            with force(int8=FBGEMM):
                got = layer(x)
            assert got.dtype == torch.float32 and got.shape == (rows, 96)
            assert torch.all((got.double() - reference).abs() <= dynamic_int8_bound(x.double(), dequantized)), rows
            assert not torch.equal(got.double(), reference.float().double())  # the activations really are rounded
        # the worst case for CPUs without VNNI (AVX2 sums pairs of u8 x s8 products in 16 bits): every weight
        # of a row 127 and every activation at the top of its range; 7-bit activations keep the pair sums in
        # range (2 x 127 x 127 < 32768), where 8-bit ones would saturate (FBGEMM_ENABLE_INSTRUCTIONS=AVX2 forces it)
        layer.weight[0] = 127
        dequantized = layer.weight.double() * layer.scales.double()[:, None]
        x = torch.full((1, 64), 3.0)
        with force(int8=FBGEMM):
            layer.float_copy.values.clear()  # the weight changed: pack it again
            got = layer(x)
        reference = F.linear(x.double(), dequantized, layer.bias.double())
        assert torch.all((got.double() - reference).abs() <= dynamic_int8_bound(x.double(), dequantized))
        assert layer.float_copy.values.keys() == {FBGEMM}
        assert layer.float_copy.nbytes() == layer.float_copy.kept_bytes(FBGEMM) == 96 * 64 + 12 * 96
        with force(int8="int8 kernel"):
            layer(x)
    assert layer.float_copy.value is None


def test_a_raising_fbgemm_product_is_unavailable_and_plain_mode_never_takes_it(
        fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where fbgemm raises (a CPU it cannot run on), the measurement records it unavailable and another
    product wins; GPTLAB_KERNELS=plain dequantizes and never packs for fbgemm."""
    from gptlab.kernels import int8 as int8_module
    from gptlab.quantize import Int8Linear

    if not int8_module.fbgemm_engine():
        pytest.skip(f"torch's quantized engine here is {torch.backends.quantized.engine!r}, not fbgemm's")
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 96))
    x = torch.randn(1, 64)
    reference = F.linear(x, layer.weight.float() * layer.scales[:, None], layer.bias)

    def failing(weight: torch.Tensor, scales: torch.Tensor) -> object:
        raise RuntimeError("fbgemm: no kernel for this CPU")

    monkeypatch.setattr(int8_module, "packed_for_fbgemm", failing)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), reference, rtol=2e-2, atol=0)  # bf16 rows may win: 8 bits
    (key,) = [k for k in chooser._chosen if k[0] == "int8 linear"]
    record = chooser.entry(key)
    assert "fbgemm: no kernel" in record["unavailable"][int8_module.FBGEMM]
    assert record["choice"] != int8_module.FBGEMM and int8_module.FBGEMM not in layer.float_copy.values
    monkeypatch.setattr(chooser, "_chosen", {})
    monkeypatch.setenv("GPTLAB_KERNELS", "plain")
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), reference)  # the dequantized product: float32 rounding only
    assert layer.float_copy.last_decoding == "dequantized" and not layer.float_copy.values


def test_the_fp16_weight_product_is_offered_for_bf16_weights_only_and_rounds_as_bf16(fresh: Path) -> None:
    """A bf16 weight's float16 copy is the same numbers (float16 has more significant bits), the sums are
    float32, and the result is rounded to bf16 once, so the product is the exact one to within bf16's
    rounding of the result, as F.linear's bf16 product is; a float32 weight is not offered it (float16 would
    change its numbers) and a pin to it there takes F.linear."""
    from gptlab.kernels.products import FP16, can_fp16, fbgemm_engine, fp16_weight_product, linear, linear_path

    assert not can_fp16(torch.zeros(4, 4)) and not can_fp16(torch.zeros(4, 4, dtype=torch.float16))
    assert can_fp16(torch.zeros(4, 4, dtype=torch.bfloat16)) == fbgemm_engine()
    x32, w32 = torch.randn(2, 64), torch.randn(96, 64)
    with force(linear=FP16):
        assert linear_path(x32, w32) == "F.linear"
    if not fbgemm_engine():
        pytest.skip(f"torch's quantized engine here is {torch.backends.quantized.engine!r}, not fbgemm's")
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(96, 64, generator=g) * 0.05).bfloat16()
    bias = torch.randn(96, generator=g).bfloat16()
    with torch.inference_mode():
        for rows in (1, 3):
            x = torch.randn(rows, 64, generator=g).bfloat16()
            exact = F.linear(x.double(), weight.double(), bias.double())  # (R, out)
            got = fp16_weight_product(x, weight, bias)
            assert got.dtype == torch.bfloat16 and got.shape == (rows, 96)
            # one rounding to bf16 (half a unit of 8 significant bits) of float32 sums
            assert torch.all((got.double() - exact).abs() <= 2**-8 * exact.abs() * (1 + 1e-3) + 1e-6), rows
            with force(linear=FP16):
                torch.testing.assert_close(linear(x, weight, bias), got, rtol=0, atol=0)
        big = torch.full((4, 4), 1e5, dtype=torch.bfloat16)  # beyond float16's range: no copy, the candidate raises
        with pytest.raises(ValueError, match="float16's range"):
            fp16_weight_product(torch.ones(1, 4, dtype=torch.bfloat16), big)
