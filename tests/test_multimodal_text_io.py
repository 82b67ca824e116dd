"""Tokenizer control tokens and caption-file errors (audit of the multimodal text path)."""
from __future__ import annotations

import pytest

pytest.importorskip("tokenizers")  # the `text` extra

from causalfusion.multimodal.data import load_jsonl
from causalfusion.multimodal.tokenizer import TextTokenizer, train_bpe


def _plain_vocab_tokenizer(tmp_path) -> TextTokenizer:
    """A user tokenizer.json whose <bos>/<eos>/<pad> are ordinary vocabulary entries, not
    "special" added tokens, so ``skip_special_tokens`` alone does not remove them."""
    import tokenizers

    vocab = {"a": 0, "b": 1, "<|begin_of_text|>": 2, "<|end_of_text|>": 3, "<pad>": 4}
    t = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="a"))
    t.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "plain.json"))
    return TextTokenizer.load(tmp_path / "plain.json")


def test_decode_drops_control_tokens_of_a_user_tokenizer(tmp_path):
    tok = _plain_vocab_tokenizer(tmp_path)
    assert (tok.bos, tok.eos, tok.pad) == (2, 3, 4)
    # a sampled caption may contain <bos> or <pad> before its <eos>: neither may be printed
    assert tok.decode([2, 0, 4, 1, 3]) == "a b"


def test_trained_bpe_decode_has_no_control_tokens():
    tok = train_bpe(["a red circle at the top left"] * 4, 300)
    ids = [tok.bos] + tok.encode("a red circle") + [tok.pad, tok.eos, tok.pad]
    assert tok.decode(ids) == "a red circle"


def test_literal_control_token_text_is_not_a_control_token():
    tok = train_bpe(["a red circle at the top left"] * 4, 300)
    ids, lens = tok.batch(["a red <eos> circle <pad> <bos> at the top"], 20)
    real = ids[0, :lens[0]].tolist()
    # <bos> first, <eos> last, and no control id in between (the caption goes on past "<eos>")
    assert real[0] == tok.bos and real[-1] == tok.eos
    assert not {tok.bos, tok.eos, tok.pad} & set(real[1:-1])
    assert tok.decode(real).split() == "a red circle at the top".split()  # the surrounding spaces stay
    with pytest.raises(ValueError, match="no text tokens"):
        tok.prompt("<eos>", 20)


def test_caption_file_errors_name_the_file(tmp_path):
    (tmp_path / "bin.jsonl").write_bytes(b'{"image": "a.png", "caption": "\xff"}\n')
    with pytest.raises(ValueError, match=r"bin\.jsonl is not UTF-8"):
        load_jsonl(tmp_path / "bin.jsonl")
    (tmp_path / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ValueError, match=r"deep\.jsonl:1: expected"):
        load_jsonl(tmp_path / "deep.jsonl")
