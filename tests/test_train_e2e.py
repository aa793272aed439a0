"""tsa-train / tsa-cache / tsa-sample end to end on the tiny preset of every registered model family (CPU):
decode, cache, train, checkpoint, resume, plot, sample, LoRA in the pipeline's own loader, two experts."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tsa_helpers import QUIET, assets, reset_accelerate, train_cli

from tsa.cli.cache import main as cache_main
from tsa.models import DEFAULT_FAMILY, FAMILIES, get_family
from tsa.training.data import UndecodableVideoWarning, load_video_captions, read_video

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator (accelerate keeps process-wide singletons)."""
    yield
    reset_accelerate()


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


@pytest.fixture
def tiny_run(tiny_runs, family):
    return tiny_runs(family)


@pytest.fixture
def default_run(tiny_runs):
    """The default family's tiny run, for the tests of family-independent machinery."""
    return tiny_runs(DEFAULT_FAMILY)


def test_tiny_preset_end_to_end(tiny_run, family, capsys):
    output, history = tiny_run
    assert [row["step"] for row in history] == [1, 2, 3, 4]
    for row in history:
        assert all(np.isfinite(row[name]) for name in ("loss", "diffusion", "align"))
        assert row["align"] > 0 and row["diffusion"] > 0
        assert row["loss"] == pytest.approx(row["diffusion"] + 0.5 * row["align"], rel=1e-5)
    assert len(load_video_captions(output / "tiny" / "data")) == 6
    assert [p.name for p in (output / "checkpoints").iterdir()] == ["checkpoint-4"]  # total limit 1
    assert json.loads((output / "losses.json").read_text()) == history
    assert (output / "loss_curve.png").stat().st_size > 10_000
    assert list((output / "logs").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    # The final diffusers-format weights are the trained ones (the last checkpoint's).
    from safetensors.torch import load_file

    trained = load_file(output / "checkpoints" / "checkpoint-4" / "model.safetensors")
    for folder, prefix in (("transformer", "transformer."), ("projector", "projector.")):
        (weights,) = (output / folder).glob("*.safetensors")
        saved = load_file(weights)
        assert {prefix + key for key in saved} == {key for key in trained if key.startswith(prefix)}
        for key, value in saved.items():
            torch.testing.assert_close(value, trained[prefix + key], rtol=0, atol=0)
    args = json.loads((output / "training_args.json").read_text())
    assert args["align"] == "mtsa" and args["finetune"] == "full"
    assert args["model_family"] == family and args["expert"] == "transformer" and args["align_layer"] == 2
    assert args["model_path"] == str(output.resolve() / "tiny" / family)
    model_index = json.loads((output / "tiny" / family / "model_index.json").read_text())
    assert model_index["_class_name"] in get_family(family).pipeline_class_names
    assert args["output_dir"] == str(output.resolve())

    # tsa-cache on the same options: every entry is reused.
    cache_main(["--output-dir", str(output), "--model-family", family, "--num-videos", "6"])
    assert "6 of 6 videos cached (process 0 encoded 0, reused 6)" in capsys.readouterr().out

    # tsa-sample writes an mp4 with the trained transformer.
    from tsa.cli.sample import main as sample_main

    sample_main([str(output), "--prompt", "a red ball falls and bounces on the floor",
                 "--num-inference-steps", "2", "--output-dir", str(output / "samples")])
    (video,) = (output / "samples").glob("*.mp4")
    frames = read_video(video, args["num_frames"], args["height"], args["width"])
    assert frames.shape == (args["num_frames"], 3, args["height"], args["width"])


def test_tsa_sample_motion_guidance_needs_a_predictor_and_takes_rho_and_lag(tiny_run, tmp_path, capsys, monkeypatch):
    import tsa.lamo
    from tsa.cli.sample import main as sample_main
    from tsa.models.tiny import TINY_LATENT_CHANNELS, TINY_TEXT_DIM

    run = tiny_run[0]
    argv = [str(run), "--prompt", "a ball rolls", "--num-inference-steps", "2", "--output-dir", str(tmp_path),
            "--motion-guidance", "15"]
    with pytest.raises(SystemExit):
        sample_main(argv)  # the M-TSA run trained no motion predictor
    assert "train with --align lamo or --motion-drift-weight > 0, or pass --predictor" in capsys.readouterr().err
    predictor = tmp_path / "predictor"
    tsa.lamo.MotionPredictor(in_channels=TINY_LATENT_CHANNELS, text_dim=TINY_TEXT_DIM, channels=8,
                             num_blocks=1).save_pretrained(predictor)
    handles, enable = [], tsa.lamo.enable_motion_guidance
    monkeypatch.setattr(tsa.lamo, "enable_motion_guidance", lambda *a, **k: handles.append(enable(*a, **k)))
    sample_main([*argv, "--predictor", str(predictor), "--motion-guidance-rho", "0.5", "--motion-guidance-lag", "2"])
    (guidance,) = handles
    assert (guidance.scale, guidance.rho, guidance.lag) == (15.0, 0.5, 2)
    assert [index for index, _ in guidance.history] == [1]  # the last half of the 2 steps
    assert len(list(tmp_path.glob("*.mp4"))) == 1


def test_lora_weights_load_into_the_pipeline_and_corrupt_videos_are_skipped(tiny_run, family, tmp_path):
    run = tiny_run[0]
    model = run / "tiny" / family
    listing = tmp_path / "train.csv"
    videos = load_video_captions(run / "tiny" / "data")
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00\x01 not a video" * 64)
    rows = [f"{sample.video},{sample.caption}" for sample in videos] + ["corrupt.mp4,a corrupt clip"]
    listing.write_text("video,caption\n" + "\n".join(rows) + "\n")
    output = tmp_path / "lora"
    argv = ["--output-dir", output, *assets(run, family), "--data", listing, "--finetune", "lora",
            "--lora-rank", "4", "--lora-alpha", "8", "--max-steps", "2", "--checkpointing-steps", "2",
            "--lr-warmup-steps", "0", *QUIET]
    with pytest.warns(UndecodableVideoWarning, match="corrupt.mp4"):
        train_cli(argv)
    assert (output / "pytorch_lora_weights.safetensors").is_file()
    assert not (output / "transformer").exists()

    from peft import LoraConfig
    from safetensors.torch import load_file

    from tsa.sampling import load_pipeline

    family_object = get_family(family)
    pipe = load_pipeline(output, model, torch.float32)
    plain = family_object.pipeline_class().from_pretrained(model)
    plain.load_lora_weights(output)  # the diffusers loader alone
    # The same adapters rebuilt from the training checkpoint's trainable state.
    reference, base = (family_object.load_transformer(model) for _ in range(2))
    reference.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=list(family_object.default_lora_target_modules)))
    state = load_file(output / "checkpoints" / "checkpoint-2" / "model.safetensors")
    lora_state = {key.removeprefix("transformer."): value for key, value in state.items() if "lora_" in key}
    assert lora_state and any(value.abs().sum() > 0 for key, value in lora_state.items() if "lora_B" in key)
    assert not reference.load_state_dict(lora_state, strict=False).unexpected_keys

    scheduler = family_object.load_scheduler(model)
    latents = torch.randn(family_object.latent_shape(model, 9, 96, 144), generator=torch.Generator().manual_seed(0))
    prompt = torch.randn(1, family_object.max_sequence_length(model), family_object.text_dim(base.config))

    def x0(transformer):
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            out = family_object.denoise_and_loss(transformer, scheduler, latents, prompt, generator=generator)
        return out["x0_pred"]

    loaded, from_diffusers, expected, untrained = (x0(model) for model in
                                                   (pipe.transformer, plain.transformer, reference, base))
    torch.testing.assert_close(loaded, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(from_diffusers, expected, rtol=1e-5, atol=1e-6)
    assert (loaded - untrained).abs().max() > 1e-6


def test_resume_loads_ddp_prefixed_checkpoints_and_rejects_mismatched_ones(default_run, tmp_path):
    from safetensors.torch import load_file, save_file

    run = default_run[0]
    checkpoint = tmp_path / "checkpoints" / "checkpoint-4"
    shutil.copytree(run / "checkpoints" / "checkpoint-4", checkpoint)
    trained = load_file(checkpoint / "model.safetensors")
    save_file({"module." + key: value for key, value in trained.items()}, checkpoint / "model.safetensors")
    common = [*assets(run, DEFAULT_FAMILY), "--max-steps", "4", "--resume", str(checkpoint), *QUIET]
    # A DDP checkpoint resumed in one process: every trainable tensor is loaded (the run ends at once).
    train_cli(["--output-dir", str(tmp_path / "ddp"), *common])
    (weights,) = (tmp_path / "ddp" / "projector").glob("*.safetensors")
    for key, value in load_file(weights).items():
        torch.testing.assert_close(value, trained["projector." + key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="lacks .* trainable tensors, e.g. transformer.*lora_A"):
        train_cli(["--output-dir", str(tmp_path / "lora"), *common, "--finetune", "lora"])


def test_killed_and_resumed_run_matches_an_uninterrupted_one(default_run, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # bitwise-repeatable kernels, also on a GPU machine
    run = default_run[0]
    common = [*assets(run, DEFAULT_FAMILY), "--max-steps", "5", "--checkpointing-steps", "2", "--train-batch-size", "1",
              "--gradient-accumulation-steps", "2", "--motion-drift-weight", "0.4", "--lr-scheduler", "cosine",
              "--lr-warmup-steps", "2", *QUIET]
    straight = train_cli(["--output-dir", str(tmp_path / "straight"), *common])

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "tsa.cli.train", "--output-dir", str(killed), *common],
                               cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / "checkpoint-2").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "the run never reached its first checkpoint"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "losses.json").exists()

    resumed = train_cli(["--output-dir", str(killed), *common, "--resume", "latest"])
    assert [row["step"] for row in resumed] == [1, 2, 3, 4, 5]
    for name in ("loss", "diffusion", "align", "drift", "predictor", "lr"):
        np.testing.assert_allclose([row[name] for row in resumed], [row[name] for row in straight],
                                   rtol=1e-5, atol=1e-7, err_msg=name)
    assert resumed[-1]["drift"] > 0 and resumed[-1]["predictor"] > 0


def test_accelerate_launch_two_processes(default_run, tmp_path):
    run = default_run[0]
    output = tmp_path / "ddp"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "tsa.cli.train",
               "--output-dir", str(output), *assets(run, DEFAULT_FAMILY, cache=False), "--max-steps", "2",
               "--checkpointing-steps", "2", "--align", "lamo", *QUIET]
    env = {**os.environ, "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    # The cache was filled in two shards, one per process.
    assert "6 of 6 videos cached (process 0 encoded 3, reused 0)" in result.stdout
    checkpoint = output / "checkpoints" / "checkpoint-2"
    assert {p.name for p in checkpoint.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    history = json.loads((output / "losses.json").read_text())
    assert [row["step"] for row in history] == [1, 2]
    assert all(row["align"] == 0 and row["drift"] > 0 and np.isfinite(row["loss"]) for row in history)
    assert (output / "motion_predictor" / "config.json").is_file()


def _one_line_exit(capsys, code):
    """The one error line of a run that stopped with exit status 1 (progress bars aside), no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("tsa-train: error:")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_resume_from_a_nan_checkpoint_is_refused_naming_the_file(default_run, tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file, save_file

    from tsa.cli.train import main

    run = default_run[0]
    checkpoint = tmp_path / "checkpoints" / "checkpoint-4"
    shutil.copytree(run / "checkpoints" / "checkpoint-4", checkpoint)
    weights = load_file(checkpoint / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, checkpoint / "model.safetensors")
    monkeypatch.setattr("tsa.training.loop.prepare_training",
                        lambda *a: pytest.fail("models built for a bad checkpoint"))
    with pytest.raises(SystemExit) as exit_info:
        main([*assets(run, DEFAULT_FAMILY), "--output-dir", str(tmp_path), "--max-steps", "6", "--resume", "latest",
              *QUIET])
    line = _one_line_exit(capsys, exit_info.value.code)
    assert str(checkpoint / "model.safetensors") in line and "non-finite" in line and name in line
    assert not (tmp_path / "transformer").exists() and not (tmp_path / "projector").exists()
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-4"]


def test_a_non_finite_loss_stops_the_run_naming_the_step(default_run, tmp_path, capsys, monkeypatch):
    import tsa.cli.train
    import tsa.training.loop
    from tsa.training.checkpoints import verify_checkpoint

    compute_losses, calls = tsa.training.loop.compute_losses, []

    def nan_at_second_step(*args):
        loss, losses = compute_losses(*args)
        calls.append(1)
        return (loss * float("nan"), {**losses, "loss": float("nan")}) if len(calls) == 2 else (loss, losses)

    monkeypatch.setattr(tsa.training.loop, "compute_losses", nan_at_second_step)
    output = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        tsa.cli.train.main([*assets(default_run[0], DEFAULT_FAMILY), "--output-dir", str(output), "--max-steps", "3",
                            "--checkpointing-steps", "1", *QUIET])
    line = _one_line_exit(capsys, exit_info.value.code)
    assert line.startswith("tsa-train: error: step 2:") and "gradient norm is nan" in line, line
    assert sorted(path.name for path in (output / "checkpoints").iterdir()) == ["checkpoint-1"]
    verify_checkpoint(output / "checkpoints" / "checkpoint-1")
    assert not (output / "transformer").exists() and not (output / "losses.json").exists()


@pytest.mark.parametrize("other_family", [name for name in FAMILIES if name != DEFAULT_FAMILY])
def test_resume_matches_an_uninterrupted_run(tiny_runs, other_family, tmp_path, monkeypatch):
    """In process, with the LaMo drift loss: the state a run left at step 2, resumed in a fresh output dir (the
    default family's resume is the killed-and-resumed test's)."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    family = other_family
    run = tiny_runs(family)[0]
    common = [*assets(run, family), "--train-batch-size", "1", "--checkpointing-steps", "2", "--motion-drift-weight",
              "0.4", "--lr-scheduler", "cosine", "--lr-warmup-steps", "1", "--max-steps", "3", *QUIET]
    straight = train_cli([*common, "--output-dir", tmp_path / "straight"])
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "checkpoint-2",
                    tmp_path / "resumed" / "checkpoints" / "checkpoint-2")
    resumed = train_cli([*common, "--output-dir", tmp_path / "resumed", "--resume", "latest"])
    assert [row["step"] for row in resumed] == [1, 2, 3]
    for name in ("loss", "diffusion", "align", "drift", "predictor", "lr"):
        np.testing.assert_allclose([row[name] for row in resumed], [row[name] for row in straight],
                                   rtol=1e-5, atol=1e-7, err_msg=name)
    assert resumed[-1]["drift"] > 0 and resumed[-1]["predictor"] > 0


def test_wan22_a14b_trains_the_chosen_expert_on_its_timesteps(tiny_runs, tmp_path, monkeypatch):
    """A two-expert pipeline (Wan2.2 A14B): --expert transformer_2 trains the low-noise expert on t < 875 and
    loads into it; the default expert trains on t >= 875."""
    from tsa.models.wan import WanFamily
    from tsa.sampling import load_pipeline
    from tsa.tiny import save_tiny_pipeline

    run = tiny_runs("wan")[0]
    model = save_tiny_pipeline(tmp_path / "a14b", family="wan", two_experts=True)
    listing = tmp_path / "two.csv"
    listing.write_text("video,caption\n" + "".join(
        f"{run / 'tiny' / 'data' / line.strip()},a clip\n"
        for line in (run / "tiny" / "data" / "videos.txt").read_text().splitlines()[:2]))
    seen, denoise = [], WanFamily.denoise_and_loss

    def recording(self, *args, **kwargs):
        out = denoise(self, *args, **kwargs)
        seen.append(out["timesteps"])
        return out

    monkeypatch.setattr(WanFamily, "denoise_and_loss", recording)
    common = ["--preset", "tiny", "--model-path", model, "--teacher-path", run / "tiny" / "videomae", "--data",
              listing, "--cache-dir", tmp_path / "cache", "--max-steps", "2", *QUIET]
    output = tmp_path / "low-noise"
    train_cli([*common, "--output-dir", output, "--expert", "transformer_2", "--finetune", "lora", "--lora-rank", "4",
               "--lora-alpha", "4"])
    assert seen and all(float(t.max()) < 875 for t in seen)
    pipe = load_pipeline(output, model, torch.float32, expert="transformer_2")
    assert type(pipe).__name__ == "WanPipeline" and pipe.config.boundary_ratio == 0.875
    assert getattr(pipe.transformer_2, "peft_config", None) and not getattr(pipe.transformer, "peft_config", None)
    seen.clear()
    train_cli([*common, "--output-dir", tmp_path / "high-noise", "--align", "none"])
    assert seen and all(float(t.min()) >= 875 for t in seen)
    assert (tmp_path / "high-noise" / "transformer" / "config.json").is_file()
