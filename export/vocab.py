"""The CLIP BPE vocabulary, read from the `open_clip_torch` wheel, and the tokenizer folders built from it.

Both SDXL tokenizers use OpenAI CLIP's byte-level BPE: 49,152 lines of merges, of which the first is a
header and the last 256 + 2 are unused, giving a vocabulary of 256 byte symbols, the same 256 with the
end-of-word marker `</w>`, 48,894 merged symbols and the two specials: 49,408 ids in all. The file ships
inside the `open_clip_torch` wheel; importing open_clip needs torchvision, so we only read the file (bpe_bytes).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import json
import shutil
import sys
import zipfile
from pathlib import Path

from ..runtime.errors import UserError
from ..runtime.fileio import atomic_dir, cache_dir

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"  # OpenAI CLIP's file, as open_clip ships it
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


WHEEL = "open_clip_torch==3.3.0"
WHEEL_DIR = Path(sys.prefix) / "share" / "sdxl-trt"  # where README's set-up downloads the wheel (inside the venv)
DOWNLOAD = f"pip download --no-deps {WHEEL} -d {WHEEL_DIR}"


@functools.lru_cache(maxsize=1)
def bpe_bytes() -> bytes:
    """The gzipped vocabulary file: from an installed open_clip package if there is one, else read out of the
    open_clip_torch wheel that README's set-up downloads (`pip download --no-deps`) without installing it: installed
    without its dependencies (torchvision, timm, ...) it would leave pip reporting them missing ever after."""
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE
        if path.is_file():
            return path.read_bytes()
    for wheel in sorted(WHEEL_DIR.glob("open_clip_torch-*.whl"), reverse=True):
        try:
            with zipfile.ZipFile(wheel) as z:
                data = z.read(f"open_clip/{BPE_FILE}")
        except (OSError, KeyError, zipfile.BadZipFile) as e:
            raise UserError(f"{wheel} holds no readable open_clip/{BPE_FILE} ({e}); download it again: "
                            f"{DOWNLOAD}") from None
        if hashlib.sha256(data).hexdigest() != BPE_SHA256:
            raise UserError(f"{wheel}: its {BPE_FILE} is not OpenAI CLIP's (sha256 differs); download it again: "
                            f"{DOWNLOAD}")
        return data
    raise UserError(f"the CLIP BPE vocabulary ships in the open_clip_torch wheel, which is not here: {DOWNLOAD}")


@functools.lru_cache(maxsize=1)
def clip_bpe() -> tuple[dict[str, int], list[str]]:
    """(vocab: token → id, merges: "a b" lines) exactly as OpenAI CLIP and HF's vocab.json/merges.txt number them."""
    text = gzip.decompress(bpe_bytes()).decode("utf-8")
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
        key = hashlib.sha256(bpe_bytes())
        for f in sorted(src.iterdir()):
            key.update(f.name.encode() + f.read_bytes())
        dest = cache_dir("tokenizers") / f"{name}-{key.hexdigest()[:16]}"
        if not (dest / "merges.txt").is_file():
            write_tokenizer_dir(dest, src)
        dirs[name] = dest
    return dirs
