"""Optimizers and learning-rate schedules: each schedule against its formula, each optimizer's groups."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from helpers import tiny_model
from gptlab.train.config import OPTIMIZERS, TrainConfig, build_train_config
from gptlab.errors import GptlabError
import torch.optim._muon as torch_muon_module

from gptlab import precision
from gptlab.train import optim as optim_module
from gptlab.train.optim import (
    MuonCost, MuonWithAdamW, configure_optimizer, hidden_matrices, learning_rate, measure_muon_cost,
    muon_iteration_dtype, newton_schulz, newton_schulz_shapes,
)

LR, MIN_LR, WARMUP, MAX_ITERS, D_MODEL = 6e-3, 6e-4, 10, 110, 64


def config(schedule: str, **overrides) -> TrainConfig:
    values = dict(lr=LR, min_lr=MIN_LR, warmup_iters=WARMUP, max_iters=MAX_ITERS, n_embd=D_MODEL, n_head=4,
                  schedule=schedule)
    return build_train_config(overrides={**values, **overrides})


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_is_linear_up_to_lr(schedule: str) -> None:
    c = config(schedule)
    for step in (0, 4, 9):
        assert learning_rate(step, c) == pytest.approx(LR * (step + 1) / (WARMUP + 1))
    assert learning_rate(WARMUP, c) == pytest.approx(LR)


def test_cosine_matches_its_formula() -> None:
    c = config("cosine")
    for step in (10, 35, 60, 85, 109):
        progress = (step - WARMUP) / (MAX_ITERS - WARMUP)
        expected = MIN_LR + 0.5 * (1 + math.cos(math.pi * progress)) * (LR - MIN_LR)
        assert learning_rate(step, c) == pytest.approx(expected)
    assert learning_rate(60, c) == pytest.approx((LR + MIN_LR) / 2)  # half-way down: the mean
    assert learning_rate(110, c) == learning_rate(500, c) == MIN_LR


def test_linear_matches_its_formula() -> None:
    c = config("linear")
    for step, fraction in ((10, 0.0), (35, 0.25), (60, 0.5), (85, 0.75)):
        assert learning_rate(step, c) == pytest.approx(LR - fraction * (LR - MIN_LR))
    assert learning_rate(110, c) == learning_rate(200, c) == MIN_LR


def test_lr_decay_iters_moves_the_end_of_the_decay() -> None:
    c = config("linear", lr_decay_iters=60)
    assert learning_rate(35, c) == pytest.approx((LR + MIN_LR) / 2)
    assert learning_rate(60, c) == MIN_LR


def test_constant_stays_at_lr() -> None:
    c = config("constant")
    assert all(learning_rate(step, c) == LR for step in (10, 50, 109, 10_000))


def test_noam_is_the_transformer_formula_scaled_to_peak_at_lr() -> None:
    c = config("noam")
    scale = LR * math.sqrt(D_MODEL * WARMUP)  # --lr is the peak, reached at the end of warmup
    for step in (0, 3, 9, 10, 39, 99, 1000):
        s = step + 1
        expected = scale * D_MODEL**-0.5 * min(s**-0.5, s * WARMUP**-1.5)
        assert learning_rate(step, c) == pytest.approx(expected)
    assert learning_rate(WARMUP - 1, c) == pytest.approx(LR)  # s = warmup: the peak
    assert learning_rate(4 * WARMUP - 1, c) == pytest.approx(LR / 2)  # then 1 / sqrt(s)
    assert learning_rate(0, c) == pytest.approx(LR / WARMUP)  # linear warmup from lr / warmup


def test_noam_reproduces_the_papers_absolute_rates() -> None:
    """With --lr = (d_model * warmup)^-0.5 the values are the paper's: 512 wide, 4000 warmup steps."""
    c = config("noam", n_embd=512, n_head=8, warmup_iters=4000, lr=(512 * 4000) ** -0.5, min_lr=0.0)
    for s in (1, 1000, 4000, 20_000):
        assert learning_rate(s - 1, c) == pytest.approx(512**-0.5 * min(s**-0.5, s * 4000**-1.5))


def test_noam_without_warmup_decays_from_lr() -> None:
    c = config("noam", warmup_iters=0)
    assert [learning_rate(step, c) for step in (0, 3, 15)] == pytest.approx([LR, LR / 2, LR / 4])


@pytest.mark.parametrize("name", ["optimizer", "schedule"])
def test_unknown_choices_are_refused(name: str) -> None:
    with pytest.raises(GptlabError, match=f"--{name} must be one of"):
        build_train_config(overrides={name: "lion"})


EXPECTED_CLASS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "radam": torch.optim.RAdam,
                  "sgd": torch.optim.SGD}


@pytest.mark.parametrize("name", EXPECTED_CLASS)
def test_every_optimizer_decays_exactly_the_matrices(name: str) -> None:
    model = tiny_model()
    optimizer = configure_optimizer(model, build_train_config(overrides=dict(optimizer=name, weight_decay=0.05)),
                                    torch.device("cpu"))
    assert type(optimizer) is EXPECTED_CLASS[name]
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    every = {id(p) for p in model.parameters()}
    assert {id(p) for p in decayed["params"] + plain["params"]} == every  # each parameter once
    assert len(decayed["params"]) + len(plain["params"]) == len(every)
    if name == "sgd":
        assert decayed["momentum"] == 0.9  # beta1
    else:
        assert decayed["betas"] == (0.9, 0.99)
    if name == "radam":
        assert decayed["decoupled_weight_decay"] is False  # torch's default: classic L2, like adam


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest() -> None:
    model = tiny_model()
    c = build_train_config(overrides=dict(optimizer="muon", weight_decay=0.05))
    optimizer = configure_optimizer(model, c, torch.device("cpu"))
    assert isinstance(optimizer, MuonWithAdamW)
    [muon] = optimizer.muon.param_groups
    embeddings, plain = optimizer.adamw.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in muon["params"]) == sorted(
        n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2
    )
    assert len(muon["params"]) == 4 * model.config.n_layer  # attention's two projections, the MLP's two
    assert sorted(names[id(p)] for p in embeddings["params"]) == ["transformer.wpe.weight", "transformer.wte.weight"]
    assert all(p.dim() == 1 for p in plain["params"])
    assert (muon["weight_decay"], embeddings["weight_decay"], plain["weight_decay"]) == (0.05, 0.05, 0.0)
    assert muon["adjust_lr_fn"] == "match_rms_adamw" and embeddings["betas"] == (0.9, 0.99)
    every = [id(p) for p in model.parameters()]
    assert sorted(id(p) for g in optimizer.param_groups for p in g["params"]) == sorted(every)  # each once
    assert {id(p) for p in hidden_matrices(model)} == {id(p) for p in muon["params"]}


def test_setting_the_lr_of_muons_groups_reaches_both_halves() -> None:
    model = tiny_model()
    optimizer = configure_optimizer(model, build_train_config(overrides=dict(optimizer="muon")), torch.device("cpu"))
    for group in optimizer.param_groups:  # what the training loop does every step
        group["lr"] = 1.25e-4
    assert [g["lr"] for g in optimizer.muon.param_groups + optimizer.adamw.param_groups] == [1.25e-4] * 3


def test_muon_continues_exactly_from_its_state_dict() -> None:
    """Resume needs both halves' state: momentum buffers, Adam's moments and step counts."""
    x = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))
    c = build_train_config(overrides=dict(optimizer="muon", lr=3e-3))

    def steps(model, optimizer, n):
        for _ in range(n):
            model(x[:, :-1], x[:, 1:]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    straight = tiny_model().train()
    straight_opt = configure_optimizer(straight, c, torch.device("cpu"))
    steps(straight, straight_opt, 3)
    saved = {"model": {k: v.clone() for k, v in straight.state_dict().items()},
             "optimizer": copy.deepcopy(straight_opt.state_dict())}
    steps(straight, straight_opt, 2)

    resumed = tiny_model(seed=1).train()  # other weights, overwritten by the saved ones
    resumed.load_state_dict(saved["model"])
    resumed_opt = configure_optimizer(resumed, c, torch.device("cpu"))
    resumed_opt.load_state_dict(saved["optimizer"])
    steps(resumed, resumed_opt, 2)
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))
    fresh = tiny_model().train()  # and without the saved moments the run would differ
    fresh.load_state_dict(saved["model"])
    steps(fresh, configure_optimizer(fresh, c, torch.device("cpu")), 2)
    assert not all(torch.equal(a, b) for a, b in zip(straight.parameters(), fresh.parameters()))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_lowers_the_loss_on_a_fixed_batch(name: str) -> None:
    model = tiny_model().train()
    c = build_train_config(overrides=dict(optimizer=name, lr=0.1 if name == "sgd" else 3e-3, weight_decay=0.0))
    optimizer = configure_optimizer(model, c, torch.device("cpu"))
    x = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))
    first = None
    for _ in range(8):
        loss = model(x[:, :-1], x[:, 1:]).loss
        first = first if first is not None else loss.item()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert model(x[:, :-1], x[:, 1:]).loss.item() < first - 0.05


def test_training_logs_the_learning_rate_of_every_step(tiny_run: Path) -> None:
    saved = TrainConfig(**json.loads((tiny_run / "train_config.json").read_text()))
    logged = {}
    for line in (tiny_run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "lr" in row:
            logged[row["step"]] = row["lr"]
    # the row of step s holds the rate of the update that made step s, learning_rate(s - 1)
    assert sorted(logged) == list(range(1, saved.max_iters + 1))
    assert all(logged[s] == pytest.approx(learning_rate(s - 1, saved)) for s in logged)


def test_a_run_trains_with_another_optimizer_and_schedule(char_data: Path, tmp_path: Path) -> None:
    from gptlab.train import train

    c = build_train_config(overrides=dict(data=str(char_data), out=str(tmp_path / "run"), schedule="noam",
                                          optimizer="radam", n_layer=1, n_head=2, n_embd=16, block_size=16,
                                          batch_size=4, max_iters=4, warmup_iters=2, eval_interval=0, eval_iters=1,
                                          sample_tokens=0))
    result = train(c, show_progress=False)
    assert result.step == 4 and math.isfinite(result.val_loss)
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert (saved["optimizer"], saved["schedule"]) == ("radam", "noam")


def test_the_gradient_scaler_steps_muon_as_any_optimizer() -> None:
    """fp16 on CUDA goes through GradScaler: unscaled steps equal plain ones, and an overflow skips both halves.

    torch's CPU GradScaler runs the same code, so the check needs no GPU."""
    x = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))
    c = build_train_config(overrides=dict(optimizer="muon"))
    weights = []
    for enabled in (False, True):
        model = tiny_model().train()
        optimizer = configure_optimizer(model, c, torch.device("cpu"))
        scaler = torch.amp.GradScaler("cpu", enabled=enabled, init_scale=1024.0)
        for _ in range(3):
            scaler.scale(model(x[:, :-1], x[:, 1:]).loss).backward()
            scaler.unscale_(optimizer)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))

    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(model(x[:, :-1], x[:, 1:]).loss).backward()
    next(iter(optimizer.muon.param_groups[0]["params"])).grad[0, 0] = float("inf")  # an fp16 overflow
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # neither half stepped


# --- Muon's iterations in a dtype this device runs natively, and Muon only where it pays --------------

COEFFICIENTS = (torch_muon_module.DEFAULT_A, torch_muon_module.DEFAULT_B, torch_muon_module.DEFAULT_C)

def test_newton_schulz_in_bf16_is_torchs_own_iteration_bit_for_bit() -> None:
    """`iterations_in` swaps torch's function for ours: they must be the same iteration (a torch that
    changes its own fails here)."""
    torch.manual_seed(0)
    for shape in ((64, 192), (96, 32)):
        grad = torch.randn(shape)
        ours = newton_schulz(grad, COEFFICIENTS, 5, 1e-7, torch.bfloat16)
        theirs = torch_muon_module._zeropower_via_newtonschulz(grad, COEFFICIENTS, 5, 1e-7)
        assert ours.dtype == theirs.dtype == torch.bfloat16 and ours.shape == grad.shape
        assert torch.equal(ours, theirs)


def test_float32_iterations_are_close_to_the_bf16_ones() -> None:
    torch.manual_seed(0)
    for shape in ((64, 256), (256, 64), (128, 128)):
        grad = torch.randn(shape)
        bf16 = newton_schulz(grad, COEFFICIENTS, 5, 1e-7, torch.bfloat16).float()
        fp32 = newton_schulz(grad, COEFFICIENTS, 5, 1e-7, torch.float32)
        assert fp32.dtype == torch.float32
        assert not torch.equal(fp32, bf16)  # really computed in another precision
        # bf16 keeps 8 bits of mantissa: the two agree to its precision, entry by entry and as a whole
        assert (fp32 - bf16).norm() / fp32.norm() < 0.02
        torch.testing.assert_close(fp32, bf16, atol=0.02, rtol=0.05)


def muon_pair(dtype: torch.dtype) -> tuple[torch.nn.Module, MuonWithAdamW]:
    model = tiny_model(seed=3).train()
    c = build_train_config(overrides=dict(optimizer="muon", lr=3e-3))
    return model, configure_optimizer(model, c, torch.device("cpu"), muon_dtype=dtype)


def test_muon_with_float32_iterations_steps_close_to_bf16_and_really_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    original, torchs = optim_module.newton_schulz, torch_muon_module._zeropower_via_newtonschulz

    def spy(grad, coefficients, steps, eps, dtype=torch.bfloat16):
        seen.append(dtype)
        return original(grad, coefficients, steps, eps, dtype)

    monkeypatch.setattr(optim_module, "newton_schulz", spy)
    weights = {}
    for dtype in (torch.bfloat16, torch.float32):
        model, optimizer = muon_pair(dtype)
        assert optimizer.iteration_dtype == dtype
        torch.manual_seed(1)
        for _ in range(3):
            x = torch.randint(50, (4, 16))
            model(x, x).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        weights[dtype] = [p.detach().clone() for p in hidden_matrices(model)]
    assert set(seen) == {torch.float32} and len(seen) == 3 * len(weights[torch.float32])  # bf16: torch's own
    assert torch_muon_module._zeropower_via_newtonschulz is torchs  # put back after each step
    for bf16, fp32 in zip(weights[torch.bfloat16], weights[torch.float32]):
        assert not torch.equal(bf16, fp32)
        torch.testing.assert_close(fp32, bf16, atol=2e-3, rtol=0.0)  # 3 steps of lr 3e-3 apart by a rounding


def never(*args, **kwargs) -> float:
    raise AssertionError("bf16 was timed on a device without native bf16")


@pytest.mark.parametrize("native, speedup, expected", [
    (False, never, torch.float32),  # an emulated bf16 (AVX2): float32, nothing timed
    (True, lambda: 0.5, torch.float32),  # native, yet slower here: float32
    (True, lambda: 3.0, torch.bfloat16),  # AVX-512-bf16, AMX, a GPU: torch's bf16
])
def test_muons_iteration_dtype_is_chosen_by_what_this_device_does(
    monkeypatch: pytest.MonkeyPatch, native: bool, speedup, expected: torch.dtype
) -> None:
    monkeypatch.setattr(precision, "bf16_native", lambda device: native)
    monkeypatch.setattr(optim_module, "bf16_native", lambda device: native)
    model = tiny_model()
    assert muon_iteration_dtype(hidden_matrices(model), torch.device("cpu"), speedup) == expected


def test_newton_schulz_shapes_are_the_iterations_products() -> None:
    model = tiny_model()  # n_embd 32: c_attn 96 x 32, c_proj 32 x 32, c_fc 128 x 32, mlp.c_proj 32 x 128
    assert newton_schulz_shapes(hidden_matrices(model)) == (
        (32, 32, 32), (32, 32, 96), (32, 32, 128), (32, 96, 32), (32, 128, 32))


@pytest.mark.parametrize("muon, expected", [(0.03, True), (0.119, True), (0.121, False), (0.6, False)])
def test_muon_pays_while_it_adds_at_most_the_rest_of_the_step(muon: float, expected: bool) -> None:
    """0.01 + (0.1 + 0.01) = 0.12 s. AVX2 measured here: bf16 iterations 592 ms a step against 97 ms forward and backward (no);
    float32 iterations 30 ms (yes)."""
    assert MuonCost(torch.float32, muon=muon, adamw=0.01, forward_backward=0.1).pays is expected
    assert MuonCost(torch.float32, muon=0.592, adamw=0.001, forward_backward=0.097).pays is False
    assert MuonCost(torch.float32, muon=0.030, adamw=0.0005, forward_backward=0.105).pays is True


@pytest.mark.parametrize("preset, resumed, pays, expected", [
    ("shakespeare-char-default", False, False, "adamw"),  # the recipe is "Muon where it pays"
    ("shakespeare-char-default", False, True, "muon"),
    ("shakespeare-char-default", True, False, "muon"),  # a resumed run has Muon's state: kept
    (None, False, False, "muon"),  # asked for by the user: kept, and told
])
def test_a_muon_preset_falls_back_to_adamw_where_muon_does_not_pay(
    preset, resumed: bool, pays: bool, expected: str, capsys: pytest.CaptureFixture
) -> None:
    from gptlab.train.setup import choose_muon
    from gptlab.train.distributed import Group

    c = build_train_config(preset, overrides=dict(optimizer="muon", dtype="float32"))
    cost = MuonCost(torch.float32, muon=0.03 if pays else 0.6, adamw=0.001, forward_backward=0.1)
    config, dtype = choose_muon(tiny_model(), c, Group(), torch.device("cpu"), resumed, measure=lambda *a: cost)
    assert config.optimizer == expected and dtype in (torch.float32, torch.bfloat16)
    err = capsys.readouterr().err
    assert ("Muon costs too much here" in err) is (not pays)
    if not pays:
        assert "600 ms" in err and ("preset's recipe takes AdamW" in err) is (expected == "adamw")


def test_measuring_muons_cost_leaves_the_model_and_random_state_alone() -> None:
    model = tiny_model(seed=5).train()
    before = copy.deepcopy(model.state_dict())
    c = build_train_config(overrides=dict(optimizer="muon", dtype="float32", batch_size=2, block_size=16))
    torch.manual_seed(7)
    expected_draw = torch.rand(3)
    torch.manual_seed(7)
    cost = measure_muon_cost(model, c, torch.device("cpu"), 1, torch.float32, repeats=1)
    assert torch.equal(torch.rand(3), expected_draw)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert cost.muon > 0 and cost.adamw > 0 and cost.forward_backward > 0
