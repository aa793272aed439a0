"""Each model variant's own sampling recipe (docs/method.md, "Sampling defaults"), tsa-sample's options for it, and
the settings file beside every sample that reproduces it."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import tsa.sampling
from tsa.models import get_family

DOCS = Path(__file__).resolve().parents[1] / "docs" / "method.md"


def docs_table() -> dict[str, dict]:
    """variant -> the values of its row in docs/method.md's "Sampling defaults" table."""
    text = DOCS.read_text()
    section = text[text.index("## Sampling defaults"):]
    section = section[: section.index("\n## ", 1)]
    wan = re.search(r"^- wan: .*?\n\s+`([^`]+)`", section, re.M | re.S).group(1)
    prefix = re.search(r"^- wan-i2v: .*? prepends `([^`]+)`", section, re.M | re.S).group(1)
    ltx2 = re.search(r"^- ltx2: .*?\n\s+`([^`]+)`", section, re.M | re.S).group(1)
    prompts = {"wan": wan, "wan-i2v": prefix + wan, "none": "", "ltx2": ltx2}

    def number(cell, kind=float):
        return None if cell == "-" else kind(cell)

    rows = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        variant = re.match(r"`([^`]+)`", cells[0]).group(1)
        rows[variant] = dict(
            num_inference_steps=int(cells[1]), guidance_scale=number(cells[2]), guidance_scale_2=number(cells[3]),
            flow_shift=number(cells[4]), fps=int(cells[5]), negative_prompt=prompts[cells[6]],
        )
    return rows


def pipeline_folder(path: Path, index: dict, transformer: dict) -> Path:
    """A pipeline folder holding only the configs that variant detection reads."""
    (path / "transformer").mkdir(parents=True)
    (path / "model_index.json").write_text(json.dumps(index))
    (path / "transformer" / "config.json").write_text(json.dumps(transformer))
    return path


WAN_T2V = {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"]}
WAN_I2V = {"_class_name": "WanImageToVideoPipeline", "transformer": ["diffusers", "WanTransformer3DModel"]}
COG_T2V = {"_class_name": "CogVideoXPipeline"}
COG_I2V = {"_class_name": "CogVideoXImageToVideoPipeline"}
LTX2_T2V = {"_class_name": "LTX2Pipeline"}
# variant -> (family, model_index.json, transformer/config.json, (height, width) sampled), as the released
# diffusers folders write them
VARIANTS = {
    "wan2.1-t2v": ("wan", WAN_T2V, {"num_layers": 30}, (480, 832)),
    "wan2.1-i2v-480p": ("wan", {**WAN_I2V, "image_encoder": ["transformers", "CLIPVisionModel"]},
                        {"num_layers": 40, "image_dim": 1280}, (480, 832)),
    "wan2.1-i2v-720p": ("wan", {**WAN_I2V, "image_encoder": ["transformers", "CLIPVisionModel"]},
                        {"num_layers": 40, "image_dim": 1280}, (720, 1280)),
    "wan2.2-t2v-a14b": ("wan", {**WAN_T2V, "boundary_ratio": 0.875, "transformer_2": ["diffusers", "X"]}, {},
                        (720, 1280)),
    "wan2.2-i2v-a14b": ("wan", {**WAN_I2V, "boundary_ratio": 0.9, "transformer_2": ["diffusers", "X"]},
                        {"in_channels": 36}, (480, 832)),
    "wan2.2-ti2v-5b": ("wan", {**WAN_T2V, "expand_timesteps": True}, {"in_channels": 48}, (704, 1280)),
    "cogvideox-2b": ("cogvideox", COG_T2V, {"use_rotary_positional_embeddings": False}, (480, 720)),
    "cogvideox-5b": ("cogvideox", COG_T2V, {"use_rotary_positional_embeddings": True}, (480, 720)),
    "cogvideox-5b-i2v": ("cogvideox", COG_I2V, {"use_rotary_positional_embeddings": True, "in_channels": 32},
                         (480, 720)),
    "cogvideox1.5-5b": ("cogvideox", COG_T2V, {"use_rotary_positional_embeddings": True, "patch_size_t": 2},
                        (768, 1360)),
    "cogvideox1.5-5b-i2v": ("cogvideox", COG_I2V, {"use_rotary_positional_embeddings": True, "patch_size_t": 2},
                            (768, 1360)),
    "ltx2": ("ltx2", LTX2_T2V, {"num_layers": 48}, (512, 768)),
}


def test_the_docs_table_lists_every_variant_once():
    assert sorted(docs_table()) == sorted(VARIANTS)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_sampling_defaults_equal_the_docs_table(variant, tmp_path):
    family, index, transformer, (height, width) = VARIANTS[variant]
    folder = pipeline_folder(tmp_path / variant, index, transformer)
    defaults = get_family(family).sampling_defaults(folder, height, width)
    assert defaults.variant == variant
    row = docs_table()[variant]
    assert {key: getattr(defaults, key) for key in row} == row


def test_wan_recipes_are_wans_own_numbers():
    """The values the issue quotes from Wan's configs, written out here rather than read from either side."""
    rows = docs_table()
    assert (rows["wan2.2-t2v-a14b"]["guidance_scale"], rows["wan2.2-t2v-a14b"]["guidance_scale_2"]) == (4.0, 3.0)
    assert rows["wan2.2-t2v-a14b"]["flow_shift"] == 12.0 and rows["wan2.2-t2v-a14b"]["num_inference_steps"] == 40
    assert rows["wan2.1-t2v"]["flow_shift"] == 5.0 and rows["wan2.2-ti2v-5b"]["fps"] == 24
    # sha256 of sample_neg_prompt as Wan-Video/Wan2.2 42bf4cf wan/configs/shared_config.py:19 writes it (137 chars)
    negative = rows["wan2.1-t2v"]["negative_prompt"]
    assert hashlib.sha256(negative.encode()).hexdigest() == (
        "ce96e0324e4b54ce4b6e867f669ca520952e1a34cc116543516b1897f0d3c47e")
    assert rows["wan2.1-i2v-480p"]["negative_prompt"] == "镜头晃动，" + negative


@pytest.mark.parametrize(
    "family, options, variant",
    [("wan", {}, "wan2.1-t2v"), ("wan", {"two_experts": True}, "wan2.2-t2v-a14b"),
     ("wan", {"ti2v": True}, "wan2.2-ti2v-5b"), ("cogvideox", {}, "cogvideox-2b"),
     ("cogvideox", {"rotary": True}, "cogvideox-5b")],
)
def test_tiny_folders_are_detected_as_their_variant(family, options, variant, tmp_path):
    folder = get_family(family).save_tiny_pipeline(tmp_path / "model", num_layers=1, **options)
    assert get_family(family).sampling_defaults(folder, 32, 32).variant == variant


# ----------------------------------------------------------------------------------- tsa-sample end to end
def finished_run(tmp_path: Path, family: str, **options) -> Path:
    """A tiny pipeline folder and a run folder holding a full fine-tune of its transformer (the base weights)."""
    model = get_family(family).save_tiny_pipeline(tmp_path / "model", num_layers=1, **options)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(model / "transformer", run / "transformer")
    (run / "training_args.json").write_text(
        json.dumps({"model_path": str(model), "height": 32, "width": 32, "num_frames": 5, "expert": "transformer"})
    )
    return run


@pytest.fixture
def pipeline_calls(monkeypatch):
    """The keyword arguments of every pipeline call tsa-sample makes, and the scheduler it samples with."""
    calls = []
    load = tsa.sampling.load_pipeline

    def spying_load(*args, **kwargs):
        pipe = load(*args, **kwargs)
        call = type(pipe).__call__
        if getattr(call, "spied", False):
            return pipe

        def spy(self, *call_args, **call_kwargs):
            calls.append({**call_kwargs, "scheduler_config": dict(self.scheduler.config)})
            return call(self, *call_args, **call_kwargs)

        spy.spied = True
        monkeypatch.setattr(type(pipe), "__call__", spy)
        return pipe

    monkeypatch.setattr(tsa.sampling, "load_pipeline", spying_load)
    return calls


def without_generator(call: dict) -> dict:
    return {key: value for key, value in call.items() if key != "generator"}


def frames_of(path):
    from tsa.training.data import read_video

    return read_video(path, 5, 32, 32)


def test_two_expert_wan_samples_with_its_recipe_and_the_settings_file_reproduces_it(tmp_path, pipeline_calls):
    from tsa.cli.sample import main

    run = finished_run(tmp_path, "wan", two_experts=True)
    main([str(run), "--prompt", "a red ball", "--num-inference-steps", "2", "--seed", "3", "--device", "cpu"])
    (call,) = pipeline_calls
    expected = docs_table()["wan2.2-t2v-a14b"]
    assert call["guidance_scale"] == expected["guidance_scale"] == 4.0
    assert call["guidance_scale_2"] == expected["guidance_scale_2"] == 3.0
    assert call["negative_prompt"] == expected["negative_prompt"]
    assert call["scheduler_config"]["shift"] == 12.0 and call["num_inference_steps"] == 2
    (video,) = (run / "samples").glob("*.mp4")
    settings = json.loads(video.with_suffix(".json").read_text())
    assert settings["variant"] == "wan2.2-t2v-a14b" and settings["seed"] == 3 and settings["prompt"] == "a red ball"
    assert settings["flow_shift"] == 12.0 and settings["fps"] == 16 and settings["num_frames"] == 5
    assert settings["weights"] == {"kind": "full", "experts": ["transformer"], "lora_scale": None}
    import diffusers

    assert settings["versions"]["diffusers"] == diffusers.__version__

    main(["--settings", str(video.with_suffix(".json"))])
    again = video.parent / "reproduced" / video.name
    assert without_generator(pipeline_calls[1]) == without_generator(pipeline_calls[0])
    torch.testing.assert_close(frames_of(again), frames_of(video), rtol=0, atol=0)
    assert json.loads(again.with_suffix(".json").read_text()) == settings


def test_options_override_the_recipe_and_the_settings_file(tmp_path, pipeline_calls):
    from tsa.cli.sample import main

    run = finished_run(tmp_path, "wan")
    main([str(run), "--prompt", "a cube", "--num-inference-steps", "1", "--guidance-scale", "2.5",
          "--flow-shift", "7", "--negative-prompt", "blurry", "--fps", "12", "--device", "cpu"])
    (video,) = (run / "samples").glob("*.mp4")
    main(["--settings", str(video.with_suffix(".json")), "--seed", "1", "--output-dir", str(tmp_path / "other")])
    first, second = pipeline_calls
    assert first["guidance_scale"] == 2.5 and first["negative_prompt"] == "blurry"
    assert first["scheduler_config"]["shift"] == 7.0 and "guidance_scale_2" not in first
    assert without_generator(second) == without_generator(first)
    settings = json.loads((tmp_path / "other" / video.with_suffix(".json").name).read_text())
    assert settings["seed"] == 1 and settings["fps"] == 12 and settings["guidance_scale"] == 2.5


def test_cogvideox_samples_without_a_negative_prompt_or_shift(tmp_path, pipeline_calls):
    from tsa.cli.sample import main

    run = finished_run(tmp_path, "cogvideox")
    main([str(run), "--prompt", "a cube", "--num-inference-steps", "1", "--device", "cpu"])
    (call,) = pipeline_calls
    assert call["negative_prompt"] == "" and call["guidance_scale"] == 6.0 and "guidance_scale_2" not in call
    settings = json.loads(next((run / "samples").glob("*.json")).read_text())
    assert settings["variant"] == "cogvideox-2b" and settings["flow_shift"] is None and settings["fps"] == 8


@pytest.mark.parametrize(
    "family, extra, option",
    [("wan", ["--guidance-scale-2", "3"], "--guidance-scale-2"), ("cogvideox", ["--flow-shift", "3"], "--flow-shift"),
     ("wan", ["--flow-shift", "0"], "--flow-shift"), ("wan", ["--guidance-scale-2", "-1"], "--guidance-scale-2")],
)
def test_options_the_model_does_not_take_are_refused_before_it_loads(family, extra, option, tmp_path, capsys,
                                                                      monkeypatch):
    from tsa.cli.sample import main

    run = finished_run(tmp_path, family)
    monkeypatch.setattr(tsa.sampling, "load_pipeline", lambda *args, **kwargs: pytest.fail("the pipeline loaded"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(run), "--prompt", "a cube", "--device", "cpu", *extra])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and option in error[0]


def test_a_settings_file_that_is_not_one_is_refused(tmp_path, capsys):
    from tsa.cli.sample import main

    bad = tmp_path / "x.json"
    bad.write_text("{}")
    for argv in (["--settings", str(bad)], ["--settings", str(tmp_path / "none.json")], ["--prompt", "a"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
