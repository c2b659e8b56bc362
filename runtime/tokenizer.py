"""CLIP tokenizer for both SDXL text encoders, on the `tokenizers` library (no transformers).

The pipeline is CLIP's: NFC, whitespace runs to one space, lower case; split into special tokens,
English contractions, letter runs, single digits and runs of other symbols; byte-level BPE with the
end-of-word marker `</w>`. A prompt becomes `<|startoftext|> tokens[:75] <|endoftext|>` padded to 77.
The two SDXL tokenizers differ only in the pad token (`<|endoftext|>` for CLIP-L, `!` for CLIP-G):
it is read from the model's tokenizer files, never assumed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from .errors import UserError
from .fileio import read_json

# CLIP's pre-tokenization pattern (OpenAI `SimpleTokenizer`): the pieces that BPE then sees one by one.
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# CLIP was trained with 77 positions; SDXL's tokenizer configs say so as `model_max_length`.
DEFAULT_MAX_LENGTH = 77


@dataclass(frozen=True)
class Tokens:
    ids: np.ndarray  # [B, max_length] int32: <bos> tokens <eos> <pad>…
    lengths: list[int]  # tokens per prompt before truncation, without <bos>/<eos>

    def truncated(self, max_length: int) -> list[bool]:
        return [n > max_length - 2 for n in self.lengths]


class ClipTokenizer:
    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], *, bos: str, eos: str, pad: str,
                 unk: str, max_length: int = DEFAULT_MAX_LENGTH):
        for role, token in (("bos", bos), ("eos", eos), ("pad", pad), ("unk", unk)):
            if token not in vocab:
                raise UserError(f"tokenizer: its {role} token {token!r} is not in its vocabulary")
        self.bos_id, self.eos_id, self.pad_id = vocab[bos], vocab[eos], vocab[pad]
        self.pad_token = pad
        self.max_length = max_length
        tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tok.decoder = decoders.ByteLevel()
        # Every special token is matched in the raw text, before lower-casing, as a whole token. For CLIP-G's
        # tokenizer that includes its pad token "!": a "!" in a prompt becomes id 0, not "!</w>", as in the
        # reference pipeline.
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys((bos, eos, unk, pad))])
        self._tok = tok

    @classmethod
    def from_dir(cls, path: str | Path) -> ClipTokenizer:
        """Load a tokenizer folder as SDXL ships it: vocab.json + merges.txt (or tokenizer.json), tokenizer_config.json
        and/or special_tokens_map.json."""
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"tokenizer folder {path} does not exist")
        config = read_json(path / "tokenizer_config.json", "tokenizer") if (path / "tokenizer_config.json").is_file() else {}
        specials = (read_json(path / "special_tokens_map.json", "tokenizer")
                    if (path / "special_tokens_map.json").is_file() else {})

        def special(name: str, default: str) -> str:
            value = config.get(name) or specials.get(name) or default
            return value["content"] if isinstance(value, dict) else str(value)

        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            vocab = read_json(path / "vocab.json", "tokenizer")
            lines = (path / "merges.txt").read_text(encoding="utf-8").splitlines()
            merges = [ln for ln in lines if ln and not ln.startswith("#version")]
        elif (path / "tokenizer.json").is_file():
            model = read_json(path / "tokenizer.json", "tokenizer").get("model", {})
            vocab, merges = model.get("vocab"), model.get("merges")
            if not isinstance(vocab, dict) or not isinstance(merges, list):
                raise UserError(f"{path / 'tokenizer.json'} does not hold a BPE model (vocab and merges)")
        else:
            raise UserError(f"tokenizer folder {path} has neither vocab.json + merges.txt nor tokenizer.json")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
        if any(len(m) != 2 for m in merges):
            raise UserError(f"{path}: a merges line is not two symbols separated by one space")
        eos = special("eos_token", "<|endoftext|>")
        return cls(vocab, merges, bos=special("bos_token", "<|startoftext|>"), eos=eos,
                   pad=special("pad_token", eos), unk=special("unk_token", eos),
                   max_length=int(config.get("model_max_length", DEFAULT_MAX_LENGTH)))

    def tokenize(self, prompts: Sequence[str]) -> list[list[int]]:
        """BPE ids of each prompt, without <bos>/<eos> and without truncation."""
        if isinstance(prompts, str):
            raise TypeError("tokenize() takes a list of prompts")
        for prompt in prompts:
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:  # invalid UTF-8 on a command line, or an escaped lone surrogate in JSON
                raise UserError(f"prompt {prompt[:40]!r}: not valid text (character {e.start} is not Unicode; was it "
                                "written in another encoding than UTF-8?)") from None
        return [e.ids for e in self._tok.encode_batch(list(prompts), add_special_tokens=False)]

    def __call__(self, prompts: Sequence[str]) -> Tokens:
        """`<bos> ids[:max_length-2] <eos>` padded with the pad token to `max_length`, as diffusers' SDXL pipeline
        calls its tokenizers (padding="max_length", truncation=True)."""
        pieces = self.tokenize(prompts)
        keep = self.max_length - 2
        ids = np.full((len(pieces), self.max_length), self.pad_id, dtype=np.int32)
        for row, p in zip(ids, pieces):
            p = p[:keep]
            row[0] = self.bos_id
            row[1 : 1 + len(p)] = p
            row[1 + len(p)] = self.eos_id
        return Tokens(ids=ids, lengths=[len(p) for p in pieces])

    def windows(self, prompts: Sequence[str], count: int | None = None) -> np.ndarray:
        """Long prompts as `count` windows of `max_length` ids each, [B, count, max_length] int32: the tokens are cut
        into runs of max_length - 2, each wrapped in <bos> … <eos> and padded; prompts with fewer runs get windows
        of the empty prompt. `count` defaults to what the longest prompt needs."""
        keep = self.max_length - 2
        pieces = self.tokenize(prompts)
        needed = [max(1, -(-len(p) // keep)) for p in pieces]
        count = count or max(needed)
        ids = np.full((len(pieces), count, self.max_length), self.pad_id, dtype=np.int32)
        for rows, p in zip(ids, pieces):
            for w, row in enumerate(rows):
                chunk = p[w * keep : (w + 1) * keep]
                row[0] = self.bos_id
                row[1 : 1 + len(chunk)] = chunk
                row[1 + len(chunk)] = self.eos_id
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text = self._tok.decode(list(ids), skip_special_tokens=True)
        return text.replace("</w>", " ").strip()
