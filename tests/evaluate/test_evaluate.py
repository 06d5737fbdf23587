"""Evaluation: the sliding window scores every token once, against a brute-force reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from helpers import tiny_model
from gptlab.checkpoint import load_model
from gptlab.data import TokenDataset, prepare
from gptlab.errors import GptlabError
from gptlab.evaluate import Score, evaluate_model, score, score_tokens, text_lengths, token_nll, windows
from gptlab.evaluate import scorer
from gptlab.tokenizers import GPT2Tokenizer

CONTEXT = 16


@given(n=st.integers(2, 300), context=st.integers(1, 40), data=st.data())
def test_windows_score_every_target_once_with_enough_context(n: int, context: int, data: st.DataObject) -> None:
    stride = data.draw(st.integers(1, context))
    seen = []
    for begin, first, end in windows(n, context, stride):
        assert 0 <= begin < first <= end <= n - 1 and end - begin <= context
        seen.extend(range(first, end + 1))
        if begin > 0:  # every new target of a later window sees at least context - stride + 1 tokens
            assert first - begin >= context - stride + 1
    assert seen == list(range(1, n))


def brute_force_nll(model, tokens: np.ndarray, context_of) -> float:
    """Sum over targets i >= 1 of -ln P(t_i | t[context_of(i) : i]), one forward pass per target."""
    total = 0.0
    with torch.no_grad():
        for i in range(1, len(tokens)):
            x = torch.tensor(tokens[context_of(i) : i])[None]
            total -= F.log_softmax(model(x).logits[0, -1].double(), -1)[tokens[i]].item()
    return total


@pytest.fixture(scope="module")
def stream() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 50, size=45)


def test_stride_one_gives_every_token_the_full_context(stream: np.ndarray) -> None:
    model = tiny_model(block_size=CONTEXT)
    nll, count = score_tokens(model, stream, stride=1)
    assert count == len(stream) - 1
    assert nll == pytest.approx(brute_force_nll(model, stream, lambda i: max(0, i - CONTEXT)), rel=1e-5)


def test_stride_equal_to_the_context_reads_disjoint_windows(stream: np.ndarray) -> None:
    model = tiny_model(block_size=CONTEXT)
    nll, count = score_tokens(model, stream, stride=CONTEXT)
    assert count == len(stream) - 1
    # target i lies in the window starting at the multiple of CONTEXT just below it, except the last
    # few, which a full-length window ending at the last token reads with more context
    last_full = (len(stream) - 1) // CONTEXT * CONTEXT
    assert last_full < len(stream) - 1  # the stream does have such a tail

    def context_of(i: int) -> int:
        return (i - 1) // CONTEXT * CONTEXT if i <= last_full else len(stream) - 1 - CONTEXT

    assert nll == pytest.approx(brute_force_nll(model, stream, context_of), rel=1e-5)


def test_more_context_helps_a_trained_model_and_batching_changes_nothing(tiny_run: Path) -> None:
    model = load_model(tiny_run)
    tokens = TokenDataset(json.loads((tiny_run / "train_config.json").read_text())["data"]).split("val")
    disjoint = score_tokens(model, tokens, stride=32)
    half = score_tokens(model, tokens, stride=16)
    assert half[1] == disjoint[1] == len(tokens) - 1
    assert half[0] < disjoint[0]  # the same tokens, each read with at least 17 tokens of context
    assert score_tokens(model, tokens, stride=16, batch_size=1)[0] == pytest.approx(half[0], rel=1e-6)


def full_logits_nll(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The scorer before issue 15: logits at every position, cross-entropy on the (B, V, T) view."""
    with torch.no_grad():
        return F.cross_entropy(model(x).logits.float().transpose(1, 2), y, reduction="none")  # (B, T)


@pytest.mark.parametrize("block", [scorer.LOGIT_BLOCK, 3 * 50])  # one block; blocks of 3 rows
def test_token_nll_is_the_full_logits_cross_entropy_at_the_chosen_positions(monkeypatch, block: int) -> None:
    monkeypatch.setattr(scorer, "LOGIT_BLOCK", block)
    model = tiny_model(block_size=CONTEXT)
    x, y = (torch.randint(0, 50, (4, CONTEXT), generator=torch.Generator().manual_seed(i)) for i in (1, 2))
    where = torch.rand(4, CONTEXT, generator=torch.Generator().manual_seed(3)) < 0.4
    reference = full_logits_nll(model, x, y)
    with torch.no_grad():
        every = token_nll(model, x, y)
        chosen, greedy = token_nll(model, x, y, where, greedy=True)
        logits = model(x).logits
    torch.testing.assert_close(every, reference.reshape(-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chosen, reference[where], rtol=1e-6, atol=1e-6)
    assert torch.equal(greedy, (logits.argmax(-1) == y)[where])
    y_greedy = logits.argmax(-1)  # a target equal to the argmax everywhere is greedy everywhere
    assert bool(token_nll(model, x, y_greedy, where, greedy=True)[1].all())


def test_the_stream_score_is_unchanged_from_the_full_logits_scorer(stream: np.ndarray) -> None:
    model = tiny_model(block_size=CONTEXT)
    tokens = np.concatenate([stream, stream[::-1], stream])
    for stride in (1, 5, CONTEXT // 2, CONTEXT):
        expected = 0.0
        for begin, first, end in windows(len(tokens), CONTEXT, stride):
            x = torch.tensor(tokens[begin:end])[None]
            y = torch.tensor(tokens[begin + 1 : end + 1])[None]
            expected += float(full_logits_nll(model, x, y)[0, first - begin - 1 :].double().sum())
        assert score_tokens(model, tokens, stride=stride)[0] == pytest.approx(expected, rel=1e-6)


def test_estimate_loss_is_the_forward_loss_and_leaves_every_generator_alone(char_data: Path) -> None:
    from gptlab.train import build_train_config
    from gptlab.train.loop import estimate_loss

    config = build_train_config(overrides=dict(data=str(char_data), block_size=CONTEXT, batch_size=4,
                                               eval_iters=3, seed=7))
    dataset = TokenDataset(char_data)
    model = tiny_model(vocab_size=dataset.tokenizer.vocab_size, block_size=CONTEXT).train()
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    losses = estimate_loss(model, dataset, config, torch.device("cpu"), step=20)
    assert torch.equal(torch.get_rng_state(), torch_state) and model.training
    assert np.random.get_state()[1].tolist() == numpy_state[1].tolist()
    for split in ("train", "val"):  # today's figure: the mean of the forward pass's loss over the batches
        rng = np.random.default_rng([7, 20, split == "val"])
        with torch.no_grad():
            model.eval()
            expected = np.mean([model(*dataset.get_batch(split, 4, CONTEXT, rng)).loss.item() for _ in range(3)])
            model.train()
        assert losses[split] == pytest.approx(expected, rel=1e-6)
    assert estimate_loss(model, dataset, config, torch.device("cpu"), step=20) == losses


def test_short_texts_and_bad_strides() -> None:
    model = tiny_model(block_size=CONTEXT)
    nll, count = score_tokens(model, np.array([3, 4, 5]))
    assert count == 2 and nll > 0
    with pytest.raises(GptlabError, match="at least 2"):
        score_tokens(model, np.array([3]))
    with pytest.raises(GptlabError, match="--stride must be between 1 and the context"):
        score_tokens(model, np.arange(40) % 50, stride=CONTEXT + 1)
    with pytest.raises(GptlabError, match="exceeds the model's context"):
        score_tokens(model, np.arange(40) % 50, context=CONTEXT + 1)


def test_score_converts_nats_to_bits_per_unit() -> None:
    s = Score(nll=100 * math.log(2), tokens=50, chars=200, bytes=250)
    assert (s.loss, s.bits_per_token, s.bits_per_char, s.bits_per_byte) == pytest.approx(
        (2 * math.log(2), 2.0, 0.5, 0.4)
    )
    assert s.perplexity == pytest.approx(4.0)


def test_text_lengths_count_characters_split_across_bpe_tokens() -> None:
    tok = GPT2Tokenizer()
    text = "héllo wörld, 日本語 🙂 naïve"
    ids = tok.encode(text)
    assert any(tok.decode([i]) == "\ufffd" for i in ids)  # some tokens hold part of a character
    assert text_lengths(tok, np.array(ids)) == (len(text), len(text.encode("utf-8")))


def test_score_uses_the_text_of_the_scored_tokens(tiny_run: Path) -> None:
    from gptlab.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(tiny_run)
    text = "All:\nSpeak, speak."
    result = score(load_model(tiny_run), tokenizer, np.array(tokenizer.encode(text)))
    assert (result.tokens, result.chars, result.bytes) == (len(text) - 1, len(text) - 1, len(text) - 1)




def test_cli_json_scores_the_whole_split(tiny_run: Path, char_data: Path, gptlab) -> None:
    code, out, err = gptlab("eval", str(tiny_run), "--data", str(char_data), "--json")
    assert code == 0, err
    result = json.loads(out)
    val_tokens = json.loads((char_data / "meta.json").read_text())["val_tokens"]
    model = result["model"]
    assert model["tokens"] == val_tokens - 1 and result["stride"] == 16 and result["context"] == 32
    assert model["perplexity"] == pytest.approx(math.exp(model["loss"]))
    assert model["bits_per_char"] == pytest.approx(model["nll"] / math.log(2) / model["chars"])
    assert model["chars"] == model["bytes"] == val_tokens - 1  # an ASCII corpus, one character per token
    direct = evaluate_model(tiny_run, data=char_data)
    assert model["nll"] == pytest.approx(direct.model.nll)


def test_cli_baselines_table(tiny_run: Path, char_data: Path, gptlab) -> None:
    code, out, err = gptlab("eval", str(tiny_run), "--data", str(char_data), "--baselines", "--max-order", "4")
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    names = [line.split("|")[1].strip() for line in lines[2:]]
    assert names[0] == str(tiny_run) and names[1:3] == ["1-gram (Kneser-Ney)", "2-gram (Kneser-Ney)"]
    assert names[3].startswith("best n-gram of orders 1-4: ")
    tokens = {line.split("|")[-2].strip() for line in lines[2:]}
    assert len(tokens) == 1  # every row scored on the same tokens


def test_cli_text_file(tiny_run: Path, tmp_path: Path, gptlab) -> None:
    text = tmp_path / "speech.txt"
    text.write_text("First Citizen:\nSpeak, speak.\n" * 5)
    result = json.loads(gptlab("eval", str(tiny_run), "--text", str(text), "--json", "--stride", "8")[1])
    assert result["model"]["tokens"] == len(text.read_text()) - 1 and result["stride"] == 8


def test_a_tokenizer_mismatch_is_refused(tiny_run: Path, gpt2_data: Path, tmp_path: Path, gptlab) -> None:
    code, _, err = gptlab("eval", str(tiny_run), "--data", str(gpt2_data))
    assert code == 2
    assert "does not match" in err and "char, " in err and "gpt2, 50,257" in err
    other = tmp_path / "other.txt"
    other.write_text("an entirely different alphabet: xyzXYZ 0123456789 " * 20)
    prepare([str(other)], "char", tmp_path / "other")
    with pytest.raises(GptlabError, match="does not match"):
        evaluate_model(tiny_run, data=tmp_path / "other")


def test_cli_usage_errors(tiny_run: Path, tmp_path: Path, gptlab) -> None:
    text = tmp_path / "t.txt"
    text.write_text("All:\nSpeak.")
    code, _, err = gptlab("eval", str(tiny_run), "--text", str(text), "--baselines")
    assert code == 2 and "--baselines needs --data" in err
    code, _, err = gptlab("eval", str(tiny_run), "--text", str(text), "--stride", "0")
    assert code == 2 and "--stride must be at least 1" in err
    code, _, err = gptlab("eval", str(tiny_run))
    assert code == 2 and "give one of --data DATA_DIR, --text FILE or --tasks" in err
    with pytest.raises(SystemExit):  # two sources: argparse's usage error
        gptlab("eval", str(tiny_run), "--text", str(text), "--tasks", "hellaswag")
