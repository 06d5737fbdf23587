"""Optimizers and learning-rate schedules: each schedule against its formula, each optimizer's groups."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from gptlab.train.config import OPTIMIZERS, TrainConfig, build_train_config
from gptlab.errors import GptlabError
from gptlab.train.optim import MuonWithAdamW, configure_optimizer, hidden_matrices, learning_rate

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
