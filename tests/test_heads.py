"""GPT-1's task heads (gptlab.heads): the same numbers as transformers' GPT2ForSequenceClassification and
GPT2DoubleHeadsModel, both ways through the disk, and the auxiliary LM loss as GPT-1 defines it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gptlab.checkpoint import load_model, load_task_model, save_model
from gptlab.config import GPTConfig
from gptlab.errors import GptlabError
from gptlab.heads import MultipleChoice, SequenceClassifier, last_non_padding, with_head
from gptlab.model import GPT

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()  # its warnings about the tiny vocabulary's bos/eos ids

SHAPE = dict(vocab_size=60, n_positions=24, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
             attn_pdrop=0.0, summary_first_dropout=0.0)
PAD = 5
LABELS = ("comedy", "history", "tragedy")


def padded_batch() -> torch.Tensor:
    """Three rows of different lengths padded on the right with PAD; the first holds PAD mid-text too."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(6, 60, (3, 12), generator=g)
    ids[0, 4] = PAD  # a pad id inside the text: HF still reads the rightmost non-pad token
    ids[1, 7:] = PAD
    ids[2, 3:] = PAD
    return ids


def gptlab_config() -> GPTConfig:
    return GPTConfig(vocab_size=60, block_size=24, n_layer=2, n_head=2, n_embd=32)


def test_the_last_non_padding_token_is_the_one_transformers_reads() -> None:
    ids = padded_batch()
    assert last_non_padding(ids, PAD).tolist() == [11, 6, 2]
    assert last_non_padding(torch.full((1, 4), PAD), PAD).tolist() == [0]  # padding only: position 0, as HF
    assert last_non_padding(ids, None).tolist() == [11, 11, 11]  # no pad id: the last position


def test_a_transformers_classifier_loads_in_gptlab_with_equal_logits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(**SHAPE, pad_token_id=PAD, id2label=dict(enumerate(LABELS)))
    hf = transformers.GPT2ForSequenceClassification(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_task_model(tmp_path / "hf")
    assert isinstance(ours, SequenceClassifier) and ours.labels == LABELS and ours.pad_token_id == PAD
    with torch.no_grad():
        torch.testing.assert_close(ours(padded_batch()).logits, hf(padded_batch()).logits, atol=1e-5, rtol=0)
    # the body alone, as --init-from reads it: the LM of the same weights
    body = load_model(tmp_path / "hf")
    assert type(body) is GPT and not hasattr(body, "score")


def test_a_gptlab_classifier_loads_in_transformers_with_equal_logits(tmp_path: Path) -> None:
    torch.manual_seed(1)
    ours = SequenceClassifier(gptlab_config(), LABELS, PAD).eval()
    save_model(ours, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["architectures"] == ["GPT2ForSequenceClassification"] and saved["pad_token_id"] == PAD
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "run").eval()
    assert hf.config.id2label == dict(enumerate(LABELS)) and hf.config.label2id == {n: i for i, n in enumerate(LABELS)}
    with torch.no_grad():
        expected = hf(padded_batch()).logits
        torch.testing.assert_close(ours(padded_batch()).logits, expected, atol=1e-5, rtol=0)
    assert expected.shape == (3, 3) and expected.abs().max() > 1e-3


def choice_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(6, 60, (2, 3, 10), generator=g)  # (B, N, T)
    mc = torch.tensor([[9, 6, 4], [7, 9, 3]])  # (B, N): each choice's extract position, padding after it
    for b in range(2):
        for n in range(3):
            ids[b, n, mc[b, n] + 1:] = PAD
    return ids, mc


@pytest.mark.parametrize("direction", ["hf-to-gptlab", "gptlab-to-hf"])
def test_multiple_choice_matches_gpt2_double_heads_both_ways(direction: str, tmp_path: Path) -> None:
    torch.manual_seed(2)
    if direction == "hf-to-gptlab":
        hf = transformers.GPT2DoubleHeadsModel(transformers.GPT2Config(**SHAPE)).eval()
        with torch.no_grad():  # a head that is not zero, so that its bias is checked too
            hf.multiple_choice_head.summary.bias.fill_(0.3)
        hf.save_pretrained(tmp_path / "model")
        ours = load_task_model(tmp_path / "model")
    else:
        ours = MultipleChoice(gptlab_config()).eval()
        with torch.no_grad():
            ours.multiple_choice_head.summary.bias.fill_(0.3)
        save_model(ours, tmp_path / "model")
        ours = ours.eval()
        hf = transformers.GPT2DoubleHeadsModel.from_pretrained(tmp_path / "model").eval()
    assert isinstance(ours, MultipleChoice)
    ids, mc = choice_batch()
    with torch.no_grad():
        expected = hf(ids, mc_token_ids=mc)
        got = ours(ids, mc, with_lm_logits=True)
    torch.testing.assert_close(got.logits, expected.mc_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.lm_logits, expected.logits, atol=1e-5, rtol=0)


def test_the_auxiliary_loss_is_gpt1s_l2_plus_lambda_l1_on_the_unpadded_tokens() -> None:
    torch.manual_seed(5)
    hf = transformers.GPT2DoubleHeadsModel(transformers.GPT2Config(**SHAPE)).eval()
    ours = with_head(load_model_from_hf(hf), MultipleChoice, lm_loss_weight=0.5).eval()
    ours.multiple_choice_head.load_state_dict(hf.multiple_choice_head.state_dict())
    ids, mc = choice_batch()
    labels = torch.tensor([2, 0])
    lm_labels = ids.masked_fill(torch.arange(10) > mc[..., None], -100)  # HF's way to leave the padding out
    with torch.no_grad():
        expected = hf(ids, mc_token_ids=mc, labels=lm_labels, mc_labels=labels)
        got = ours(ids, mc, labels)
    torch.testing.assert_close(got.lm_loss, expected.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.task_loss, expected.mc_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.loss, got.task_loss + 0.5 * got.lm_loss)
    ours.lm_loss_weight = 0.0
    with torch.no_grad():
        plain = ours(ids, mc, labels)
    assert plain.lm_loss is None and plain.lm_logits is None and torch.equal(plain.loss, plain.task_loss)


def load_model_from_hf(hf) -> GPT:
    """The GPT body of a transformers GPT-2 model, through the disk format."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        return load_model(d)


def test_a_classifier_takes_over_a_pretrained_body_without_copying_it() -> None:
    torch.manual_seed(6)
    body = GPT(gptlab_config()).eval()
    model = with_head(body, SequenceClassifier, labels=LABELS, pad_token_id=PAD).eval()
    assert model.transformer.wte.weight.data_ptr() == body.transformer.wte.weight.data_ptr()  # the same memory
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    assert model.score.weight.device.type == "cpu" and model.score.weight.std() > 0
    ids = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, with_lm_logits=True).lm_logits, body(ids).logits)
        classified = model(ids, torch.tensor([0, 1, 2]))
    assert classified.loss is not None and torch.isfinite(classified.loss)


def test_classify_refuses_a_language_model(tmp_path: Path) -> None:
    save_model(GPT(gptlab_config()), tmp_path / "lm")
    with pytest.raises(GptlabError, match="has no task head"):
        load_task_model(tmp_path / "lm")


def test_a_regression_head_is_refused(tmp_path: Path) -> None:
    config = transformers.GPT2Config(**SHAPE, num_labels=1, pad_token_id=PAD)
    transformers.GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "hf")
    with pytest.raises(GptlabError, match="regression"):
        load_task_model(tmp_path / "hf")
