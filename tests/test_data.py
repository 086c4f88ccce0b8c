"""Data pipeline: tokenizer training, packing, validation split, deterministic sampling."""

import pytest
import torch

from ds_accel.config import ConfigError, DataConfig
from ds_accel.data import BlockSampler, load_texts, load_tokenizer, pack, prepare, split_blocks, train_tokenizer


def test_tokenizer_matches_sentencepiece(tmp_path):
    import sentencepiece as spm

    texts = load_texts(DataConfig(max_chars=60_000))
    tok_dir = train_tokenizer(texts, 400, tmp_path / "tok")
    hf = load_tokenizer(tok_dir)
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    sample = "And God said, Let there be light: and there was light. Zyx 42!"
    assert hf(sample)["input_ids"] == [sp.bos_id()] + sp.encode(sample)
    assert (hf.bos_token_id, hf.eos_token_id) == (1, 2)


def test_pack_puts_eos_between_documents():
    blocks = pack([[5, 6, 7], [8, 9], [10]], eos_id=2, seq_len=4)
    assert blocks.tolist() == [[5, 6, 7, 2], [8, 9, 2, 10]]  # the trailing EOS is the dropped tail


def test_split_is_disjoint_and_sized():
    blocks = torch.arange(400).reshape(100, 4)
    train, val = split_blocks(blocks, 0.1)
    assert val[:, 0].tolist() == [4 * b for b in range(9, 100, 10)]  # every 10th block, none shared
    assert train[:, 0].tolist() == [4 * b for b in range(100) if b % 10 != 9]


def test_prepare_on_bundled_corpus():
    """The blocks are the documents' tokens (BOS first, as Llama-2), EOS after each, cut into seq_len pieces,
    every 20th block held out (val_fraction 0.05): rebuilt here from the tokenizer alone."""
    cfg = DataConfig(seq_len=32, max_chars=50_000, vocab_size=400)
    corpus = prepare(cfg)
    tokenizer = load_tokenizer(corpus.tokenizer_dir)
    stream = [t for ids in tokenizer(load_texts(cfg))["input_ids"] for t in ids + [corpus.eos_id]]
    blocks = torch.tensor(stream[: len(stream) // 32 * 32]).view(-1, 32)
    assert stream[0] == corpus.bos_id == 1 and len(blocks) > 100
    assert torch.equal(corpus.val, blocks[19::20])
    assert torch.equal(corpus.train, blocks[torch.arange(len(blocks)) % 20 != 19])
    assert corpus.vocab_size == 400


def test_missing_and_empty_files_give_clear_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ConfigError, match="data.train_files: .* holds no text"):
        load_texts(DataConfig(train_files=[str(empty)]))
    js = tmp_path / "x.jsonl"
    js.write_text('{"body": "hello"}\n')
    with pytest.raises(ConfigError, match="data.text_field"):
        load_texts(DataConfig(train_files=[str(js)]))


def test_jsonl_and_saved_dataset(tmp_path):
    import datasets

    js = tmp_path / "x.jsonl"
    js.write_text('{"text": "first doc"}\n{"text": "second doc"}\n')
    assert load_texts(DataConfig(train_files=[str(js)])) == ["first doc", "second doc"]
    datasets.Dataset.from_dict({"text": ["a saved doc"]}).save_to_disk(str(tmp_path / "saved"))
    assert load_texts(DataConfig(train_files=[str(tmp_path / "saved")])) == ["a saved doc"]


def test_sampler_ranks_cover_the_single_process_batch():
    one = BlockSampler(1000, micro=8, accum=1, world=1, seed=3)
    two = BlockSampler(1000, micro=4, accum=1, world=2, seed=3)
    for step in (0, 7, 130):  # 130 crosses an epoch boundary
        whole = one.indices(step, 0, 0).tolist()
        assert two.indices(step, 0, 0).tolist() + two.indices(step, 0, 1).tolist() == whole
    assert one.indices(130, 0, 0).tolist() != one.indices(5, 0, 0).tolist()
