"""tsa-train options: defaults < preset < YAML < command line, and clear errors for bad values."""

import re
from pathlib import Path

import pytest

from tsa.cli.options import PRESETS, parse_config

REAL = ["--model-path", "cogvideox", "--data", "videos", "--teacher-path", "videomae"]


@pytest.fixture(autouse=True)
def in_a_folder_with_the_paths(tmp_path, monkeypatch):
    """The paths the options name exist (tsa-train checks that first), empty: parsing reads no model."""
    monkeypatch.chdir(tmp_path)
    for name in ("cogvideox", "videos", "videomae", "m", "d"):
        (tmp_path / name).mkdir()


def write_yaml(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_tiny_is_the_default_preset():
    args = parse_config([])
    assert args.preset == "tiny"
    assert (args.height, args.width, args.num_frames) == (PRESETS["tiny"]["height"], PRESETS["tiny"]["width"], 9)
    assert args.align == "mtsa" and args.motion_drift_weight == 0.0
    assert args.cache_dir == args.output_dir / "cache"
    assert args.lora_target_modules == ["to_q", "to_k", "to_v", "to_out.0"]


def test_a_real_run_without_preset_gets_the_spec_defaults(tmp_path):
    args = parse_config(REAL)
    assert args.preset is None
    assert (args.height, args.width, args.num_frames, args.align_layer) == (480, 720, 49, 18)
    assert (args.learning_rate, args.projector_hidden_dim, args.max_steps) == (2e-6, 2048, 4000)
    from_yaml = parse_config(["--config", write_yaml(tmp_path, "model_path: cogvideox\ndata: videos\n"),
                            "--teacher-path", "videomae"])
    assert from_yaml.preset is None and from_yaml.num_frames == 49
    assert parse_config(["--preset", "tiny", *REAL]).num_frames == PRESETS["tiny"]["num_frames"]


def test_yaml_overrides_the_preset_and_the_command_line_overrides_yaml(tmp_path):
    config = write_yaml(tmp_path, "align: trd\nlearning-rate: 0.01\nlora_target_modules: [to_q, to_k]\n"
                                  "gradient_checkpointing: true\nheight: 64\n")
    args = parse_config(["--config", config])
    assert (args.align, args.learning_rate, args.height) == ("trd", 0.01, 64)
    assert args.lora_target_modules == ["to_q", "to_k"] and args.gradient_checkpointing is True
    assert args.width == PRESETS["tiny"]["width"]
    args = parse_config(["--config", config, "--align", "tsa", "--learning-rate", "3e-4",
                         "--no-gradient-checkpointing"])
    assert (args.align, args.learning_rate, args.gradient_checkpointing, args.height) == ("tsa", 3e-4, False, 64)


def test_preset_from_yaml_and_from_the_command_line(tmp_path):
    config = write_yaml(tmp_path, "preset: cogvideox-2b-mtsa\nmodel_path: cogvideox\ndata: videos\n"
                                  "teacher_path: videomae\nmax_steps: 10\n")
    args = parse_config(["--config", config])
    assert args.preset == "cogvideox-2b-mtsa"
    assert (args.learning_rate, args.align_layer, args.align_weight, args.tau, args.top_k) == (2e-6, 18, 0.5, 0.1, 0.2)
    assert (args.finetune, args.height, args.width, args.num_frames, args.max_steps) == ("full", 480, 720, 49, 10)
    assert parse_config(["--config", config, "--preset", "tiny"]).height == PRESETS["tiny"]["height"]
    lora = parse_config(["--preset", "cogvideox-5b-lora", *REAL])
    assert (lora.finetune, lora.lora_rank, lora.lora_alpha, lora.mixed_precision) == ("lora", 128, 64, "bf16")


def test_short_clips_are_fine_without_alignment_or_drift():
    assert parse_config(["--num-frames", "5", "--align", "none"]).num_frames == 5


def test_lamo_drift_weight_defaults():
    assert parse_config(["--align", "lamo"]).motion_drift_weight == 0.4
    assert parse_config(["--align", "mtsa", "--motion-drift-weight", "0.2"]).motion_drift_weight == 0.2
    assert parse_config(["--align", "lamo", "--motion-drift-weight", "0"]).motion_drift_weight == 0.0


@pytest.mark.parametrize("argv, message", [
    (["--num-frames", "48"], "4k\\+1"),
    (["--height", "100"], "multiples of 16"),
    (["--top-k", "0"], "--top-k"),
    (["--align", "mtsa", "--motion-drift-weight", "-1"], "--motion-drift-weight"),
    (["--preset", "cogvideox-2b-mtsa"], "--model-path is required"),
    (["--preset", "cogvideox-2b-mtsa", "--model-path", "m", "--data", "d"], "--teacher-path is required"),
    (["--model-path", "m"], "--data is required without --preset tiny"),
    (["--model-path", "m", "--data", "d"], "--teacher-path is required"),
    (["--num-frames", "5"], "--num-frames must be >= 9 with --align mtsa"),
    (["--num-frames", "5", "--align", "none", "--motion-drift-weight", "0.1"], "--num-frames must be >= 9"),
    (["--checkpoints-total-limit", "0"], "--checkpoints-total-limit must be >= 1"),
    (["--lr-warmup-steps", "-1"], "--lr-warmup-steps must be >= 0"),
    (["--dataloader-num-workers", "-2"], "--dataloader-num-workers must be >= 0"),
    (["--align", "bogus"], "invalid choice"),
])
def test_bad_options_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_config(argv)
    assert re.search(message, capsys.readouterr().err)


def test_bad_yaml_is_named(tmp_path, capsys):
    for text, message in (("learning_rat: 0.1\n", "unknown option 'learning_rat'"),
                          ("align: bogus\n", "align must be one of"), ("top_k: [1\n", "is not valid YAML")):
        with pytest.raises(SystemExit):
            parse_config(["--config", write_yaml(tmp_path, text)])
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit):
        parse_config(["--config", str(tmp_path / "missing.yaml")])
    assert "no such YAML" in capsys.readouterr().err


def test_train_config_in_python_equals_the_command_line():
    """A TrainConfig built in Python resolves to what tsa-train's options give: the parser's defaults are
    TrainConfig's, presets and the derived fields are resolved in one place."""
    from tsa.training import TrainConfig, resolve_config

    argv = ["--preset", "tiny", "--output-dir", "runs/x", "--align", "trd", "--trd-margin", "0.2"]
    from_python = resolve_config(TrainConfig.from_preset("tiny", output_dir="runs/x", align="trd", trd_margin=0.2))
    assert from_python == parse_config(argv)
    assert from_python.output_dir == Path("runs/x") and from_python.cache_dir == Path("runs/x/cache")
    assert resolve_config(from_python) == from_python  # resolving twice changes nothing
    assert resolve_config(TrainConfig(preset="tiny")).model_family == "cogvideox"


def test_train_config_refuses_unknown_options_and_mismatches():
    from tsa.errors import UsageError
    from tsa.training import TrainConfig, resolve_config

    with pytest.raises(UsageError, match="unknown training option"):
        TrainConfig.from_dict({"learning_rat": 1e-4})
    with pytest.raises(UsageError, match="--top-k must be a finite number > 0 and <= 1, got 2.0"):
        resolve_config(TrainConfig.from_preset("tiny", top_k=2.0))
    with pytest.raises(UsageError, match="--model-path is required without --preset tiny"):
        resolve_config(TrainConfig())
