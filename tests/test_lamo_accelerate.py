"""LaMoTrainer under `accelerate launch --num_processes 2` (CPU, gloo): copies stay identical and equal to one
process training on the whole batch."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import sys
import torch
from accelerate import Accelerator
from tsa.lamo import LaMoTrainer, MotionPredictor

def predictor(seed):
    torch.manual_seed(seed)
    return MotionPredictor(in_channels=4, channels=16, num_blocks=2, cond_dim=16, text_dim=8, prompt_dropout=0.0)

def trainer(model):
    return LaMoTrainer(model, lr=1e-2, total_steps=3, noise_prob=0.0)

gen = torch.Generator().manual_seed(0)
batches = [(torch.randn(4, 3, 4, 6, 6, generator=gen), torch.randn(4, 5, 8, generator=gen)) for _ in range(3)]
accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
distributed = trainer(predictor(seed=rank)).prepare(accelerator)  # different seeds: prepare broadcasts rank 0
for latents, prompts in batches:
    distributed.step(latents[2 * rank: 2 * rank + 2], prompts[2 * rank: 2 * rank + 2])
flat = torch.cat([p.detach().flatten() for p in distributed.predictor.parameters()])
copies = accelerator.gather(flat[None])
if accelerator.is_main_process:
    single = trainer(predictor(seed=0))
    for latents, prompts in batches:
        single.step(latents, prompts)
    reference = torch.cat([p.detach().flatten() for p in single.predictor.parameters()])
    moved = (reference - torch.cat([p.detach().flatten() for p in predictor(seed=0).parameters()])).abs().max()
    print(f"copies_equal={torch.equal(copies[0], copies[1])}")
    print(f"max_diff={(copies[0] - reference).abs().max().item():.3e} moved={moved.item():.3e}")
    with open(sys.argv[1], "w") as f:
        f.write(f"{torch.equal(copies[0], copies[1])} {(copies[0] - reference).abs().max().item()} {moved.item()}")
"""


@pytest.mark.slow
def test_two_process_training_matches_one_process_on_the_whole_batch(tmp_path):
    script, result = tmp_path / "lamo_ddp.py", tmp_path / "result.txt"
    script.write_text(SCRIPT)
    repo = Path(__file__).resolve().parents[1]
    with socket.socket() as probe:  # a free rendezvous port: other suites may launch in parallel
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
         "--dynamo_backend", "no", str(script), str(result)],
        cwd=repo, check=True, timeout=300, env={**os.environ, "PYTHONPATH": str(repo)},
    )
    copies_equal, max_diff, moved = result.read_text().split()
    assert copies_equal == "True"
    assert float(moved) > 1e-3  # the predictor did train
    assert float(max_diff) < 1e-5
