"""Our tokenizer (runtime/, `tokenizers` only) against transformers' CLIPTokenizer, as diffusers' SDXL pipeline calls it."""

from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pytest
from prompts import PROMPTS

from sdxl_trt.runtime import ClipTokenizer, UserError

transformers = pytest.importorskip("transformers")


def reference_ids(folder, prompts):
    tok = transformers.CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    # exactly what StableDiffusionXLPipeline.encode_prompt does
    return np.array(tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids)


@pytest.fixture(scope="module")
def shipped_reference(tmp_path_factory):
    """transformers' CLIPTokenizers built from the vocabulary as it ships (open_clip's bpe_simple_vocab_16e6.txt.gz,
    found by bpe_bytes()), not from the folders our export code writes: vocab.json + merges.txt derived here the way
    OpenAI CLIP's SimpleTokenizer reads the file (header line skipped, 49152 - 256 - 2 merges), with transformers' own
    (GPT-2) bytes_to_unicode. Pad tokens as SDXL's published tokenizer configs: CLIP-L <|endoftext|>, CLIP-G "!"."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from sdxl_trt.export.vocab import bpe_bytes

    merges = gzip.decompress(bpe_bytes()).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(merges) == 48894 and len(tokens) == len(set(tokens)) == 49408
    refs = {}
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        folder = tmp_path_factory.mktemp(f"shipped_{name}")
        (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": pad,
             "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
        refs[name] = transformers.CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    return refs


def test_corpus_is_varied():
    assert len(PROMPTS) >= 200
    assert "" in PROMPTS
    assert sum(len(p) > 400 for p in PROMPTS) >= 10


@pytest.mark.parametrize("name", ["tokenizer", "tokenizer_2"])
def test_ids_match_transformers(tokenizer_dirs, shipped_reference, name):
    """Exact equality of every id (no tolerance: ids are integers) against a reference that shares none of our files."""
    ours = ClipTokenizer.from_dir(tokenizer_dirs[name])
    got = ours(PROMPTS).ids
    tok = shipped_reference[name]
    # exactly what StableDiffusionXLPipeline.encode_prompt does
    want = np.array(tok(PROMPTS, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids)
    assert got.dtype == np.int32 and got.shape == (len(PROMPTS), 77)
    mismatched = [p for p, g, w in zip(PROMPTS, got, want) if not np.array_equal(g, w)]
    assert not mismatched, f"{len(mismatched)} prompts differ, first: {mismatched[0]!r}"


def test_truncation_counts_tokens_like_diffusers(tokenizer_dirs):
    """diffusers warns about what it cut using the untruncated ids; our lengths say the same."""
    ours = ClipTokenizer.from_dir(tokenizer_dirs["tokenizer"])
    ref = transformers.CLIPTokenizer.from_pretrained(tokenizer_dirs["tokenizer"], local_files_only=True)
    tokens = ours(PROMPTS)
    untruncated = [len(ids) - 2 for ids in ref(PROMPTS).input_ids]
    assert tokens.lengths == untruncated
    assert sum(tokens.truncated(77)) >= 10  # the corpus exercises truncation


def test_the_two_sdxl_tokenizers_pad_differently(tokenizer_dirs):
    l_tok = ClipTokenizer.from_dir(tokenizer_dirs["tokenizer"])
    g_tok = ClipTokenizer.from_dir(tokenizer_dirs["tokenizer_2"])
    l_ids, g_ids = l_tok(["a photo of a cat"]).ids[0], g_tok(["a photo of a cat"]).ids[0]
    # Published CLIP ids: <|startoftext|> a photo of a cat <|endoftext|>
    assert l_ids[:7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert np.array_equal(l_ids[:7], g_ids[:7])
    assert set(l_ids[7:].tolist()) == {49407}  # CLIP-L pads with <|endoftext|>
    assert set(g_ids[7:].tolist()) == {0}  # CLIP-G pads with "!"


def test_pad_token_is_read_from_the_files(tmp_path, tokenizer_dirs):
    folder = tmp_path / "tok"
    shutil.copytree(tokenizer_dirs["tokenizer"], folder)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config = json.loads((folder / name).read_text())
        config["pad_token"] = "!"
        (folder / name).write_text(json.dumps(config))
    ids = ClipTokenizer.from_dir(folder)(["cat"]).ids[0]
    assert ids[3:].tolist() == [0] * 74
    assert np.array_equal(ids, reference_ids(folder, ["cat"])[0])


def test_tokenizer_json_folder(tmp_path, tokenizer_dirs):
    """A folder that carries only tokenizer.json (as newer saves do) gives the same ids."""
    ref = transformers.CLIPTokenizer.from_pretrained(tokenizer_dirs["tokenizer_2"], local_files_only=True)
    ref.save_pretrained(tmp_path)
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).unlink(missing_ok=True)
    assert (tmp_path / "tokenizer.json").is_file()
    got = ClipTokenizer.from_dir(tmp_path)(PROMPTS[:50]).ids
    assert np.array_equal(got, reference_ids(tokenizer_dirs["tokenizer_2"], PROMPTS[:50]))


def test_vocabulary_is_clips(tokenizer_dirs):
    vocab = json.loads((tokenizer_dirs["tokenizer"] / "vocab.json").read_text())
    assert len(vocab) == 49408
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407 and vocab["!"] == 0
    assert sorted(vocab.values()) == list(range(49408))


def test_decode_matches_transformers(tokenizer_dirs):
    tok = ClipTokenizer.from_dir(tokenizer_dirs["tokenizer"])
    ref = transformers.CLIPTokenizer.from_pretrained(tokenizer_dirs["tokenizer"], local_files_only=True)
    assert tok.decode(tok(["A Photo of an Astronaut!"]).ids[0]) == "a photo of an astronaut !"
    for ids in tok(PROMPTS[:80]).ids:
        assert tok.decode(ids) == ref.decode(ids.tolist(), skip_special_tokens=True)


def test_bad_tokenizer_folders(tmp_path, tokenizer_dirs):
    with pytest.raises(UserError, match="does not exist"):
        ClipTokenizer.from_dir(tmp_path / "nowhere")
    with pytest.raises(UserError, match="neither vocab.json"):
        ClipTokenizer.from_dir(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(tokenizer_dirs["tokenizer"], broken)
    (broken / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        ClipTokenizer.from_dir(broken)
    with pytest.raises(TypeError):
        ClipTokenizer.from_dir(tokenizer_dirs["tokenizer"]).tokenize("a single string")
