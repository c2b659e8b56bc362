"""`sdxl-trt refit`: a fine-tune of the model an engine directory was exported from, put into that directory's ONNX
files without tracing. Held to a fresh `sdxl-trt export` of the fine-tune: same pipeline output (final latents
rel-L2 ≤ 1e-5; the graphs are the same, only the weights move), while the result moves away from the original."""

from __future__ import annotations

import copy
import json
import shutil

import pytest

torch = pytest.importorskip("torch")

from sdxl_trt.export.engine_dir import export_engine_dir  # noqa: E402
from sdxl_trt.export.refit import refit_engine_dir  # noqa: E402
from sdxl_trt.export.verify import rel_l2  # noqa: E402
from sdxl_trt.runtime import Pipeline, UserError  # noqa: E402
from sdxl_trt.runtime.cli import main  # noqa: E402
from sdxl_trt.runtime.manifest import load_manifest  # noqa: E402

KW = dict(height=64, width=96, num_inference_steps=4, seed=3, output_type="latent", progress=False)


def perturbed(model, scale: float, seed: int):
    """A copy of a ModelSource with every floating-point weight moved by scale · N(0, 1) · (its RMS, or 1)."""
    out = copy.copy(model)
    generator = torch.Generator().manual_seed(seed)
    for part in ("unet", "clip_l", "clip_g", "vae"):
        module = copy.deepcopy(getattr(model, part))
        with torch.no_grad():
            for p in module.parameters():
                rms = float(p.pow(2).mean().sqrt()) or 1.0
                p.add_(torch.randn(p.shape, generator=generator) * scale * rms)
        setattr(out, part, module)
    return out


@pytest.fixture(scope="module")
def models(tiny_base, tmp_path_factory):
    """An "original" (the tiny model with every weight distinct: freshly initialised norms are all ones) exported,
    a fine-tune of it, and the fine-tune exported from scratch."""
    root = tmp_path_factory.mktemp("refit")
    original, finetune = perturbed(tiny_base, 0.05, 1), None
    original.save_pretrained(root / "original")
    finetune = perturbed(original, 0.2, 2)
    finetune.save_pretrained(root / "finetune")
    export_engine_dir(str(root / "original"), root / "engine", progress=False)
    export_engine_dir(str(root / "finetune"), root / "reexport", progress=False)
    return root


def test_refit_gives_what_a_fresh_export_gives(models, tmp_path):
    report = refit_engine_dir(models / "engine", tmp_path / "refit", str(models / "finetune"), verify=True,
                              progress=False)
    print(report.summary())
    assert {row[0] for row in report.rows} == {"clip_l", "clip_g", "unet", "vae_decoder", "vae_encoder"}
    assert all(replaced > 0 for _, _, replaced, _, _ in report.rows)
    assert any("fp16" in line for line in report.verify_lines)
    manifest = load_manifest(tmp_path / "refit")
    manifest.check_files()
    assert manifest.data["sources"]["base"]["spec"] == str(models / "finetune")
    assert manifest.data["sources"]["base"]["refitted_from"] == str(models / "original")
    ours = Pipeline.load(tmp_path / "refit")("a lighthouse", **KW).array
    fresh = Pipeline.load(models / "reexport")("a lighthouse", **KW).array
    before = Pipeline.load(models / "engine")("a lighthouse", **KW).array
    print(f"refit vs fresh export: rel-L2 {rel_l2(ours, fresh):.1e}; vs the original {rel_l2(ours, before):.2f}")
    assert rel_l2(ours, fresh) <= 1e-5
    assert rel_l2(ours, before) > 0.05
    for name in ("unet", "clip_g"):  # the graphs are the original's: only initializers' data differ
        import onnx

        a = onnx.load(str(manifest.path(manifest.components[name]["precisions"]["fp32"])), load_external_data=False)
        b = onnx.load(str(models / "engine" / manifest.components[name]["precisions"]["fp32"]),
                      load_external_data=False)
        assert [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]


def test_refit_refuses_another_architecture_or_a_missing_original(models, tiny_refiner, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(models / "finetune", other)
    import diffusers

    config = json.loads((other / "unet" / "config.json").read_text())
    config["transformer_layers_per_block"] = 2  # a deeper UNet of its own (weights and config agree)
    shutil.rmtree(other / "unet")
    diffusers.UNet2DConditionModel.from_config(config).save_pretrained(other / "unet")
    args = ["refit", str(models / "engine"), "--out", str(tmp_path / "out")]
    assert main([*args, "--model", str(other)]) == 2
    err = capsys.readouterr().err
    assert "not the architecture" in err and "transformer_layers_per_block" in err and "re-export" in err
    assert main([*args, "--model", "tiny:refiner"]) == 2
    assert "no refiner to refit" in capsys.readouterr().err
    assert main([*args, "--model", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    moved = tmp_path / "moved"  # the engine directory of a folder that is gone
    shutil.copytree(models / "engine", moved)
    data = json.loads((moved / "manifest.json").read_text())
    data["sources"]["base"]["spec"] = str(tmp_path / "gone")
    (moved / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="cannot be loaded.*re-export instead"):
        refit_engine_dir(moved, tmp_path / "out2", str(models / "finetune"), progress=False)


def test_refit_cli_writes_the_directory_and_says_what_to_rebuild(models, tmp_path, capsys):
    assert main(["refit", str(models / "engine"), "--model", str(models / "finetune"), "--out",
                 str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "refitted into" in out and "sdxl-trt optimize" in out
    assert "optimized" not in json.dumps(load_manifest(tmp_path / "cli").components)
    # the CLI's directory gives what a fresh export of the fine-tune gives (as refit_engine_dir's does above), not
    # the original's: the fine-tune's weights went in through the front door
    ours = Pipeline.load(tmp_path / "cli")("a cat", **KW).array
    assert rel_l2(ours, Pipeline.load(models / "reexport")("a cat", **KW).array) <= 1e-5
    assert rel_l2(ours, Pipeline.load(models / "engine")("a cat", **KW).array) > 0.05


def test_weights_the_original_shared_must_stay_shared(tiny_engine, tiny_base, tmp_path):
    """tiny:base's norms are freshly initialised (all ones: one value, many parameters); a fine-tune that moves them
    apart cannot be put into initializers that hold that value for several parameters: re-export."""
    perturbed(tiny_base, 0.2, 5).save_pretrained(tmp_path / "finetune")
    with pytest.raises(UserError, match="does not keep equal; re-export"):
        refit_engine_dir(tiny_engine, tmp_path / "out", str(tmp_path / "finetune"), progress=False)
    assert not (tmp_path / "out").exists()
