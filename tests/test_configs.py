"""The shipped accelerate configs parse with accelerate's own loader and point at things that exist."""

import json
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize(
    "name, kind",
    [("ddp.yaml", DistributedType.MULTI_GPU), ("deepspeed_zero2.yaml", DistributedType.DEEPSPEED),
     ("fsdp.yaml", DistributedType.FSDP)],
)
def test_config_loads_with_accelerate(name, kind):
    config = load_config_from_file(str(CONFIGS / name))
    assert config.distributed_type == kind
    assert config.num_machines == 1 and config.num_processes >= 1


def test_deepspeed_config_is_zero2_driven_by_the_training_options():
    config = load_config_from_file(str(CONFIGS / "deepspeed_zero2.yaml"))
    ds_file = Path(config.deepspeed_config["deepspeed_config_file"])
    assert ds_file.parts[0] == "configs"  # relative to the repository root, where the README launches from
    ds = json.loads((CONFIGS.parent / ds_file).read_text())
    assert ds["zero_optimization"]["stage"] == 2
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        assert ds[key] == "auto", key


def test_fsdp_wraps_a_block_class_diffusers_has():
    from diffusers.models.transformers import cogvideox_transformer_3d

    config = load_config_from_file(str(CONFIGS / "fsdp.yaml"))
    block = config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
    assert hasattr(cogvideox_transformer_3d, block)
    assert config.fsdp_config["fsdp_use_orig_params"]  # frozen base + trainable LoRA in one FSDP unit
