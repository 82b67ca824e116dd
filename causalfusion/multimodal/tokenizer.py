"""Text tokenization through the `tokenizers` library (paper Sec. 6: the LLaMA-3 tokenizer).

Either a user ``tokenizer.json`` (e.g. LLaMA-3's) or, by default, a small byte-level BPE trained
offline on the training captions. Either way the run directory keeps a copy as ``tokenizer.json``
so a checkpoint always decodes with the tokenizer it was trained with.

The text slot of a sequence has a fixed length T (``max_text_len``, 35 in the paper):
``[<bos> tokens... <eos> <pad>...]``. Fixed length keeps one attention mask per batch; padding
comes after <eos>, so under the causal text mask no real token ever sees a pad, and image tokens
that see the pads (text-first) see a deterministic function of the prompt.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

# Names the special tokens go by in common tokenizer files (ours first, then LLaMA-3, GPT-2, BERT).
BOS_NAMES = ("<bos>", "<|begin_of_text|>", "<s>", "<|endoftext|>", "[CLS]")
EOS_NAMES = ("<eos>", "<|end_of_text|>", "</s>", "<|endoftext|>", "[SEP]")
PAD_NAMES = ("<pad>", "<|finetune_right_pad_id|>", "[PAD]")
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
MIN_BPE_VOCAB = 256 + len(SPECIALS)  # the byte alphabet + the specials: a BPE vocabulary is never smaller
FILE_NAME = "tokenizer.json"


def _tokenizers():
    try:
        import tokenizers
    except ImportError:  # an optional extra: only the multimodal model needs it
        raise ValueError("the multimodal model needs the 'tokenizers' package: pip install 'causalfusion[text]'") from None
    return tokenizers


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus the <bos>/<eos>/<pad> ids and the fixed text-slot layout."""

    def __init__(self, tok, source: str = "in memory"):
        self.tok, self.source = tok, source
        self.bos = self._find(BOS_NAMES, "begin-of-text")
        self.eos = self._find(EOS_NAMES, "end-of-text")
        pad = [self.tok.token_to_id(n) for n in PAD_NAMES if self.tok.token_to_id(n) is not None]
        self.pad = pad[0] if pad else self.eos  # pads are masked by length, so any id works
        self.control = frozenset((self.bos, self.eos, self.pad))  # never content: see encode / decode

    def _find(self, names: tuple[str, ...], what: str) -> int:
        for n in names:
            i = self.tok.token_to_id(n)
            if i is not None:
                return i
        raise ValueError(f"tokenizer {self.source} has no {what} token (looked for {', '.join(names)})")

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    # ---- files ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> "TextTokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / FILE_NAME
        if not path.is_file():
            raise ValueError(f"tokenizer file {path} not found")
        try:
            tok = _tokenizers().Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a plain Exception for unreadable JSON
            raise ValueError(f"{path} is not a tokenizers JSON file ({str(e).splitlines()[0][:120]})") from None
        return cls(tok, str(path))

    def save(self, run_dir: str | Path) -> Path:
        """Write ``run_dir/tokenizer.json`` (a user file is copied byte for byte)."""
        out = Path(run_dir) / FILE_NAME
        out.parent.mkdir(parents=True, exist_ok=True)
        src = Path(self.source)
        if src.is_file() and src.resolve() != out.resolve():
            shutil.copyfile(src, out)
        elif not src.is_file():
            self.tok.save(str(out))
        return out

    # ---- encoding --------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Content token ids, no special tokens (a LLaMA-3 file would add <|begin_of_text|> itself).

        ``tokenizers`` matches added tokens in the raw text even with ``add_special_tokens=False``,
        so a caption or prompt that contains the literal text "<eos>" would get an <eos> id in the
        middle (training: the model learns to stop there). Control ids are dropped here."""
        return [i for i in self.tok.encode(text, add_special_tokens=False).ids if i not in self.control]

    def decode(self, ids: list[int]) -> str:
        """Ids -> text without <bos>/<eos>/<pad>. They are dropped here by id, not only through
        ``skip_special_tokens``: a user tokenizer.json may hold them as plain vocabulary entries
        (not "special" added tokens), and a caption that samples one would print it verbatim."""
        return self.tok.decode([i for i in ids if i not in self.control], skip_special_tokens=True).strip()

    def slot(self, ids: list[int], text_len: int) -> tuple[list[int], int]:
        """[<bos> ids <eos> <pad>...] of length ``text_len`` and the number of real tokens.

        Training captions that do not fit are truncated (no <eos>: the caption goes on)."""
        body = [self.bos] + ids[: text_len - 2] + [self.eos] if len(ids) <= text_len - 2 else [self.bos] + ids[: text_len - 1]
        return body + [self.pad] * (text_len - len(body)), len(body)

    def batch(self, texts: list[str], text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training captions -> ids [N, T] long and lengths [N] (truncated when too long)."""
        slots = [self.slot(self.encode(t), text_len) for t in texts]
        return torch.tensor([s for s, _ in slots], dtype=torch.long), torch.tensor([n for _, n in slots])

    def prompt(self, text: str, text_len: int) -> torch.Tensor:
        """A user prompt -> ids [T]. Empty prompts and prompts over T-2 tokens are refused (ValueError):
        silently cutting a prompt would generate an image of something the user did not ask for."""
        if not text or not text.strip():
            raise ValueError("empty prompt: describe the image, e.g. \"a red circle at the top left\"")
        ids = self.encode(text.strip())
        if not ids:  # e.g. "<eos>": only control-token text, which encode drops
            raise ValueError(f"prompt {text.strip()!r} has no text tokens")
        if len(ids) > text_len - 2:
            raise ValueError(f"prompt is {len(ids)} tokens; this model takes at most {text_len - 2} "
                             f"({text_len} with <bos> and <eos>)")
        return torch.tensor(self.slot(ids, text_len)[0], dtype=torch.long)


def train_bpe(texts: list[str], vocab_size: int = 256) -> TextTokenizer:
    """A byte-level BPE (lower-cased) trained on ``texts``: every word of a small caption set ends
    up a single token, and byte fallback means no prompt is ever un-encodable."""
    tk = _tokenizers()
    tok = tk.Tokenizer(tk.models.BPE(unk_token="<unk>"))
    tok.normalizer = tk.normalizers.Sequence([tk.normalizers.NFKC(), tk.normalizers.Lowercase()])
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(tok, "trained BPE")
