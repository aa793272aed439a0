"""tsa.viz: correspondence maps against direct computations, the objective's own features, tsa-viz and --viz-steps."""

import json
import math
import re

import numpy as np
import pytest
import torch

import stss_kernels
from tsa.viz import (
    alignment_statistics,
    correspondence_maps,
    default_columns,
    pixel_to_grid,
    select_queries,
)


def _features(batch=2, frames=3, height=4, width=5, channels=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, height, width, channels, generator=generator, dtype=torch.float64)


def _direct_map(features, batch, query, target, tau):
    """softmax over frame `target` of cos(x_query, x_j) / tau, written out with numpy loops."""
    x = features[batch].numpy()
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    frame, row, col = query
    logits = np.array(
        [[x[frame, row, col] @ x[target, r, c] / tau for c in range(x.shape[2])] for r in range(x.shape[1])]
    )
    weights = np.exp(logits - logits.max())
    return weights / weights.sum()


def test_maps_are_distributions_and_match_a_direct_computation():
    student, teacher = _features(channels=7, seed=0), _features(channels=6, seed=1)
    queries = [(0, 0, 0), (2, 3, 4), (1, 2, 1)]
    maps = correspondence_maps(student, teacher, queries, frames=[2, 0], tau_student=0.2, tau_teacher=0.07)
    assert maps.teacher.shape == maps.student.shape == (2, 3, 2, 4, 5) and maps.kl.shape == (2, 3, 2)
    np.testing.assert_allclose(maps.teacher.sum((-2, -1)), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(maps.student.sum((-2, -1)), 1.0, rtol=0, atol=1e-12)
    for b in range(2):
        for q, query in enumerate(queries):
            for c, target in enumerate((2, 0)):
                p_t = _direct_map(teacher, b, query, target, 0.07)
                p_s = _direct_map(student, b, query, target, 0.2)
                np.testing.assert_allclose(maps.teacher[b, q, c], p_t, rtol=1e-10, atol=1e-14)
                np.testing.assert_allclose(maps.student[b, q, c], p_s, rtol=1e-10, atol=1e-14)
                assert maps.kl[b, q, c] == pytest.approx(float((p_t * np.log(p_t / p_s)).sum()), rel=1e-9)
    entropy = maps.entropy("teacher")
    assert entropy.shape == (2, 3, 2) and np.all(entropy > 0) and np.all(entropy <= math.log(20) + 1e-12)


def test_identical_features_give_zero_kl_and_identical_rows():
    features = _features(batch=1, channels=5)
    queries = [(1, 1, 1), (0, 3, 4)]
    maps = correspondence_maps(features, features.clone(), queries, tau_student=0.1)
    np.testing.assert_array_equal(maps.student, maps.teacher)
    np.testing.assert_allclose(maps.kl, 0.0, atol=1e-12)
    # The same features at another student temperature are other distributions.
    sharper = correspondence_maps(features, features, queries, tau_student=0.05, tau_teacher=0.1)
    assert sharper.kl.min() > 1e-3


def test_statistics_are_the_tsa_loss_and_agree_with_the_maps():
    student, teacher = _features(channels=7, seed=2).float(), _features(channels=3, seed=3).float()
    for mask in (None, torch.rand(2, 60, generator=torch.Generator().manual_seed(0)) < 0.3):
        stats = alignment_statistics(student, teacher, tau_student=0.1, tau_teacher=0.2, query_mask=mask, chunk_size=7)
        loss = stss_kernels.tempered_kl(
            student, teacher, tau_student=0.1, tau_teacher=0.2, query_mask=mask, backend="reference"
        )
        assert stats["kl"] == pytest.approx(loss.item(), rel=1e-5)
    everything = [(f, r, c) for f in range(3) for r in range(4) for c in range(5)]
    maps = correspondence_maps(student, teacher, everything, tau_student=0.1, tau_teacher=0.2)
    stats = alignment_statistics(student, teacher, tau_student=0.1, tau_teacher=0.2)
    np.testing.assert_allclose(stats["kl_per_frame"], maps.kl.mean((0, 1)), rtol=1e-5)
    assert stats["entropy_teacher"] == pytest.approx(maps.entropy("teacher").mean(), rel=1e-5)
    assert stats["entropy_student"] == pytest.approx(maps.entropy("student").mean(), rel=1e-5)
    empty = alignment_statistics(student, teacher, query_mask=torch.zeros(2, 60, dtype=torch.bool))
    assert empty["kl"] == 0 and not np.any(empty["kl_per_frame"])


@pytest.mark.parametrize(
    ("queries", "options", "message"),
    [
        (
            [(3, 0, 0)],
            {},
            r"queries must be \(frame, row, col\) positions of the 3x4x5 alignment grid, got \(3, 0, 0\)",
        ),
        ([(0, 4, 0)], {}, "3x4x5 alignment grid"),
        ([(0, 0)], {}, "got \\(0, 0\\)"),
        ([(0.5, 0, 0)], {}, "alignment grid"),
        ([], {}, "at least one"),
        ([(0, 0, 0)], {"frames": [0, 3]}, r"frames must be target frame indices in \[0, 3\), got \[0, 3\]"),
        ([(0, 0, 0)], {"frames": []}, "frames must be"),
        ([(0, 0, 0)], {"tau_student": 0.0}, "tau_student must be a positive number"),
        ([(0, 0, 0)], {"tau_teacher": -1.0}, "tau_teacher must be a positive number"),
    ],
)
def test_bad_queries_frames_and_temperatures_are_refused(queries, options, message):
    features = _features()
    with pytest.raises(ValueError, match=message):
        correspondence_maps(features, features, queries, **options)


def test_grids_must_match():
    with pytest.raises(ValueError, match="grids differ"):
        correspondence_maps(_features(), _features(height=3), [(0, 0, 0)])


def test_default_queries_are_the_most_dynamic_tokens_and_the_centre():
    saliency = torch.zeros(3, 4, 5)
    saliency[1, 0, 4], saliency[1, 3, 0], saliency[1, 2, 2] = 5.0, 3.0, 1.0
    saliency[0, 1, 1] = 9.0  # another frame: not picked for query frame 1
    assert select_queries(saliency) == [(1, 0, 4), (1, 3, 0), (1, 2, 2)]
    saliency[1, 2, 2] = 4.0  # the centre is among the most dynamic: no repeat
    assert select_queries(saliency) == [(1, 0, 4), (1, 2, 2)]
    assert select_queries(saliency, query_frame=0, count=1) == [(0, 1, 1), (0, 2, 2)]
    with pytest.raises(ValueError, match=r"query_frame must be in \[0, 3\)"):
        select_queries(saliency, query_frame=3)
    assert pixel_to_grid([(0, 0), (143.9, 95.9), (72, 40)], (96, 144), (2, 3)) == [(0, 0), (1, 2), (0, 1)]
    assert default_columns(4, 2) == [0, 1, 2, 3]
    columns = default_columns(24, 13)
    assert 13 in columns and columns[0] == 0 and columns[-1] == 23 and len(columns) <= 8


# --- through the objective, on tiny models -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from tsa.models.cogvideox import tiny_transformer
    from tsa.teachers import load_teacher
    from tsa.tiny import tiny_videomae

    root = tmp_path_factory.mktemp("viz-models")
    return tiny_transformer(num_layers=2), load_teacher("videomae", tiny_videomae(root / "videomae"))


def _objective(tiny_models, align, projector=None, grid="teacher-grid"):
    from tsa.models.cogvideox import cogvideox_scheduler
    from tsa.objective import AlignmentObjective

    transformer, teacher = tiny_models
    return AlignmentObjective(
        transformer,
        cogvideox_scheduler(),
        teacher=teacher,
        align=align,
        block_index=2,
        projector_hidden_dim=16,
        projector=projector,
        grid=grid,
    ).eval()


def _clip(batch=1, seed=0):
    from tsa.tiny import TINY_TEXT_DIM, TINY_TEXT_LENGTH

    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 3, 4, 12, 18, generator=generator)
    prompt = torch.randn(batch, TINY_TEXT_LENGTH, TINY_TEXT_DIM, generator=generator)
    pixels = torch.rand(batch, 9, 3, 96, 144, generator=generator) * 2 - 1
    return latents, prompt, pixels


@pytest.mark.parametrize(("grid", "cells"), [("teacher-grid", (4, 2, 3)), ("native", (2, 6, 9))])
def test_clip_alignment_records_what_the_loss_receives(tiny_models, grid, cells):
    from tsa.features import BlockFeatureCapture, resample_features
    from tsa.masks import motion_query_mask
    from tsa.teachers import resize_video
    from tsa.viz import clip_alignment

    objective = _objective(tiny_models, "mtsa", grid=grid)
    latents, prompt, pixels = _clip(batch=2)
    clip = clip_alignment(objective, latents, prompt, pixels, timestep=300, seed=4)
    assert clip.grid == cells and clip.student.shape[-1] == clip.teacher.shape[-1] == 24
    # The same forward by hand: the block-2 features through the projector, the teacher on its grid, resampled.
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), BlockFeatureCapture(objective.transformer, 2) as capture:
        out = objective(latents, prompt, pixels, timesteps=torch.tensor([300, 300]), noise=noise)
        student = objective.projector(capture.features)
    torch.testing.assert_close(clip.student, student)
    torch.testing.assert_close(clip.teacher, resample_features(objective.teacher(pixels, grid=(4, 2, 3)), cells))
    # The statistics over the M-TSA mask are the loss the objective computed.
    stats = alignment_statistics(clip.student, clip.teacher, query_mask=clip.mask.flatten(1))
    assert stats["kl"] == pytest.approx(out["align"].item(), rel=1e-4)
    video = resize_video(pixels[:, 1:], cells[0] * 2, cells[1] * 16, cells[2] * 16)
    assert torch.equal(clip.mask.flatten(1), motion_query_mask(video, (2, 16, 16), 0.2))
    assert clip.images.shape == (2, cells[0], 3, 96, 144) and clip.top_k == 0.2 and clip.timestep == 300

    # TRD and REPA runs never hand the loss a video: the mask is built from the same pixels.
    for align in ("trd", "repa"):
        other = clip_alignment(
            _objective(tiny_models, align, objective.projector), latents, prompt, pixels, timestep=300, seed=4
        )
        assert torch.equal(other.mask, clip.mask) and torch.equal(other.saliency, clip.saliency)
        torch.testing.assert_close(other.student, clip.student)
    with pytest.raises(ValueError, match="has no teacher alignment"):
        clip_alignment(_objective(tiny_models, "none"), latents, prompt, pixels)


def test_plot_and_gif_show_every_row_and_frame(tiny_models, tmp_path):
    from PIL import Image

    from tsa.viz import clip_alignment, plot_correspondences, plot_target_frame, save_correspondence_gif

    objective = _objective(tiny_models, "tsa")
    clip = clip_alignment(objective, *_clip())
    queries = select_queries(clip.saliency[0])
    maps = correspondence_maps(clip.student, clip.teacher, queries, frames=[0, 2, 3])
    figure = plot_correspondences(maps, clip, base=maps)
    assert len(figure.axes) == (len(queries) * 3 + 1) * 3
    titles = [axis.get_title() for axis in figure.axes]
    assert titles[:3] == ["frame 0", f"frame 2{' (query)' if queries[0][0] == 2 else ''}", "frame 3"]
    assert titles[3] == f"KL {maps.kl[0, 0, 0]:.3g}" and titles[-1].startswith("motion in mask")
    one = plot_target_frame(maps, clip, 1, base=maps)
    assert len(one.axes) == 4 * max(2, len(queries))
    assert one.axes[len(queries)].get_title() == f"KL {maps.kl[0, 0, 1]:.3g}"  # student row, first query
    path = save_correspondence_gif(maps, clip, tmp_path / "maps.gif")
    with Image.open(path) as gif:
        assert gif.n_frames == 3


# --- tsa-train --viz-steps and tsa-viz on a tiny run --------------------------------------------------------


@pytest.fixture
def tiny_run(tiny_runs):
    """The default family's shared tiny run (tests/tsa_helpers.py): 4 steps, maps every 2 (--viz-steps 2)."""
    from tsa.models import DEFAULT_FAMILY

    return tiny_runs(DEFAULT_FAMILY)[0]


@pytest.mark.slow
def test_viz_steps_write_maps_and_scalars_during_training(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert sorted(path.name for path in (tiny_run / "viz").glob("step-*.png")) == ["step-000002.png", "step-000004.png"]
    assert all(path.stat().st_size > 20_000 for path in (tiny_run / "viz").glob("step-*.png"))
    rows = [json.loads(line) for line in (tiny_run / "viz" / "stats.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4]
    for row in rows:
        assert all(math.isfinite(value) for value in row.values())
        assert 0 < row["viz/entropy_teacher"] <= math.log(6) and 0 < row["viz/entropy_student"] <= math.log(6)
        profile = [row[f"viz/kl_frame_{frame:02d}"] for frame in range(4)]
        assert row["viz/kl"] == pytest.approx(sum(profile) / 4, rel=1e-6) and min(profile) > 0
        assert row["viz/mask_coverage"] == pytest.approx(1 / 6) and 0 < row["viz/mask_motion_share"] <= 1
    assert rows[0]["viz/entropy_teacher"] == rows[1]["viz/entropy_teacher"]  # the teacher is frozen
    assert rows[0]["viz/kl"] != rows[1]["viz/kl"]  # the student moved
    accumulator = EventAccumulator(str(tiny_run / "logs" / "tsa-train"), size_guidance={"images": 0}).Reload()
    assert {"viz/kl", "viz/entropy_student", "viz/kl_frame_03", "viz/mask_coverage"} <= set(
        accumulator.Tags()["scalars"]
    )
    assert [event.step for event in accumulator.Images("viz/correspondences")] == [2, 4]


@pytest.mark.slow
def test_tsa_viz_writes_the_picture_and_gif_of_a_tiny_run(tiny_run, tmp_path, capsys):
    from PIL import Image

    from tsa.cli.viz import main

    clip = tiny_run / "tiny" / "data" / "videos" / "clip_001.mp4"
    output = tmp_path / "maps.png"
    status = main(
        [
            str(tiny_run),
            "--video",
            str(clip),
            "--output",
            str(tmp_path / "maps.png"),
            "--gif",
            "--points",
            "10,10",
            "140,90",
            "--query-frame",
            "1",
            "--frames",
            "0,1,3",
            "--tau",
            "0.2",
        ]
    )
    assert status is None and output.stat().st_size > 20_000  # None: the console script exits 0
    with Image.open(tmp_path / "maps.gif") as gif:
        assert gif.n_frames == 3
    printed = capsys.readouterr().out.splitlines()
    assert printed[:2] == [str(output), str(tmp_path / "maps.gif")]
    assert printed[2].startswith("q1 frame 1 cell (0,0): KL per frame") and " | base " in printed[2]
    assert printed[3].startswith("q2 frame 1 cell (1,2)") and len(printed) == 4
    main([str(tiny_run), "--video", str(clip), "--no-base"])  # default queries, output in RUN_DIR/viz
    assert (tiny_run / "viz" / "clip_001.png").stat().st_size > 20_000
    assert " | base " not in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--points", "144,10"], "--points 144,10 is outside the 144x96 clip"),
        (["--points", "5"], "argument --points: expected a pixel position x,y"),
        (["--query-frame", "4"], r"--query-frame must be in \[0, 4\) \(the alignment grid has 4 frames\), got 4"),
        (["--frames", "0,-1"], r"--frames must be frame indices in \[0, 4\)"),
        (["--tau", "0"], "--tau must be a positive number"),
        (["--output", "maps.jpg"], "--output must be a .png path"),
        (["--video", "missing.mp4"], "--video: no such file: missing.mp4"),
    ],
)
def test_tsa_viz_refuses_bad_requests_in_one_line_before_loading(tiny_run, capsys, monkeypatch, extra, message):
    import tsa.cli.viz
    import tsa.viz.runs

    monkeypatch.setattr(tsa.viz.runs, "load_run", lambda *a, **k: pytest.fail("a model was loaded"))
    clip = tiny_run / "tiny" / "data" / "videos" / "clip_000.mp4"
    with pytest.raises(SystemExit) as exit_info:
        tsa.cli.viz.main([str(tiny_run), "--video", str(clip), *extra])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("tsa-viz: error: ") and re.search(message, error), error


def test_tsa_viz_refuses_missing_runs_videos_and_runs_without_a_teacher(tmp_path, capsys):
    from tsa.cli.viz import main

    def error(argv):
        with pytest.raises(SystemExit):
            main(argv)
        return capsys.readouterr().err.strip()

    assert error([str(tmp_path), "--video", "x.mp4"]) == (
        f"tsa-viz: error: {tmp_path} is not a tsa-train output folder (no training_args.json)"
    )
    (tmp_path / "training_args.json").write_text(json.dumps({"align": "lamo"}))
    assert "was trained with --align lamo: it has no projector and teacher" in error([str(tmp_path), "--video", "x"])


def test_viz_steps_option_is_checked():
    from tsa.cli.options import parse_config

    assert parse_config([]).viz_steps == 0
    assert parse_config(["--viz-steps", "25"]).viz_steps == 25
    for argv in (
        ["--viz-steps", "-1"],
        ["--viz-steps", "5", "--align", "lamo"],
        ["--viz-steps", "5", "--align", "none"],
    ):
        with pytest.raises(SystemExit):
            parse_config(argv)


@pytest.mark.slow
def test_lora_run_shows_the_base_model_with_its_adapters_disabled(tiny_run, tmp_path):
    from accelerate.state import AcceleratorState, GradientState
    from diffusers import CogVideoXTransformer3DModel

    from tsa.cli.options import parse_config
    from tsa.training import train
    from tsa.viz import clip_alignment, load_run

    tiny = tiny_run / "tiny"
    output = tmp_path / "lora"
    try:
        train(
            parse_config(
                [
                    "--preset",
                    "tiny",
                    "--output-dir",
                    str(output),
                    "--model-path",
                    str(tiny / "cogvideox"),
                    "--teacher-path",
                    str(tiny / "videomae"),
                    "--data",
                    str(tiny / "data"),
                    "--cache-dir",
                    str(tiny_run / "cache"),
                    "--finetune",
                    "lora",
                    "--lora-rank",
                    "4",
                    "--lora-alpha",
                    "8",
                    "--max-steps",
                    "1",
                    "--lr-warmup-steps",
                    "0",
                    "--viz-steps",
                    "1",
                    "--no-progress",
                ]
            )
        )
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert (output / "viz" / "step-000001.png").is_file()
    run = load_run(output)
    assert run.lora and run.base is run.objective
    _, prompt, pixels = _clip()
    batch = {
        "latents": torch.randn(1, 3, 4, 12, 18, generator=torch.Generator().manual_seed(1)),
        "prompt_embeds": prompt,
        "pixels": pixels,
    }
    trained = clip_alignment(run.objective, batch["latents"], prompt, pixels)
    base = run.base_alignment(batch)
    assert (trained.student - base.student).abs().max() > 1e-6
    torch.testing.assert_close(
        clip_alignment(run.objective, batch["latents"], prompt, pixels).student, trained.student
    )  # the adapters are back on
    run.objective.transformer = CogVideoXTransformer3DModel.from_pretrained(tiny / "cogvideox", subfolder="transformer")
    torch.testing.assert_close(
        clip_alignment(run.objective, batch["latents"], prompt, pixels).student, base.student, rtol=1e-5, atol=1e-6
    )


@pytest.mark.slow
def test_a_wan_run_gets_its_pictures_through_the_wan_family(tmp_path, capsys):
    """--viz-steps and tsa-viz on a tiny Wan run (LoRA): the objective, the clip encoding and the base row
    come through the Wan family."""
    from accelerate.state import AcceleratorState, GradientState

    from tsa.cli.options import parse_config
    from tsa.cli.viz import main
    from tsa.training import train
    from tsa.viz import load_run

    output = tmp_path / "wan"
    argv = ["--preset", "tiny", "--model-family", "wan", "--finetune", "lora", "--lora-rank", "4"]
    argv += ["--output-dir", str(output), "--max-steps", "1", "--num-videos", "2", "--viz-steps", "1", "--no-progress"]
    try:
        train(parse_config(argv))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert (output / "viz" / "step-000001.png").stat().st_size > 20_000
    run = load_run(output)
    assert run.family.name == "wan" and run.lora and run.base is run.objective
    assert type(run.objective.family).__name__ == "WanFamily" and run.encoder.max_sequence_length == 512
    assert main([str(output), "--video", str(output / "tiny" / "data" / "videos" / "clip_001.mp4")]) is None
    picture = output / "viz" / "clip_001.png"
    assert picture.stat().st_size > 20_000
    assert " | base " in capsys.readouterr().out
