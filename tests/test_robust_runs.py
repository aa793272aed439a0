"""Runs that survive a working day: SIGINT / SIGTERM save the step they stop at and resume to the same losses (one
process and two under accelerate), no command overwrites a run or a file unasked, bad data ends in one line, and
every command's exit status on success, a usage mistake and a failure."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from tsa_helpers import QUIET, assets, reset_accelerate, train_cli

import tsa.cli.cache
import tsa.cli.convert_videomae
import tsa.cli.sample
import tsa.cli.train
import tsa.cli.viz
import tsa.sampling
from tsa.models import DEFAULT_FAMILY
from tsa.outputs import clear_run, refuse_existing_run
from tsa.training.checkpoints import verify_checkpoint
from tsa.training.data import UndecodableVideoWarning

REPO = Path(__file__).resolve().parents[1]
LOSS_COLUMNS = ("loss", "diffusion", "align", "drift", "predictor", "lr")
# 6 clips, 2 per micro-batch: 3 optimizer steps per epoch. The signal lands in step 3, between checkpoints 2 and 4.
RUN = ["--max-steps", "4", "--checkpointing-steps", "2", "--lr-scheduler", "cosine", "--lr-warmup-steps", "1",
       *QUIET]

# Runs tsa-train with a signal sent to itself while the forward pass of micro-batch AT runs (in the middle of an
# optimizer step), on the process of rank RANK only.
SIGNALLING_RUN = textwrap.dedent("""
    import os, sys
    import tsa.training.loop as loop
    number, at, rank = (int(value) for value in sys.argv[1:4])
    compute, calls = loop.compute_losses, []
    def compute_and_signal(*args):
        calls.append(1)
        if len(calls) == at and int(os.environ.get("RANK", "0")) == rank:
            os.kill(os.getpid(), number)
        return compute(*args)
    loop.compute_losses = compute_and_signal
    from tsa.cli.train import main
    main(sys.argv[4:])
""")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    reset_accelerate()


@pytest.fixture
def default_run(tiny_runs):
    return tiny_runs(DEFAULT_FAMILY)


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}


def _hashes(folder):
    return {path.relative_to(folder): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(Path(folder).rglob("*")) if path.is_file()}


def _lines(text, start):
    return [line for line in text.splitlines() if line.startswith(start)]


def _assert_same_losses(resumed, straight):
    assert [row["step"] for row in resumed] == [row["step"] for row in straight] == [1, 2, 3, 4]
    for name in LOSS_COLUMNS:
        np.testing.assert_allclose([row[name] for row in resumed], [row[name] for row in straight],
                                   rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.fixture(scope="module")
def straight_run(tiny_runs, tmp_path_factory):
    """The uninterrupted run the interrupted ones must match (one process)."""
    run = tiny_runs(DEFAULT_FAMILY)[0]
    os.environ["ACCELERATE_USE_CPU"] = "true"
    try:
        return train_cli(["--output-dir", tmp_path_factory.mktemp("straight"), *assets(run, DEFAULT_FAMILY), *RUN])
    finally:
        os.environ.pop("ACCELERATE_USE_CPU")


@pytest.mark.slow
@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_the_step_it_stops_at_and_the_resumed_run_matches(number, default_run, straight_run,
                                                                         tmp_path, monkeypatch, capsys):
    common = [*assets(default_run[0], DEFAULT_FAMILY), *RUN]
    output = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", SIGNALLING_RUN, str(int(number)), "3", "0", "--output-dir",
                             str(output), *common], cwd=REPO, env=_env(), capture_output=True, text=True,
                            timeout=400)
    assert result.returncode == 128 + number, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = _lines(result.stderr, "tsa-train: stopped")
    checkpoint = output / "checkpoints" / "checkpoint-3"
    assert line == (f"tsa-train: stopped by {number.name} after step 3 of 4; checkpoint saved in {checkpoint}; "
                    "continue with the same command and --resume latest")
    assert sorted(path.name for path in (output / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    verify_checkpoint(checkpoint)
    assert not (output / "transformer").exists() and not (output / "losses.json").exists()

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    resumed = train_cli(["--output-dir", output, *common, "--resume", "latest"])
    assert f"tsa-train: resuming from {checkpoint} at step 3 of 4" in capsys.readouterr().out
    _assert_same_losses(resumed, straight_run)


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step_when_one_gets_sigterm(default_run, tmp_path):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    common = [*assets(default_run[0], DEFAULT_FAMILY), *RUN]

    def run(output, *command):
        return subprocess.run([*launch, *command, "--output-dir", str(output), *common[:-1]], cwd=REPO, env=_env(),
                              capture_output=True, text=True, timeout=500)

    straight = run(tmp_path / "straight", "-m", "tsa.cli.train")
    assert straight.returncode == 0, straight.stderr[-3000:]
    output = tmp_path / "run"
    script = tmp_path / "signalling_run.py"
    script.write_text(SIGNALLING_RUN)
    # Only the process of rank 1 gets the signal, in step 3: both must stop after step 3 and checkpoint it.
    stopped = run(output, str(script), str(int(signal.SIGTERM)), "3", "1")
    assert stopped.returncode != 0
    checkpoint = output / "checkpoints" / "checkpoint-3"
    (line,) = _lines(stopped.stderr, "tsa-train: stopped")
    assert line.startswith(f"tsa-train: stopped by SIGTERM after step 3 of 4; checkpoint saved in {checkpoint}")
    assert "TrainingInterrupted" not in stopped.stderr and "KeyboardInterrupt" not in stopped.stderr
    assert {path.name for path in checkpoint.glob("random_states_*.pkl")} == {"random_states_0.pkl",
                                                                                "random_states_1.pkl"}
    resumed = run(output, "-m", "tsa.cli.train", "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"tsa-train: resuming from {checkpoint} at step 3 of 4" in resumed.stdout
    _assert_same_losses(json.loads((output / "losses.json").read_text()),
                        json.loads((tmp_path / "straight" / "losses.json").read_text()))


def _one_line(capsys, exit_info, code):
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_second_run_into_a_used_folder_is_refused_and_changes_nothing(default_run, capsys, monkeypatch):
    run = default_run[0]
    before = _hashes(run)
    monkeypatch.setattr("tsa.training.data.prepare_tiny_assets", lambda *a: pytest.fail("assets built"))
    monkeypatch.setattr(tsa.cli.train, "train", lambda *a: pytest.fail("a run started"))
    with pytest.raises(SystemExit) as exit_info:
        tsa.cli.train.main(["--output-dir", str(run), *QUIET])
    line = _one_line(capsys, exit_info, 2)
    assert f"--output-dir {run} already holds a run" in line and "--resume latest" in line and "--overwrite" in line
    assert _hashes(run) == before


def test_overwrite_clears_the_run_but_keeps_the_assets_and_cache(tmp_path):
    for name in ("checkpoints/checkpoint-2/model.safetensors", "transformer/config.json", "losses.json",
                 "logs/events", "pytorch_lora_weights.safetensors", "tiny/data/videos.txt", "cache/x/entry"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    with pytest.raises(ValueError, match="already holds a run"):
        refuse_existing_run(tmp_path)
    refuse_existing_run(tmp_path, resume="latest")
    clear_run(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache", "tiny"]
    refuse_existing_run(tmp_path)


def _corrupt_dataset(folder, good=None):
    (folder / "videos").mkdir(parents=True)
    broken = folder / "videos" / "broken.mp4"
    broken.write_bytes(b"not a video" * 50)
    videos, prompts = ["videos/broken.mp4"], ["a broken clip"]
    if good is not None:
        listed = (good / "videos.txt").read_text().split()
        videos += [str(good / name) for name in listed]
        prompts += (good / "prompts.txt").read_text().strip().splitlines()
    (folder / "videos.txt").write_text("\n".join(videos) + "\n")
    (folder / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return broken


@pytest.mark.parametrize("main", [tsa.cli.train.main, tsa.cli.cache.main], ids=["tsa-train", "tsa-cache"])
def test_a_dataset_without_a_decodable_clip_fails_in_one_line_and_leaves_nothing(main, default_run, tmp_path,
                                                                                 capsys, monkeypatch):
    broken = _corrupt_dataset(tmp_path / "data")
    monkeypatch.setattr("tsa.training.cache.LatentEncoder", lambda *a, **k: pytest.fail("the VAE loaded"))
    monkeypatch.setattr("tsa.training.loop.build_family", lambda *a: pytest.fail("a model loaded"))
    tiny = default_run[0] / "tiny"
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["--model-path", str(tiny / DEFAULT_FAMILY), "--teacher-path", str(tiny / "videomae"), "--data",
              str(tmp_path / "data"), "--output-dir", str(output), "--height", "96", "--width", "144",
              "--num-frames", "9", *QUIET])
    err = capsys.readouterr().err
    errors = _lines(err, f"{main.__module__.replace('tsa.cli.', 'tsa-')}: error:")
    assert exit_info.value.code == 1 and len(errors) == 1 and "Traceback" not in err, err
    assert str(broken) in errors[0] and "no video of the dataset decodes" in errors[0]
    assert not output.exists()


def test_a_corrupt_clip_among_good_ones_is_named_skipped_and_counted(default_run, tmp_path, capsys):
    tiny = default_run[0] / "tiny"
    broken = _corrupt_dataset(tmp_path / "data", good=tiny / "data")
    with pytest.warns(UndecodableVideoWarning) as warned:
        tsa.cli.train.main(["--model-path", str(tiny / DEFAULT_FAMILY), "--data", str(tmp_path / "data"),
                            "--output-dir", str(tmp_path / "out"), "--cache-dir", str(default_run[0] / "cache"),
                            "--preset", "tiny", "--align", "none", "--max-steps", "1", *QUIET])
    assert any(str(broken) in str(warning.message) for warning in warned)
    assert "1 of 7 clips skipped (undecodable)" in capsys.readouterr().out


def test_usage_mistakes_exit_2_in_one_line_in_the_order_a_person_needs(capsys, tmp_path):
    cases = [
        (tsa.cli.train.main, ["--max-step", "3"], "unrecognized arguments: --max-step"),
        (tsa.cli.train.main, ["--learning-rate", "-1e-4"], "--learning-rate must be a finite number > 0, got -0.0001"),
        (tsa.cli.train.main, ["--model-path", "/nonexistent"], "--model-path /nonexistent does not exist"),
        (tsa.cli.cache.main, ["--max-step", "3"], "unrecognized arguments"),
        (tsa.cli.sample.main, [str(tmp_path), "--num-inference"], "unrecognized arguments"),
        (tsa.cli.viz.main, [str(tmp_path), "--video", "v.mp4", "--tau", "-0.5"], "is not a tsa-train output folder"),
        (tsa.cli.convert_videomae.main, [str(tmp_path / "none.pth"), str(tmp_path / "out")], "does not exist"),
    ]
    for main, argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        line = _one_line(capsys, exit_info, 2)
        assert message in line, (argv, line)
    with pytest.raises(SystemExit):
        tsa.cli.viz.main([str(tmp_path), "--video", "v.mp4", "--seed", "-3", "--outp", "x.png"])
    assert "unrecognized arguments: --outp" in capsys.readouterr().err


def test_help_says_what_each_option_does_and_its_default_in_plain_words():
    from tsa.cli.options import build_parser

    for parser in (build_parser(), tsa.cli.sample.build_parser(), tsa.cli.viz.build_parser(),
                   tsa.cli.convert_videomae.build_parser()):
        undocumented = [action.option_strings or action.dest for action in parser._actions if not action.help]
        assert not undocumented, (parser.prog, undocumented)
        text = parser.format_help()
        for unplain in ("default: None", "default: True", "default: False", "default: []"):
            assert unplain not in text, (parser.prog, unplain)
    assert "--vae-tiling" in build_parser().format_help() and "(default: off)" in build_parser().format_help()


class _FakePipeline:
    """Stands in for the diffusers pipeline: two black 9-frame clips' worth of output, no weights."""

    def to(self, device):
        return self

    def __call__(self, prompt, **kwargs):
        return SimpleNamespace(frames=[np.zeros((9, 96, 144, 3), np.float32)])


def test_sample_succeeds_with_0_refuses_to_overwrite_and_fails_with_1(default_run, tmp_path, capsys, monkeypatch):
    run, output = default_run[0], tmp_path / "samples"
    argv = [str(run), "--prompt", "a ball", "--output-dir", str(output), "--device", "cpu"]
    monkeypatch.setattr(tsa.sampling, "load_pipeline", lambda *a, **k: _FakePipeline())
    assert tsa.cli.sample.main(argv) is None  # the console script exits 0
    (written,) = output.glob("*.mp4")
    before = _hashes(output)
    with pytest.raises(SystemExit) as exit_info:
        tsa.cli.sample.main(argv)
    assert f"{written} already exists: add --overwrite" in _one_line(capsys, exit_info, 2)
    assert _hashes(output) == before
    assert tsa.cli.sample.main([*argv, "--overwrite"]) is None

    def broken(*args, **kwargs):
        raise RuntimeError("the pipeline folder is broken")

    monkeypatch.setattr(tsa.sampling, "load_pipeline", broken)
    with pytest.raises(SystemExit) as exit_info:
        tsa.cli.sample.main([*argv, "--overwrite"])
    line = _one_line(capsys, exit_info, 1)
    assert line == "tsa-sample: error: RuntimeError: the pipeline folder is broken (--debug for the traceback)"
    with pytest.raises(SystemExit):
        tsa.cli.sample.main([*argv, "--overwrite", "--debug"])
    assert "Traceback" in capsys.readouterr().err


def test_viz_exits_0_after_success_and_refuses_to_overwrite(default_run, tmp_path, capsys, monkeypatch):
    from tsa.viz.runs import RunDrawing

    run = default_run[0]
    video = sorted((run / "tiny" / "data" / "videos").glob("*.mp4"))[0]
    output = tmp_path / "maps.png"

    def draw(run_dir, pixels, *, output, **kwargs):
        output.write_bytes(b"png")
        return RunDrawing(output, None, [])

    monkeypatch.setattr(tsa.cli.viz, "draw_run", draw)
    argv = [str(run), "--video", str(video), "--output", str(output)]
    assert tsa.cli.viz.main(argv) is None  # the console script exits 0 (it exited 1 with the path as status)
    with pytest.raises(SystemExit) as exit_info:
        tsa.cli.viz.main(argv)
    assert "already exists: add --overwrite" in _one_line(capsys, exit_info, 2)
    assert tsa.cli.viz.main([*argv, "--overwrite"]) is None


def test_cache_exits_0_and_rewrites_no_entry(default_run, capsys):
    run = default_run[0]
    before = {path: path.stat().st_mtime_ns for path in (run / "cache").rglob("*.safetensors")}
    assert before
    assert tsa.cli.cache.main([*assets(run, DEFAULT_FAMILY), "--output-dir", str(run), *QUIET]) is None
    assert "6 of 6 videos cached (process 0 encoded 0, reused 6)" in capsys.readouterr().out
    assert {path: path.stat().st_mtime_ns for path in (run / "cache").rglob("*.safetensors")} == before


def test_convert_videomae_failure_exits_1_in_one_line(tmp_path, capsys):
    checkpoint = tmp_path / "model.pth"
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        tsa.cli.convert_videomae.main([str(checkpoint), str(tmp_path / "out")])
    assert _one_line(capsys, exit_info, 1).startswith("tsa-convert-videomae: error: ")
