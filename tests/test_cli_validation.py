"""tsa-train, tsa-cache and tsa-sample refuse a mistake before building anything: one line naming the option."""

import json

import pytest
import torch

import tsa.cli.cache
import tsa.cli.sample
import tsa.cli.train
import tsa.sampling
from tsa.cli.options import PRESETS, parse_config
from tsa.errors import CheckpointError
from tsa.training.checkpoints import verify_checkpoint


@pytest.fixture
def folders(tmp_path):
    """A diffusers CogVideoX pipeline folder, a transformers VideoMAE folder and a two-video dataset, without
    weights (validation reads only listings and configs)."""
    model = tmp_path / "cogvideox"
    index = {
        "_class_name": "CogVideoXPipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "CogVideoXDPMScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "X"],
        "vae": ["diffusers", "AutoencoderKLCogVideoX"],
    }
    for name in ("scheduler", "text_encoder", "tokenizer", "transformer", "vae"):
        (model / name).mkdir(parents=True)
    (model / "model_index.json").write_text(json.dumps(index))
    teacher = tmp_path / "videomae"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps({"model_type": "videomae"}))
    data = tmp_path / "data"
    (data / "clips").mkdir(parents=True)
    for name in ("a.mp4", "b.mp4"):
        (data / "clips" / name).write_bytes(b"\0")
    (data / "videos.txt").write_text("clips/a.mp4\nclips/b.mp4\n")
    (data / "prompts.txt").write_text("a ball\na cube\n")
    return {"model": model, "teacher": teacher, "data": data, "root": tmp_path}


@pytest.fixture
def nothing_is_built(monkeypatch):
    """Fail the test if a CLI gets as far as building models, a cache or a pipeline."""

    def refuse(*args, **kwargs):
        raise AssertionError("the CLI went on to build something")

    monkeypatch.setattr(tsa.cli.train, "train", refuse)
    monkeypatch.setattr(tsa.cli.cache, "precompute_cache", refuse)
    monkeypatch.setattr(tsa.sampling, "load_pipeline", refuse)
    monkeypatch.setattr("tsa.training.data.prepare_tiny_assets", refuse)


def _refused(main, argv, capsys, option, code=2):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == code
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert option in err, err
    return err


def _real(folders, output):
    return [
        "--model-path",
        str(folders["model"]),
        "--teacher-path",
        str(folders["teacher"]),
        "--data",
        str(folders["data"]),
        "--output-dir",
        str(output),
    ]


@pytest.mark.parametrize(
    "option, value",
    [
        ("--learning-rate", "-1e-4"),
        ("--learning-rate", "0"),
        ("--learning-rate", "nan"),
        ("--predictor-learning-rate", "-1"),
        ("--align-weight", "-0.5"),
        ("--align-weight", "inf"),
        ("--tau", "0"),
        ("--top-k", "1.5"),
        ("--top-k", "0"),
        ("--train-batch-size", "0"),
        ("--max-steps", "-3"),
        ("--gradient-accumulation-steps", "0"),
        ("--adam-beta1", "1"),
        ("--adam-beta2", "-0.1"),
        ("--adam-epsilon", "0"),
        ("--adam-weight-decay", "-1"),
        ("--max-grad-norm", "-1"),
        ("--lora-alpha", "0"),
        ("--motion-drift-weight", "-1"),
        ("--seed", "-1"),
        ("--checkpointing-steps", "0"),
        ("--lr-scheduler", "warmup_cosine"),
        ("--tau-teacher", "0"),
        ("--tau-teacher", "inf"),
        ("--trd-margin", "-0.1"),
        ("--trd-margin", "nan"),
        ("--backend", "cuda"),
        ("--expert", "transformer_3"),
        ("--timestep-sampling", "gaussian"),
    ],
)
@pytest.mark.parametrize("main", [tsa.cli.train.main, tsa.cli.cache.main], ids=["tsa-train", "tsa-cache"])
def test_bad_numbers_are_refused_before_anything_is_built(main, option, value, folders, capsys, nothing_is_built):
    output = folders["root"] / "out"
    _refused(main, [*_real(folders, output), option, value], capsys, option)
    assert not output.exists()


@pytest.mark.parametrize(
    "case, option",
    [
        ("no data", "--data"),
        ("missing video", "missing"),
        ("no model", "--model-path"),
        ("not a pipeline", "model_index.json"),
        ("unsupported pipeline", "'StableDiffusionPipeline'"),
        ("missing component", "vae"),
        ("no teacher", "--teacher-path"),
        ("teacher not transformers", "config.json"),
        ("teacher of another kind", "'dinov2'"),
        ("resume nowhere", "--resume"),
        ("bad yaml", "--config"),
        ("output is a file", "--output-dir"),
    ],
)
def test_bad_paths_are_refused_before_anything_is_built(case, option, folders, capsys, nothing_is_built):
    root = folders["root"]
    output = root / "out"
    argv = _real(folders, output)
    if case == "no data":
        argv[5] = str(root / "nowhere")
    elif case == "missing video":
        (folders["data"] / "clips" / "b.mp4").unlink()
    elif case == "no model":
        argv[1] = str(root / "nowhere")
    elif case == "not a pipeline":
        (folders["model"] / "model_index.json").unlink()
        (folders["model"] / "config.json").write_text("{}")
    elif case == "unsupported pipeline":
        (folders["model"] / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    elif case == "missing component":
        (folders["model"] / "vae").rmdir()
    elif case == "no teacher":
        argv[3] = str(root / "nowhere")
    elif case == "teacher not transformers":
        (folders["teacher"] / "config.json").unlink()
    elif case == "teacher of another kind":
        (folders["teacher"] / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    elif case == "resume nowhere":
        argv += ["--resume", str(root / "checkpoint-7")]
    elif case == "bad yaml":
        (root / "run.yaml").write_text("learning_rate: [1, 2\n")
        argv += ["--config", str(root / "run.yaml")]
    elif case == "output is a file":
        output.write_text("")
    err = _refused(tsa.cli.train.main, argv, capsys, option)
    if case == "missing video":
        assert "1 of the 2 listed videos are missing" in err and "b.mp4" in err
    assert not output.exists() or case == "output is a file"


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--logit-std", "0", "--logit-std must be a finite number > 0, got 0.0"),
        ("--logit-mean", "inf", "--logit-mean must be a finite number, got inf"),
        ("--flow-shift", "-3", "--flow-shift must be a finite number > 0, got -3.0"),
        ("--tau-teacher", "nan", "--tau-teacher must be a finite number > 0, got nan"),
        ("--trd-margin", "-1", "--trd-margin must be a finite number >= 0, got -1.0"),
    ],
)
def test_registry_and_flow_options_get_the_range_checks(option, value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--preset", "tiny", "--model-family", "wan", option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err


def test_unsupported_pipelines_are_named_from_the_model_families(folders, capsys, nothing_is_built):
    from tsa.models import FAMILIES, family_class

    (folders["model"] / "model_index.json").write_text(json.dumps({"_class_name": "LTXPipeline"}))
    err = _refused(tsa.cli.train.main, _real(folders, folders["root"] / "out"), capsys, "--model-path")
    assert "'LTXPipeline'" in err
    for name in FAMILIES:
        assert all(pipeline in err for pipeline in family_class(name).pipeline_class_names), err


def test_valid_options_reach_training(folders, monkeypatch):
    reached = []
    monkeypatch.setattr(tsa.cli.train, "train", reached.append)
    tsa.cli.train.main(_real(folders, folders["root"] / "out"))
    assert len(reached) == 1 and reached[0].model_path == folders["model"]


def test_the_tiny_preset_applies_whenever_it_is_named(folders):
    for argv in (["--preset", "tiny"], ["--preset", "tiny", *_real(folders, folders["root"] / "o")], []):
        args = parse_config(argv)
        assert args.preset == "tiny"
        assert {key: getattr(args, key) for key in PRESETS["tiny"]} == PRESETS["tiny"]


@pytest.fixture
def run_dir(tmp_path, folders):
    run = tmp_path / "run"
    (run / "transformer").mkdir(parents=True)
    (run / "training_args.json").write_text(
        json.dumps({"model_path": str(folders["model"]), "height": 96, "width": 144, "num_frames": 9})
    )
    return run


@pytest.mark.parametrize(
    "extra, option",
    [
        (["--num-inference-steps", "0"], "--num-inference-steps"),
        (["--guidance-scale", "-1"], "--guidance-scale"),
        (["--motion-guidance-rho", "1.5"], "--motion-guidance-rho"),
        (["--motion-guidance-lag", "0"], "--motion-guidance-lag"),
        (["--motion-guidance", "-15"], "--motion-guidance"),
        (["--fps", "0"], "--fps"),
        (["--height", "100"], "--height"),
        (["--num-frames", "10"], "--num-frames"),
        (["--prompts-file", "nowhere.txt"], "--prompts-file"),
        (["--device", "tpu:x"], "--device"),
        (["--model-path", "nowhere"], "--model-path"),
        (["--motion-guidance", "15"], "--motion-guidance"),
    ],
)
def test_sample_mistakes_are_refused_before_the_pipeline_loads(extra, option, run_dir, capsys, nothing_is_built):
    _refused(tsa.cli.sample.main, [str(run_dir), "--prompt", "a ball", *extra], capsys, option)
    assert not (run_dir / "samples").exists()


def test_sample_needs_a_finished_run(run_dir, capsys, nothing_is_built):
    (run_dir / "transformer").rmdir()
    _refused(tsa.cli.sample.main, [str(run_dir), "--prompt", "a ball"], capsys, "pytorch_lora_weights.safetensors")
    _refused(tsa.cli.sample.main, [str(run_dir / "nowhere"), "--prompt", "a ball"], capsys, "RUN_DIR")


def test_verify_checkpoint_names_the_bad_file_and_tensor(tmp_path):
    from safetensors.torch import save_file

    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    save_file({"w": torch.ones(3)}, checkpoint / "model.safetensors")
    torch.save(
        {
            "state": {0: {"exp_avg": torch.zeros(3), "step": torch.tensor(2.0)}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.99)}],
        },
        checkpoint / "optimizer.bin",
    )
    verify_checkpoint(checkpoint)
    torch.save({"state": {0: {"exp_avg": torch.tensor([0.0, float("nan")])}}}, checkpoint / "optimizer.bin")
    with pytest.raises(CheckpointError, match=r"optimizer\.bin holds non-finite values .* state\.0\.exp_avg"):
        verify_checkpoint(checkpoint)
    (checkpoint / "optimizer.bin").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"optimizer\.bin does not load"):
        verify_checkpoint(checkpoint)
    (checkpoint / "optimizer.bin").unlink()
    save_file({"w": torch.tensor([1.0, float("inf")])}, checkpoint / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors holds non-finite values .* in w"):
        verify_checkpoint(checkpoint)
