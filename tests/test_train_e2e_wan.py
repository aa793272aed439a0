"""tsa-train / tsa-sample end to end on tiny random Wan models (CPU): LoRA and full, every method, resume, A14B."""

import json
import shutil

import numpy as np
import pytest
import torch

from tsa.config import parse_args
from tsa.train import train

pytestmark = pytest.mark.slow
QUIET = ["--no-progress"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def wan_run(tmp_path_factory):
    """`tsa-train --preset tiny --model-family wan --align mtsa --finetune lora`, 4 steps."""
    output = tmp_path_factory.mktemp("wan")
    history = train(
        parse_args(
            [
                "--output-dir",
                str(output),
                "--model-family",
                "wan",
                "--finetune",
                "lora",
                "--lora-rank",
                "4",
                "--lora-alpha",
                "8",
                "--max-steps",
                "4",
                "--checkpointing-steps",
                "2",
                "--num-videos",
                "4",
                "--lr-warmup-steps",
                "0",
                *QUIET,
            ]
        )
    )
    return output, history


def reuse(run):
    tiny = run / "tiny"
    return [
        "--preset",
        "tiny",
        "--model-path",
        str(tiny / "wan"),
        "--teacher-path",
        str(tiny / "videomae"),
        "--data",
        str(tiny / "data"),
        "--cache-dir",
        str(run / "cache"),
        *QUIET,
    ]


def test_wan_lora_run_loads_into_wan_pipeline(wan_run):
    from diffusers import WanPipeline, WanTransformer3DModel
    from peft import LoraConfig
    from safetensors.torch import load_file

    from tsa.sample import load_pipeline

    output, history = wan_run
    assert [row["step"] for row in history] == [1, 2, 3, 4]
    assert all(np.isfinite(row["loss"]) and row["align"] > 0 and row["diffusion"] > 0 for row in history)
    args = json.loads((output / "training_args.json").read_text())
    assert args["model_family"] == "wan" and args["expert"] == "transformer" and args["align_layer"] == 2
    assert json.loads((output / "tiny" / "wan" / "model_index.json").read_text())["_class_name"] == "WanPipeline"
    assert (output / "pytorch_lora_weights.safetensors").is_file() and not (output / "transformer").exists()

    pipe = load_pipeline(output, output / "tiny" / "wan", torch.float32)
    assert isinstance(pipe, WanPipeline)
    plain = WanPipeline.from_pretrained(output / "tiny" / "wan")
    plain.load_lora_weights(output)  # the diffusers loader alone
    reference = WanTransformer3DModel.from_pretrained(output / "tiny" / "wan", subfolder="transformer")
    base = WanTransformer3DModel.from_pretrained(output / "tiny" / "wan", subfolder="transformer")
    reference.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    state = load_file(output / "checkpoints" / "checkpoint-4" / "model.safetensors")
    lora_state = {key.removeprefix("transformer."): value for key, value in state.items() if "lora_" in key}
    assert lora_state and any(value.abs().sum() > 0 for key, value in lora_state.items() if "lora_B" in key)
    assert not reference.load_state_dict(lora_state, strict=False).unexpected_keys
    generator = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 4, 3, 12, 18, generator=generator),
        encoder_hidden_states=torch.randn(1, 512, 32, generator=generator),
        timestep=torch.tensor([500.0]),
        return_dict=False,
    )
    with torch.no_grad():
        outputs = [model(**inputs)[0] for model in (pipe.transformer, plain.transformer, reference, base)]
    torch.testing.assert_close(outputs[0], outputs[2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs[1], outputs[2], rtol=1e-5, atol=1e-6)
    assert (outputs[0] - outputs[3]).abs().max() > 1e-6


@pytest.mark.parametrize("align", ["tsa", "trd", "repa"])
def test_wan_full_fine_tune_with_each_alignment_loss(wan_run, tmp_path, align):
    run = wan_run[0]
    history = train(parse_args([*reuse(run), "--output-dir", str(tmp_path), "--align", align, "--max-steps", "1"]))
    assert np.isfinite(history[0]["loss"]) and history[0]["align"] != 0
    assert (tmp_path / "transformer" / "config.json").is_file() and (tmp_path / "projector").is_dir()


def test_wan_lamo_and_sampling_with_and_without_motion_guidance(wan_run, tmp_path, monkeypatch):
    import tsa.lamo
    from tsa.data import read_video
    from tsa.sample import main as sample_main

    run = wan_run[0]
    output = tmp_path / "lamo"
    history = train(parse_args([*reuse(run), "--output-dir", str(output), "--align", "lamo", "--max-steps", "2"]))
    assert all(row["align"] == 0 and row["drift"] > 0 and row["predictor"] > 0 for row in history)
    assert (output / "motion_predictor" / "config.json").is_file()
    handles, enable = [], tsa.lamo.enable_motion_guidance
    monkeypatch.setattr(tsa.lamo, "enable_motion_guidance", lambda *a, **k: handles.append(enable(*a, **k)))
    for guidance in ("0", "15"):
        sample_main(
            [
                str(output),
                "--prompt",
                "a ball rolls",
                "--num-inference-steps",
                "3",
                "--motion-guidance",
                guidance,
                "--output-dir",
                str(tmp_path / f"samples-{guidance}"),
            ]
        )
        (video,) = (tmp_path / f"samples-{guidance}").glob("*.mp4")
        assert read_video(video, 9, 96, 144).shape == (9, 3, 96, 144)
    (guidance,) = handles
    assert [index for index, _ in guidance.history] == [0, 1, 2]  # rho 0.8 of 3 steps: from int(0.2 * 3) = 0


def test_wan_resume_matches_an_uninterrupted_run(wan_run, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    run = wan_run[0]
    common = [
        *reuse(run),
        "--train-batch-size",
        "1",
        "--checkpointing-steps",
        "2",
        "--motion-drift-weight",
        "0.4",
        "--lr-scheduler",
        "cosine",
        "--lr-warmup-steps",
        "1",
    ]
    straight = train(parse_args([*common, "--output-dir", str(tmp_path / "straight"), "--max-steps", "3"]))
    # the state the run left at step 2, resumed in a fresh output dir
    shutil.copytree(
        tmp_path / "straight" / "checkpoints" / "checkpoint-2", tmp_path / "resumed" / "checkpoints" / "checkpoint-2"
    )
    resumed = train(
        parse_args([*common, "--output-dir", str(tmp_path / "resumed"), "--max-steps", "3", "--resume", "latest"])
    )
    assert [row["step"] for row in resumed] == [1, 2, 3]
    for name in ("loss", "diffusion", "align", "drift", "predictor", "lr"):
        np.testing.assert_allclose(
            [row[name] for row in resumed], [row[name] for row in straight], rtol=1e-5, atol=1e-7, err_msg=name
        )


def test_wan22_a14b_trains_the_chosen_expert_on_its_timesteps(wan_run, tmp_path, monkeypatch):
    from diffusers import WanPipeline

    from tsa.models.wan import WanFamily
    from tsa.sample import load_pipeline
    from tsa.tiny import save_tiny_pipeline

    run = wan_run[0]
    model = save_tiny_pipeline(tmp_path / "a14b", family="wan", two_experts=True)
    listing = tmp_path / "two.csv"
    listing.write_text(
        "video,caption\n"
        + "".join(
            f"{run / 'tiny' / 'data' / line.strip()},a clip\n"
            for line in (run / "tiny" / "data" / "videos.txt").read_text().splitlines()[:2]
        )
    )
    seen, denoise = [], WanFamily.denoise_and_loss

    def recording(self, *args, **kwargs):
        out = denoise(self, *args, **kwargs)
        seen.append(out["timesteps"])
        return out

    monkeypatch.setattr(WanFamily, "denoise_and_loss", recording)
    common = [
        "--preset",
        "tiny",
        "--model-path",
        str(model),
        "--teacher-path",
        str(run / "tiny" / "videomae"),
        "--data",
        str(listing),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--max-steps",
        "2",
        *QUIET,
    ]
    output = tmp_path / "low-noise"
    train(
        parse_args(
            [
                *common,
                "--output-dir",
                str(output),
                "--expert",
                "transformer_2",
                "--finetune",
                "lora",
                "--lora-rank",
                "4",
                "--lora-alpha",
                "4",
            ]
        )
    )
    assert seen and all(float(t.max()) < 875 for t in seen)
    pipe = load_pipeline(output, model, torch.float32, expert="transformer_2")
    assert isinstance(pipe, WanPipeline) and pipe.config.boundary_ratio == 0.875
    assert getattr(pipe.transformer_2, "peft_config", None) and not getattr(pipe.transformer, "peft_config", None)
    seen.clear()
    train(parse_args([*common, "--output-dir", str(tmp_path / "high-noise"), "--align", "none"]))
    assert seen and all(float(t.min()) >= 875 for t in seen)
    assert (tmp_path / "high-noise" / "transformer" / "config.json").is_file()
