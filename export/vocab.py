"""The CLIP BPE vocabulary, read from the `open_clip_torch` wheel, and the tokenizer folders built from it.

Both SDXL tokenizers use OpenAI CLIP's byte-level BPE: 49,152 lines of merges, of which the first is a
header and the last 256 + 2 are unused, giving a vocabulary of 256 byte symbols, the same 256 with the
end-of-word marker `</w>`, 48,894 merged symbols and the two specials: 49,408 ids in all. The file ships
inside the `open_clip_torch` wheel; importing open_clip needs torchvision, so we only locate it.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

from ..runtime.errors import UserError
from ..runtime.fileio import atomic_dir, cache_dir

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # as OpenAI's SimpleTokenizer reads the file
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CONFIGS = Path(__file__).parent / "configs"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters (order matters: it fixes the ids)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def bpe_path() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the CLIP BPE vocabulary ships in the open_clip_torch wheel, which is not installed: "
            "pip install --no-deps open_clip_torch"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE
    if not path.is_file():
        raise UserError(f"open_clip_torch is installed but has no {BPE_FILE} at {path}: reinstall it with --no-deps")
    return path


@functools.lru_cache(maxsize=1)
def clip_bpe() -> tuple[dict[str, int], list[str]]:
    """(vocab: token → id, merges: "a b" lines) exactly as OpenAI CLIP and HF's vocab.json/merges.txt number them."""
    text = gzip.open(bpe_path(), "rb").read().decode("utf-8")
    merges = text.split("\n")[1 : N_MERGES + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer_dir(dest: Path, config_dir: Path) -> None:
    """Write a tokenizer folder in the layout of SDXL's `tokenizer/` and `tokenizer_2/` (vocab.json, merges.txt and
    the two config files copied from `config_dir`, which say among other things which token pads)."""
    vocab, merges = clip_bpe()
    with atomic_dir(dest) as tmp:
        (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            shutil.copyfile(config_dir / name, tmp / name)


TOKENIZER_NAMES = ("tokenizer", "tokenizer_2")  # CLIP-L's and CLIP-G's, as diffusers folders name them


def cached_tokenizer_dirs(config_dir: Path) -> dict[str, Path]:
    """Tokenizer folders for an embedded architecture, written once into the cache (keyed by content)."""
    dirs = {}
    for name in TOKENIZER_NAMES:
        src = config_dir / name
        if not src.is_dir():
            continue
        key = hashlib.sha256(bpe_path().read_bytes())
        for f in sorted(src.iterdir()):
            key.update(f.name.encode() + f.read_bytes())
        dest = cache_dir("tokenizers") / f"{name}-{key.hexdigest()[:16]}"
        if not (dest / "merges.txt").is_file():
            write_tokenizer_dir(dest, src)
        dirs[name] = dest
    return dirs
