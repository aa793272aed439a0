"""tsa-train past one process, on CPU with gloo (`accelerate launch --multi_gpu --num_processes 2` and
ACCELERATE_USE_CPU): --context-parallel 2 reproduces the one-process run, --fsdp reproduces the DDP run, FSDP2
checkpoints resume, and the objective's token-sharded alignment equals the one-process objective."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tsa_helpers import QUIET, assets, reset_accelerate, train_cli

from tsa.cli.train import main
from tsa.sharding import TokenShard

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
LOSS_TOLERANCE = 1e-5  # relative, per logged loss term (fp32 round-off of another summation order)
WEIGHT_TOLERANCE = 1e-4  # relative to each tensor's largest entry


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    reset_accelerate()


@pytest.fixture(scope="module")
def wan(tiny_runs):
    """Options that reuse the shared tiny Wan run's models, teacher, clips and latent cache."""
    return [*assets(tiny_runs("wan")[0], "wan"), *QUIET]


@pytest.fixture(scope="module")
def one_process(wan, tmp_path_factory):
    """The one-process reference: tiny Wan, M-TSA + LoRA, 3 steps, maps drawn at step 3."""
    output = tmp_path_factory.mktemp("one")
    train_cli([*wan, *LORA, "--viz-steps", "3", "--output-dir", output])
    return output


# Adam's update of a gradient entry far below epsilon is close to its sign, which fp32 round-off can flip (LoRA's
# zero-initialised B gets such entries in step 1): a large epsilon keeps the update a smooth function of the
# gradient, so the weights differ by round-off only.
STEPS = ["--max-steps", "3", "--checkpointing-steps", "2", "--lr-warmup-steps", "0", "--adam-epsilon", "1e-3"]
LORA = ["--finetune", "lora", "--lora-rank", "4", "--lora-alpha", "8", *STEPS]
FULL = ["--finetune", "full", *STEPS]


def launch(arguments, processes=2):
    """`accelerate launch` of tsa-train on `processes` CPU processes; fails the test with the output's tail."""
    with socket.socket() as probe:  # a free rendezvous port: other suites may launch in parallel
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", "tsa.cli.train", *map(str, arguments)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def losses(run):
    return json.loads((run / "losses.json").read_text())


def assert_same_run(expected, actual, files):
    """Same steps and loss terms (LOSS_TOLERANCE) and the same final weights (WEIGHT_TOLERANCE) in `files`."""
    reference, candidate = losses(expected), losses(actual)
    assert [row["step"] for row in candidate] == [row["step"] for row in reference]
    for want, got in zip(reference, candidate):
        for name in ("loss", "diffusion", "align"):
            assert got[name] == pytest.approx(want[name], rel=LOSS_TOLERANCE), (want["step"], name)
    for name in files:
        want, got = load_file(expected / name), load_file(actual / name)
        assert sorted(got) == sorted(want)
        for key, tensor in want.items():
            error = (got[key] - tensor).abs().max() / tensor.abs().max().clamp_min(1e-12)
            assert error <= WEIGHT_TOLERANCE, (name, key, float(error))


LORA_FILES = ("pytorch_lora_weights.safetensors", "projector/diffusion_pytorch_model.safetensors")
FULL_FILES = ("transformer/diffusion_pytorch_model.safetensors", "projector/diffusion_pytorch_model.safetensors")


def test_context_parallel_run_equals_one_process(wan, one_process, tmp_path):
    """M-TSA + LoRA with the tokens split over 2 ranks: the losses, weights and the maps' statistics are the
    one-process run's (the CP group's gradients are summed, not averaged)."""
    launch([*wan, *LORA, "--context-parallel", "2", "--viz-steps", "3", "--output-dir", tmp_path])
    assert_same_run(one_process, tmp_path, LORA_FILES)
    want = json.loads((one_process / "viz" / "stats.jsonl").read_text())
    got = json.loads((tmp_path / "viz" / "stats.jsonl").read_text())
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert (tmp_path / "checkpoints" / "checkpoint-2" / "model.safetensors").is_file()


def test_fsdp_with_context_parallel_equals_one_process(wan, one_process, tmp_path):
    """FSDP2 over the 2 ranks of one context-parallel group (LoRA): still the one-process run."""
    launch([*wan, *LORA, "--fsdp", "--context-parallel", "2", "--output-dir", tmp_path])
    assert_same_run(one_process, tmp_path, LORA_FILES)
    assert (tmp_path / "checkpoints" / "checkpoint-2" / "fsdp" / ".metadata").is_file()



def test_ltx2_context_parallel_run_equals_one_process(tiny_runs, tmp_path):
    """Tiny LTX-2 (video-only call: empty audio stream, isolate_modalities=True), M-TSA + LoRA, under diffusers' LTX-2
    plan (video tokens, prompt tokens and rotary tables split over 2 ranks): the one-process run's losses and
    weights."""
    ltx2 = [*assets(tiny_runs("ltx2")[0], "ltx2"), "--model-family", "ltx2", *QUIET]
    one = tmp_path / "one"
    train_cli([*ltx2, *LORA, "--output-dir", one])
    launch([*ltx2, *LORA, "--context-parallel", "2", "--output-dir", tmp_path / "cp"])
    assert_same_run(one, tmp_path / "cp", LORA_FILES)


@pytest.fixture(scope="module")
def ddp_full(wan, tmp_path_factory):
    output = tmp_path_factory.mktemp("ddp")
    launch([*wan, *FULL, "--output-dir", output])
    return output


@pytest.fixture(scope="module")
def fsdp_full(wan, tmp_path_factory):
    output = tmp_path_factory.mktemp("fsdp")
    launch([*wan, *FULL, "--fsdp", "--output-dir", output])
    return output


def test_fsdp_full_finetune_equals_ddp(ddp_full, fsdp_full):
    assert_same_run(ddp_full, fsdp_full, FULL_FILES)
    # Sharded checkpoints: each rank wrote its own shard file, no DDP model file.
    checkpoint = fsdp_full / "checkpoints" / "checkpoint-2"
    assert len(list((checkpoint / "fsdp").glob("*.distcp"))) == 2
    assert not (checkpoint / "model.safetensors").exists()


def test_fsdp_checkpoint_resumes(wan, fsdp_full, tmp_path):
    """Resuming the FSDP run from its step-2 checkpoint finishes with the uninterrupted run's losses and weights."""
    resumed = tmp_path / "resumed"
    shutil.copytree(fsdp_full / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    launch([*wan, *FULL, "--fsdp", "--resume", "latest", "--output-dir", resumed])
    assert_same_run(fsdp_full, resumed, FULL_FILES)


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def test_refusals_are_one_line(wan, tmp_path, capsys):
    """A family without a context-parallel plan, --context-parallel that does not divide the processes, and
    --fsdp with --viz-steps are refused in one line, exit 2."""
    code, lines = run_main(["--model-family", "cogvideox", "--context-parallel", "2", "--output-dir",
                            str(tmp_path), *QUIET], capsys)
    assert code == 2 and len(lines) == 1 and "cogvideox" in lines[0] and "wan" in lines[0], lines
    code, lines = run_main([*wan, "--context-parallel", "2", "--output-dir", str(tmp_path)], capsys)
    assert code == 2 and len(lines) == 1 and "must divide the number of processes (1)" in lines[0], lines
    code, lines = run_main([*wan, "--fsdp", "--viz-steps", "1", "--output-dir", str(tmp_path)], capsys)
    assert code == 2 and len(lines) == 1 and "--fsdp" in lines[0], lines


@pytest.mark.parametrize("tokens, size", [(12, 2), (162, 2), (10, 3), (7, 4)])
def test_token_shard_bounds_follow_torch_split_order(tokens, size):
    sequence = torch.arange(tokens)
    for rank in range(size):
        shard = TokenShard(None, rank, size)
        start, stop = shard.split_bounds(tokens)
        assert torch.equal(sequence[start:stop], torch.tensor_split(sequence, size)[rank])
        if tokens % size == 0:  # diffusers' plans split with chunk into equal parts
            start, stop = shard.equal_bounds(tokens)
            assert torch.equal(sequence[start:stop], sequence.chunk(size)[rank])
        else:
            with pytest.raises(ValueError, match="do not split into"):
                shard.equal_bounds(tokens)


OBJECTIVE_SCRIPT = """
import copy, json, os, sys, unittest.mock
import torch, torch.distributed as dist
from diffusers import ContextParallelConfig, FlowMatchEulerDiscreteScheduler
from tsa.models.wan import tiny_wan_transformer
from tsa.objective import AlignmentObjective
from tsa.teachers import load_teacher

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
teacher = load_teacher("videomae", sys.argv[1])
results = {}
for align, grid in [("mtsa", "teacher-grid"), ("mtsa", "native"), ("tsa", "native"), ("trd", "teacher-grid"),
                    ("repa", "native")]:
    torch.manual_seed(0)
    transformer = tiny_wan_transformer(2, 4)
    objective = AlignmentObjective(transformer, FlowMatchEulerDiscreteScheduler(shift=3.0), teacher, align=align,
                                   block_index=2, grid=grid, projector_hidden_dim=16)
    reference = copy.deepcopy(objective)
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 3, 4, 12, 18, generator=generator)
    prompts = torch.randn(2, 7, 32, generator=generator)
    pixels = torch.rand(2, 9, 3, 96, 144, generator=generator) * 2 - 1
    step = dict(timesteps=torch.tensor([300.0, 800.0]), noise=torch.randn(latents.shape, generator=generator))
    want = reference(latents, prompts, pixels, **step)
    want["loss"].backward()
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (1, world), mesh_dim_names=("ring", "ulysses"))
    with unittest.mock.patch.object(torch.accelerator, "device_count", return_value=1):
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world, mesh=mesh))
    objective.shard_tokens(mesh["ulysses"].get_group())
    got = objective(latents, prompts, pixels, **step)
    got["loss"].backward()
    errors = {name: abs(got[name].item() - want[name].item()) / abs(want[name].item())
              for name in ("loss", "diffusion", "align")}
    worst = 0.0
    for (name, parameter), (_, expected) in zip(objective.named_parameters(), reference.named_parameters()):
        gradient = parameter.grad.clone()
        dist.all_reduce(gradient)  # the group's gradient is the sum of its ranks'
        scale = expected.grad.abs().max().clamp_min(1e-12)
        worst = max(worst, ((gradient - expected.grad).abs().max() / scale).item())
    errors["gradient"] = worst
    results[f"{align}/{grid}"] = errors
if rank == 0:
    with open(sys.argv[2], "w") as handle:
        json.dump(results, handle)
dist.barrier()
dist.destroy_process_group()
# gloo's worker threads drop their finished collectives' tensors after the caller's wait returns, which takes the GIL:
# one that asks for it while the interpreter finalises aborts the process (pytorch/pytorch#38228) although every
# rank finished. The results are written: leave without finalising.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


def test_objective_on_token_slices_equals_one_process(tmp_path):
    """AlignmentObjective under diffusers' Ulysses context parallelism (2 ranks): every method's loss terms and the
    parameter gradients summed over the group equal the one-process objective's, on both grids."""
    from tsa.tiny import tiny_videomae

    tiny_videomae(tmp_path / "videomae")
    script, result = tmp_path / "objective.py", tmp_path / "result.json"
    script.write_text(OBJECTIVE_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path / "videomae"), str(result)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # Gradients relative to each parameter's largest entry: a bias gradient sums the tokens' gradients, which
    # cancel to ~1e-3 here, so fp32 round-off of another summation order shows at ~1e-5.
    tolerances = {"loss": 1e-5, "diffusion": 1e-5, "align": 1e-5, "gradient": 1e-4}
    for case, errors in json.loads(result.read_text()).items():
        for name, error in errors.items():
            assert error < tolerances[name], (case, name, error)


LTX2_TRANSFORMER_SCRIPT = """
import copy, json, os, sys, unittest.mock
import torch, torch.distributed as dist
from diffusers import ContextParallelConfig, LTX2VideoTransformer3DModel
from tsa.models import get_family
from tsa.models.ltx2 import tiny_ltx2_transformer

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (1, world), mesh_dim_names=("ring", "ulysses"))
family = get_family("ltx2")


def enable(transformer):
    with unittest.mock.patch.object(torch.accelerator, "device_count", return_value=1):
        family.enable_context_parallel(transformer, ContextParallelConfig(ulysses_degree=world, mesh=mesh))


def relative(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


results = {}
torch.manual_seed(0)
transformer = tiny_ltx2_transformer(2)
reference = copy.deepcopy(transformer)
generator = torch.Generator().manual_seed(1)
tokens = torch.randn(2, 18, transformer.config.in_channels, generator=generator)
mask = torch.ones(2, 16, dtype=torch.bool)
mask[0, :5] = mask[1, :9] = False  # left padding, as Gemma's
prompt = torch.randn(2, 16, 32, generator=generator) * mask[..., None]
timestep = torch.tensor([300.0, 800.0])
want = family.transformer_call(reference, tokens, (3, 2, 3), prompt, timestep, mask)
want.pow(2).sum().backward()
enable(transformer)
got = family.transformer_call(transformer, tokens, (3, 2, 3), prompt, timestep, mask)
got.pow(2).sum().backward()
worst = 0.0
for parameter, expected in zip(transformer.parameters(), reference.parameters()):
    if expected.grad is None or not expected.grad.abs().max() > 0:
        continue
    gradient = parameter.grad.clone()
    dist.all_reduce(gradient)  # the group's gradient is the sum of its ranks'
    worst = max(worst, relative(gradient, expected.grad))
results["call"] = {"output": relative(got, want), "gradient": worst}

# "split" rotary tables (B, heads, N, D / 2): each rank gets its token slice of the one-process tables.
split = LTX2VideoTransformer3DModel.from_config(tiny_ltx2_transformer(2).config, rope_type="split")
coords = split.rope.prepare_video_coords(2, 3, 2, 3, torch.device("cpu"), fps=family.fps)
whole = split.rope(coords)
enable(split)
local = split.rope(coords)
results["split rope"] = {"output": max(relative(part, table.chunk(world, dim=2)[rank])
                                       for part, table in zip(local, whole))}
if rank == 0:
    with open(sys.argv[1], "w") as handle:
        json.dump(results, handle)
dist.barrier()
dist.destroy_process_group()
# gloo's worker threads drop their finished collectives' tensors after the caller's wait returns, which takes the GIL:
# one that asks for it while the interpreter finalises aborts the process (pytorch/pytorch#38228) although every
# rank finished. The results are written: leave without finalising.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


def test_ltx2_transformer_on_token_slices_equals_one_process(tmp_path):
    """The LTX-2 video-only call (padded text mask) with the video tokens split over 2 ranks: the one-process
    velocity, and parameter gradients summed over the group equal the one-process gradients; "split" rotary tables
    (the released checkpoints' layout) split along their token axis."""
    script, result = tmp_path / "ltx2.py", tmp_path / "result.json"
    script.write_text(LTX2_TRANSFORMER_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(result)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(result.read_text())
    assert results["call"]["output"] < 1e-5 and results["call"]["gradient"] < 1e-4, results
    assert results["split rope"]["output"] == 0, results
