"""Motion Prior Guidance inside diffusers' CogVideoXPipeline on the tiny models (CPU), and LaMo through the
tsa-train / tsa-sample command lines."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from diffusers import CogVideoXPipeline

from tsa.lamo import MotionPredictor, enable_motion_guidance
from tsa.tiny import TINY_LATENT_CHANNELS, TINY_TEXT_DIM, save_tiny_pipeline

PROMPT = "a red ball falls onto the table and bounces"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    path = save_tiny_pipeline(tmp_path_factory.mktemp("tiny_pipeline"))
    pipe = CogVideoXPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    predictor = MotionPredictor(
        in_channels=TINY_LATENT_CHANNELS, channels=16, num_blocks=2, cond_dim=16, text_dim=TINY_TEXT_DIM
    )
    with torch.no_grad():  # a trained predictor predicts motion; a fresh one predicts none
        predictor.head.weight.normal_(std=0.1)
    return predictor


def sample(pipe, prompt=PROMPT, output_type="latent", **kwargs):
    return pipe(
        prompt=prompt,
        num_frames=9,
        height=64,
        width=64,
        num_inference_steps=5,
        guidance_scale=6.0,
        generator=torch.Generator().manual_seed(0),
        output_type=output_type,
        **kwargs,
    ).frames


def test_guidance_scale_zero_reproduces_the_unguided_sample(pipe, predictor):
    unguided = sample(pipe)
    with enable_motion_guidance(pipe, predictor, scale=0.0, rho=0.8) as guidance:
        assert torch.equal(sample(pipe), unguided)
    # rho = 0.8 of 5 steps: from int(0.2 * 5) = int(0.99...) = 0 on (LaMo's code), each with a finite loss
    assert [index for index, _ in guidance.history] == [0, 1, 2, 3, 4]
    assert all(np.isfinite(loss) for _, loss in guidance.history)
    assert torch.equal(sample(pipe), unguided)  # removed


def test_guided_pipeline_runs_end_to_end(pipe, predictor):
    unguided = sample(pipe)
    with enable_motion_guidance(pipe, predictor, scale=15.0, rho=0.4) as guidance:
        guided = sample(pipe)
        video = sample(pipe, output_type="np")
        assert guidance.prompt_mask.sum().item() == len(pipe.tokenizer(PROMPT).input_ids)  # real tokens only
        prompt_embeds, negative_embeds = pipe.encode_prompt(PROMPT, "", device="cpu")
        from_embeds = sample(pipe, prompt=None, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds)
        assert guidance.prompt_mask is None and torch.equal(guidance.prompt_embeds, prompt_embeds)
    assert [index for index, _ in guidance.history] == [3, 4] * 3
    assert torch.isfinite(guided).all() and not torch.equal(guided, unguided)
    assert torch.isfinite(from_embeds).all() and not torch.equal(from_embeds, unguided)
    assert video.shape == (1, 9, 64, 64, 3) and np.isfinite(video).all()


def run_cli(module, *args):
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=repo, check=True, timeout=600,
                   env={**os.environ, "PYTHONPATH": str(repo)}, stdout=subprocess.DEVNULL)


@pytest.mark.slow
def test_tsa_train_lamo_resumes_exactly_and_tsa_sample_guides_with_its_predictor(tmp_path):
    out, resumed = tmp_path / "run", tmp_path / "resumed"
    train_args = ["--preset", "tiny", "--align", "lamo", "--max-steps", 3, "--checkpointing-steps", 2,
                  "--num-videos", 2, "--no-progress"]
    run_cli("tsa.cli.train", *train_args, "--output-dir", out)
    history = json.loads((out / "losses.json").read_text())
    assert [row["step"] for row in history] == [1, 2, 3]
    for row in history:
        assert row["drift"] > 0 and row["predictor"] > 0
        assert row["loss"] == pytest.approx(row["diffusion"] + 0.4 * row["drift"], rel=1e-5)
    predictor = MotionPredictor.from_pretrained(out / "motion_predictor")
    assert (predictor.config.in_channels, predictor.config.text_dim) == (TINY_LATENT_CHANNELS, TINY_TEXT_DIM)
    assert predictor.head.weight.abs().sum() > 0  # trained away from the zero initialisation

    # killed after the step-2 checkpoint: resuming gives the same losses and the same predictor
    final_outputs = {"losses.json", "motion_predictor", "transformer", "checkpoint-3"}
    shutil.copytree(out, resumed, ignore=lambda folder, names: final_outputs & set(names) if folder in (
        str(out), str(out / "checkpoints")) else ())
    run_cli("tsa.cli.train", *train_args, "--output-dir", resumed, "--resume", "latest")
    assert json.loads((resumed / "losses.json").read_text()) == history
    again = MotionPredictor.from_pretrained(resumed / "motion_predictor")
    for name, tensor in predictor.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name

    run_cli("tsa.cli.sample", out, "--prompt", PROMPT, "--num-inference-steps", 3, "--motion-guidance", 15,
            "--predictor", out / "motion_predictor", "--output-dir", tmp_path / "samples")
    (video,) = (tmp_path / "samples").glob("*.mp4")
    with av.open(str(video)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 9
