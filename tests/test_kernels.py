"""Kernels: every candidate computes the plain operation, and the measured choice takes the faster one."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_compile, tiny_model

from gptlab import kernels
from gptlab.config import GPTConfig
from gptlab.inference.cache import SlotCache
from gptlab.kernels import can_prepack, fastest, force, matvec_rows, prepacked_product, sigmoid_form_gelu, tall_product
from gptlab.model import GPT


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No choice made yet, in this process or on disk; returns the disk cache's path."""
    path = tmp_path / "kernels.json"
    monkeypatch.setenv("GPTLAB_KERNEL_CACHE", str(path))
    monkeypatch.setattr(kernels, "_chosen", {})
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
    build = lambda: {name: clock.candidate(name, cost) for name, cost in costs.items()}  # noqa: E731
    chosen = fastest(("op", 1), tuple(costs), build, rounds=3, clock=clock)
    assert chosen == min(costs, key=costs.get)
    assert sorted(clock.calls) == sorted(list(costs) * 4)  # one warm-up call and 3 timed rounds each


def test_a_candidate_is_judged_by_its_fastest_round(fresh: Path) -> None:
    """b is slower on average but fastest twice: other work only adds time, so its best rounds count."""
    clock, b_costs = FakeClock(), iter([9.0, 9.0, 0.5, 9.0, 0.5])  # warm-up, then rounds
    candidates = {"a": clock.candidate("a", 1.0)}

    def b() -> None:
        clock.now += next(b_costs)

    candidates["b"] = b
    assert fastest(("op", 2), ("a", "b"), lambda: candidates, rounds=3, clock=clock) == "b"
    assert next(b_costs, None) is None  # a fourth round, since b's two best differed: 0.5 and 9


def test_rounds_go_on_while_the_fastest_figures_disagree(fresh: Path) -> None:
    """A busy machine: a's rounds are disturbed until late; the rounds continue until its best is seen twice."""
    clock = FakeClock()
    a_costs = iter([5.0] + [5.0, 4.0, 3.0, 2.0, 1.0, 1.0] + [1.0] * 40)

    def a() -> None:
        clock.now += next(a_costs)

    chosen = fastest(("op", 6), ("a", "b"), lambda: {"a": a, "b": clock.candidate("b", 1.5)}, rounds=3, clock=clock)
    assert chosen == "a" and clock.calls.count("b") == 1 + 6  # warm-up and six rounds


def test_a_choice_is_measured_once_per_machine(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    costs = {"slow": 2.0, "quick": 1.0}
    build = lambda: {name: clock.candidate(name, cost) for name, cost in costs.items()}  # noqa: E731
    assert fastest(("op", 3), tuple(costs), build, clock=clock) == "quick"
    measured = len(clock.calls)

    def no_build():
        raise AssertionError("measured again")

    assert fastest(("op", 3), tuple(costs), no_build) == "quick"  # this process remembers
    assert json.loads(fresh.read_text()) == {str(("op", 3)): {"choice": "quick", "seconds": costs}}
    monkeypatch.setattr(kernels, "_chosen", {})  # as a new process on the same machine
    assert fastest(("op", 3), tuple(costs), no_build) == "quick"
    assert len(clock.calls) == measured
    # a choice on disk that is not a candidate (an older version's) is measured again
    fresh.write_text(json.dumps({str(("op", 3)): {"choice": "gone"}}))
    monkeypatch.setattr(kernels, "_chosen", {})
    assert fastest(("op", 3), tuple(costs), build, clock=clock) == "quick"


def test_the_disk_cache_can_be_turned_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GPTLAB_KERNEL_CACHE", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(kernels, "_chosen", {})
    clock = FakeClock()
    assert fastest(("op", 4), ("x",), lambda: {"x": clock.candidate("x", 1.0)}, clock=clock) == "x"
    assert list(tmp_path.iterdir()) == []


def test_measuring_leaves_the_random_state_alone(fresh: Path) -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    fastest(("op", 5), ("draws",), lambda: {"draws": lambda: torch.rand(100)})
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
    monkeypatch.setattr(kernels, "_time_candidates", lambda candidates, rounds, clock: {
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
    monkeypatch.setattr(kernels, "fastest", lambda *a, **k: pytest.fail("measured a training product"))
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


@needs_compile()
@pytest.mark.parametrize("form", kernels.GELU_FORMS)
def test_a_compiled_graph_takes_the_measured_gelu_form(
    fresh: Path, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    """The choice is made while torch.compile traces (eagerly, once) and lands in the graph as a constant."""
    torch._dynamo.reset()
    verdicts = []

    def verdict(candidates, rounds, clock):
        verdicts.append(sorted(candidates))
        return {name: 0.0 if name == form else 1.0 for name in candidates}

    monkeypatch.setattr(kernels, "_time_candidates", verdict)
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
    monkeypatch.setattr(kernels, "largest_cache_bytes", lambda: 4096)
    weight = torch.randn(16, 32)  # 2 KiB: four copies make twice the fake 4 KiB cache
    seen: list[torch.Tensor] = []

    def recording(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        seen.append(w)
        return F.linear(x, w, bias)

    monkeypatch.setattr(kernels, "LINEAR_PRODUCTS", {"F.linear": recording})
    with torch.inference_mode():
        kernels.linear_path(torch.randn(1, 32), weight)
    storages = {w.untyped_storage().data_ptr() for w in seen}
    assert len(storages) == 4 and weight.untyped_storage().data_ptr() in storages
    assert all(torch.equal(w, weight) for w in seen)
    big = list(itertools.islice(itertools.cycle(kernels.from_memory(torch.randn(64, 64))), 5))  # 16 KiB > twice the cache
    assert all(w is big[0] for w in big)


def test_prepacked_copies_are_reordered_before_the_clock_starts(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each copy a decoding candidate meets is reordered once, before timing: a timed call that
    reorders would charge the prepacked product for work a decoding step never does."""
    weight = torch.randn(16, 32)
    if not can_prepack(weight):
        pytest.skip("this torch build has no oneDNN (mkldnn), so there is no prepacked product")
    monkeypatch.setattr(kernels, "largest_cache_bytes", lambda: 4096)  # four copies of the 2 KiB weight
    timing = kernels._time_candidates
    reordered_while_timed = []

    def spy(candidates, rounds, clock):
        before = len(kernels._PREPACKED)
        seconds = timing(candidates, rounds, clock)
        reordered_while_timed.append(len(kernels._PREPACKED) - before)
        return seconds

    monkeypatch.setattr(kernels, "_time_candidates", spy)
    with torch.inference_mode():
        kernels.linear_path(torch.randn(1, 32), weight)
    assert reordered_while_timed == [0]


def test_decoding_rows_share_a_measurement_per_power_of_two(fresh: Path) -> None:
    """A server's batch passes through every size: 5, 6, 7 and 8 rows take one measurement, not four."""
    weight = torch.randn(64, 32)
    with torch.inference_mode():
        for rows in (5, 6, 7, 8):
            kernels.linear(torch.randn(rows, 1, 32), weight)
    assert [key[1] for key in kernels._chosen if key[0] == "linear"] == [8]


def test_the_engine_warms_up_every_batch_size_it_will_decode(fresh: Path) -> None:
    """Engine.warm_up (the server runs it before its first request) makes the kernels' choices for batch
    sizes 1, 2, 4, 8 up to max_batch, so no request waits on a measurement."""
    from gptlab.inference import Engine

    model = tiny_model()
    Engine(model, max_batch=6).warm_up()
    rows = {key[1] for key in kernels._chosen if key[0] == "linear"}
    assert rows == {1, 2, 4, 8}
