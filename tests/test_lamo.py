"""LaMo: predictor, predictor loss, Motion Drift Loss, trainer, one guided scheduler step."""

import pytest
import torch
from diffusers import CogVideoXPipeline
from torch import nn

from tsa.lamo import (
    LaMoTrainer,
    MotionDriftLoss,
    MotionPredictor,
    drift_timestep_weight,
    enable_motion_guidance,
    motion_guidance_loss,
    predictor_loss,
)
from tsa.models import get_family
from tsa.models.cogvideox import cogvideox_scheduler
from tsa.models.tiny import TINY_LATENT_CHANNELS, TINY_TEXT_DIM

C, TEXT = TINY_LATENT_CHANNELS, TINY_TEXT_DIM


def tiny_predictor(seed: int = 0, **kwargs) -> MotionPredictor:
    torch.manual_seed(seed)
    return MotionPredictor(in_channels=C, channels=16, num_blocks=2, cond_dim=16, text_dim=TEXT, **kwargs)


def randomize_zero_layers(predictor: MotionPredictor, seed: int = 0) -> MotionPredictor:
    """Give the zero-initialised head and FiLM layers random weights, as after some training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in [predictor.head] + [block.film for block in predictor.blocks]:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.1)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen) * 0.1)
    return predictor


def translating_clips(batch: int, frames: int = 4, size: int = 8, gen=None) -> torch.Tensor:
    """(B, F, C, size, size) random fields moving one latent pixel right per frame."""
    base = torch.randn(batch, C, size, size, generator=gen)
    return torch.stack([base.roll(shifts=i, dims=-1) for i in range(frames)], dim=1)


def drift_loss_fp64(x0_pred, x0, lag, eps):
    """Loop reference of LaMo's L_drift (docs/method.md) in float64."""
    x0_pred, x0 = x0_pred.double(), x0.double()
    terms = []
    for b in range(x0.shape[0]):
        for i in range(x0.shape[1] - lag):
            mu_hat = (x0_pred[b, i + lag] - x0_pred[b, i]).mean(dim=(1, 2))
            mu = (x0[b, i + lag] - x0[b, i]).mean(dim=(1, 2))
            terms.append(((mu_hat - mu) ** 2).sum() / max(float((mu**2).sum()), eps))
    return torch.stack(terms).mean()


# ----------------------------------------------------------------------------------------- drift loss


@pytest.mark.parametrize("lag", [1, 2, 3])
def test_drift_loss_matches_fp64_loop_reference(lag):
    gen = torch.Generator().manual_seed(lag)
    x0 = torch.randn(3, 5, 3, 5, 7, generator=gen)
    x0_pred = x0 + 0.3 * torch.randn(x0.shape, generator=gen)
    x0[1] = x0[1, :1]  # a static clip in the batch: the eps guard is exercised
    loss = MotionDriftLoss(lag=lag, eps=1e-4)(x0_pred, x0)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), drift_loss_fp64(x0_pred, x0, lag, 1e-4), rtol=1e-5, atol=1e-6)


def test_drift_loss_denominator_floor_defaults_to_lamo_code():
    """eps = 1e-8 (LaMo's code): a clip whose clean drift has ||mu*||^2 ~ 1e-6 is normalised by it, not by 1e-4."""
    x0 = torch.zeros(1, 4, C, 4, 4)
    x0[:, 2:, 0] = 1e-3  # mu* = (1e-3, 0, ...) for the pairs (0, 2) and (1, 3)
    x0_pred = x0 + 1e-3 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    assert MotionDriftLoss().eps == 1e-8
    assert LaMoTrainer(tiny_predictor(), total_steps=1, noise_prob=0).drift.eps == 1e-8
    expected = drift_loss_fp64(x0_pred, x0, 2, 1e-8)
    torch.testing.assert_close(MotionDriftLoss()(x0_pred, x0).double(), expected, rtol=1e-4, atol=0)
    floored = MotionDriftLoss(eps=1e-4)(x0_pred, x0).double()  # the earlier default, still an option
    torch.testing.assert_close(floored, drift_loss_fp64(x0_pred, x0, 2, 1e-4), rtol=1e-4, atol=0)
    assert expected > 50 * floored


def test_drift_loss_zero_when_equal_and_positive_otherwise():
    x0 = torch.randn(2, 4, C, 6, 6)
    drift = MotionDriftLoss()
    assert drift(x0.clone(), x0).item() == 0.0
    assert drift(x0 + 0.01 * torch.randn_like(x0), x0).item() > 0.0


def test_drift_loss_finite_on_static_clip_and_single_frame():
    static = torch.randn(2, 1, C, 6, 6).expand(2, 5, C, 6, 6)
    x0_pred = (static + 0.1 * torch.randn_like(static)).requires_grad_(True)
    loss = MotionDriftLoss()(x0_pred, static)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0 and torch.isfinite(x0_pred.grad).all()

    single = torch.randn(2, 1, C, 6, 6, requires_grad=True)
    loss = MotionDriftLoss()(single, single.detach() + 1)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(single.grad, torch.zeros_like(single))


def test_drift_loss_gradient_reaches_only_the_denoiser():
    denoiser = nn.Conv3d(C, C, 3, padding=1)
    clean_source = torch.randn(2, C, 5, 6, 6, requires_grad=True)  # stands in for the VAE encoding
    x0 = clean_source.transpose(1, 2)
    noisy = x0.detach() + torch.randn_like(x0)  # only the target path leads back to clean_source
    x0_pred = denoiser(noisy.transpose(1, 2)).transpose(1, 2)
    trainer = LaMoTrainer(tiny_predictor(), total_steps=10, noise_scheduler=cogvideox_scheduler())
    loss = trainer.drift_loss(x0_pred, x0, torch.tensor([100, 300]))
    loss.backward()
    assert denoiser.weight.grad is not None and denoiser.weight.grad.abs().sum() > 0
    assert clean_source.grad is None
    assert all(p.grad is None for p in trainer.predictor.parameters())


def test_drift_timestep_weight():
    t = torch.tensor([0, 500, 999, 1200])
    expected = (1.0 + 0.75 + (1 - 0.999**2) + 0.0) / 4
    assert drift_timestep_weight(t).item() == pytest.approx(expected, rel=1e-6)
    x0 = torch.randn(2, 4, C, 6, 6)
    x0_pred = x0 + torch.randn_like(x0)
    trainer = LaMoTrainer(tiny_predictor(), total_steps=10, noise_scheduler=cogvideox_scheduler())
    t = torch.tensor([250, 750])
    expected = drift_timestep_weight(t) * MotionDriftLoss(lag=2)(x0_pred, x0)
    torch.testing.assert_close(trainer.drift_loss(x0_pred, x0, t), expected)


def test_drift_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="x0_pred"):
        MotionDriftLoss()(torch.randn(2, 4, C, 6), torch.randn(2, 4, C, 6))
    with pytest.raises(ValueError, match="same shape"):
        MotionDriftLoss()(torch.randn(2, 4, C, 6, 6), torch.randn(2, 5, C, 6, 6))
    with pytest.raises(ValueError, match="lag"):
        MotionDriftLoss(lag=0)


# ----------------------------------------------------------------------------------------- predictor


def test_fresh_predictor_predicts_no_motion_and_ignores_the_prompt():
    predictor = tiny_predictor()
    z = torch.randn(2, 3, C, 8, 8)
    assert torch.equal(predictor(z, torch.randn(2, 7, TEXT)), torch.zeros_like(z))
    assert all(block.film.weight.abs().sum() == 0 for block in predictor.blocks)


def test_predictor_pools_every_position_by_default_as_lamo_code():
    """LaMo's released code mean-pools all positions (padding included) in training and sampling."""
    predictor = randomize_zero_layers(tiny_predictor()).eval()
    assert predictor.config.prompt_pooling == "all"
    z = torch.randn(2, 3, C, 8, 8)
    embeds = torch.randn(2, 6, TEXT)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    garbage = embeds.clone()
    garbage[mask == 0] = 100.0
    with torch.no_grad():
        out = predictor(z, embeds, mask)
        torch.testing.assert_close(out, predictor(z, embeds))  # the mask does not change the pooling
        assert not torch.allclose(predictor(z, garbage, mask), out)  # padding positions are pooled
        cond = nn.functional.gelu(predictor.text_proj(embeds.mean(dim=1)))
        torch.testing.assert_close(predictor.encode_prompt(embeds, mask, 2), cond)
    with pytest.raises(ValueError, match="prompt_pooling"):
        tiny_predictor(prompt_pooling="cls")


def test_predictor_pools_only_valid_tokens_and_drops_prompts():
    predictor = randomize_zero_layers(tiny_predictor(prompt_pooling="tokens")).eval()
    z = torch.randn(2, 3, C, 8, 8)
    embeds = torch.randn(2, 6, TEXT)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    garbage = embeds.clone()
    garbage[mask == 0] = 100.0
    with torch.no_grad():
        out = predictor(z, embeds, mask)
        torch.testing.assert_close(predictor(z, garbage, mask), out)
        assert not torch.allclose(predictor(z, embeds), out)  # no mask: every token pooled
        null = predictor(z, None)
        assert not torch.allclose(null, out)
    dropping = randomize_zero_layers(tiny_predictor(prompt_dropout=1.0, prompt_pooling="tokens")).train()
    with torch.no_grad():
        torch.testing.assert_close(dropping(z, embeds, mask), null)


def test_predictor_rejects_bad_input():
    predictor = tiny_predictor()
    with pytest.raises(ValueError, match="latents"):
        predictor(torch.randn(2, 3, C + 1, 8, 8))
    with pytest.raises(ValueError, match="text_dim"):
        predictor(torch.randn(2, 3, C, 8, 8), torch.randn(2, 5, TEXT + 1))
    with pytest.raises(ValueError, match="attention_mask"):
        predictor(torch.randn(2, 3, C, 8, 8), torch.randn(2, 5, TEXT), torch.ones(2, 4))
    with pytest.raises(ValueError, match="divisible"):
        MotionPredictor(channels=20)


def test_predictor_save_pretrained_round_trip(tmp_path):
    predictor = randomize_zero_layers(tiny_predictor()).eval()
    predictor.save_pretrained(tmp_path)
    loaded = MotionPredictor.from_pretrained(tmp_path).eval()
    for key in ("in_channels", "channels", "num_blocks", "cond_dim", "text_dim", "groups", "prompt_dropout"):
        assert loaded.config[key] == predictor.config[key], key
    for name, tensor in predictor.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    z, embeds = torch.randn(1, 3, C, 8, 8), torch.randn(1, 4, TEXT)
    with torch.no_grad():  # same weights; the CPU may pick another convolution algorithm for the loaded copy
        torch.testing.assert_close(loaded(z, embeds), predictor(z, embeds))


# ----------------------------------------------------------------------------------------- predictor objective


def test_predictor_loss_of_zero_prediction_and_detached_inputs():
    predictor = tiny_predictor()
    latents = torch.randn(2, 4, C, 6, 6, requires_grad=True)
    loss = predictor_loss(predictor, latents, alpha=0.3, noise_prob=1.0,
                          alphas_cumprod=cogvideox_scheduler().alphas_cumprod)
    dz = latents[:, 1:] - latents[:, :-1]
    # a fresh predictor outputs 0 even on noised input: MSE = mean dz^2, cos = 0
    torch.testing.assert_close(loss, dz.detach().square().mean() + 0.3)
    loss.backward()
    assert latents.grad is None
    assert predictor.head.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="lag"):
        predictor_loss(predictor, torch.randn(2, 1, C, 6, 6))
    with pytest.raises(ValueError, match="needs the model's noise schedule"):
        predictor_loss(predictor, latents)  # noise augmentation without a schedule
    with pytest.raises(ValueError, match="needs the model's noise_scheduler"):
        LaMoTrainer(predictor, total_steps=3)


def test_predictor_learns_a_constant_translation():
    gen = torch.Generator().manual_seed(0)
    predictor = tiny_predictor()
    trainer = LaMoTrainer(predictor, lr=1e-2, total_steps=40, noise_scheduler=cogvideox_scheduler())
    held_out, held_out_prompts = translating_clips(16, gen=gen), torch.randn(16, 5, TEXT, generator=gen)

    def held_out_loss():
        predictor.eval()
        with torch.no_grad():
            loss = predictor_loss(predictor, held_out, held_out_prompts, noise_prob=0.0).item()
        predictor.train()
        return loss

    zero_loss = held_out_loss()  # a fresh predictor predicts zero motion
    for _ in range(40):
        trainer.step(translating_clips(4, gen=gen), torch.randn(4, 5, TEXT, generator=gen), generator=gen)
    assert held_out_loss() < 0.4 * zero_loss


def test_trainer_checkpoint_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(0)
    batches = [(translating_clips(2, gen=gen), torch.randn(2, 5, TEXT, generator=gen)) for _ in range(5)]
    trainer = LaMoTrainer(
        tiny_predictor(), lr=1e-3, total_steps=5, warmup_steps=1, noise_scheduler=cogvideox_scheduler()
    )
    for latents, prompts in batches[:3]:
        trainer.step(latents, prompts, generator=torch.Generator().manual_seed(1))
    trainer.save(tmp_path)
    resumed = LaMoTrainer.load(tmp_path)
    assert resumed.lr_scheduler.get_last_lr() == trainer.lr_scheduler.get_last_lr()
    torch.testing.assert_close(resumed.alphas_cumprod, cogvideox_scheduler().alphas_cumprod.float())
    for latents, prompts in batches[3:]:
        for t in (trainer, resumed):
            torch.manual_seed(2)  # prompt dropout draws from the global generator
            t.step(latents, prompts, generator=torch.Generator().manual_seed(1))
    for a, b in zip(trainer.predictor.parameters(), resumed.predictor.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert trainer.lr_scheduler.get_last_lr() == resumed.lr_scheduler.get_last_lr() == [0.0]


def test_tsa_train_lamo_uses_the_models_noise_schedule():
    from types import SimpleNamespace

    from diffusers import CogVideoXDPMScheduler

    from tsa.cli.options import parse_config
    from tsa.training.loop import build_lamo

    transformer = get_family("cogvideox").tiny_components()["transformer"]
    default = cogvideox_scheduler()
    five_b = CogVideoXDPMScheduler.from_config(default.config, snr_shift_scale=1.0)  # CogVideoX-5B's schedule
    objective = SimpleNamespace(transformer=transformer, scheduler=five_b)
    accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=1)
    trainer = build_lamo(parse_config(["--align", "lamo", "--max-steps", "3"]), objective, accelerator)
    torch.testing.assert_close(trainer.alphas_cumprod, five_b.alphas_cumprod.float())
    assert not torch.allclose(trainer.alphas_cumprod, default.alphas_cumprod.float())
    assert build_lamo(parse_config(["--align", "mtsa"]), objective, accelerator) is None


def test_trainer_step_updates_only_the_predictor():
    denoiser = nn.Linear(TEXT, TEXT)
    prompts = denoiser(torch.randn(2, 5, TEXT))
    latents = torch.randn(2, 3, C, 6, 6, requires_grad=True)
    trainer = LaMoTrainer(tiny_predictor(), total_steps=3, noise_scheduler=cogvideox_scheduler())
    before = trainer.predictor.head.weight.clone()
    loss = trainer.step(latents, prompts)
    assert isinstance(loss, float) and loss > 0
    assert not torch.equal(trainer.predictor.head.weight, before)
    assert latents.grad is None and denoiser.weight.grad is None
    with pytest.raises(TypeError, match="MotionPredictor"):
        LaMoTrainer(nn.Linear(2, 2))


# ----------------------------------------------------------------------------------------- one guided step


@pytest.fixture(scope="module")
def tiny_pipe():
    return CogVideoXPipeline(**get_family("cogvideox").tiny_components())


def test_one_guided_step_lowers_the_guidance_loss(tiny_pipe):
    pipe = tiny_pipe
    pipe.scheduler.set_timesteps(10)
    predictor = randomize_zero_layers(tiny_predictor())
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 3, C, 8, 8, generator=gen)
    v_hat = torch.randn(x_t.shape, generator=gen)
    t = pipe.scheduler.timesteps[5]

    def step():
        return pipe.scheduler.step(v_hat, None, t, None, x_t, generator=torch.Generator().manual_seed(3))

    unguided_latents, unguided_x0 = step()
    assert predictor.training
    with enable_motion_guidance(pipe, predictor, scale=15.0) as guidance:
        assert not predictor.training
        with torch.no_grad():  # as in the pipeline's loop
            pipe.encode_prompt(["a ball falls", "a red cube slides left"], "", device="cpu")
            guided_latents, guided_x0 = step()
    assert [index for index, _ in guidance.history] == [5]
    token_counts = [len(pipe.tokenizer(text).input_ids) for text in ("a ball falls", "a red cube slides left")]
    assert guidance.prompt_mask.sum(dim=1).tolist() == token_counts
    with torch.no_grad():
        before = motion_guidance_loss(predictor, unguided_x0, guidance.prompt_embeds, 1, guidance.prompt_mask)
        after = motion_guidance_loss(predictor, guided_x0, guidance.prompt_embeds, 1, guidance.prompt_mask)
    assert guidance.history[0][1] == pytest.approx(before.item(), rel=1e-6)
    assert after < before
    assert not torch.equal(guided_latents, unguided_latents)
    assert "step" not in vars(pipe.scheduler) and "encode_prompt" not in vars(pipe)  # removed
    assert predictor.training  # its mode is restored
    enable_motion_guidance(pipe, predictor.eval()).remove()
    assert not predictor.training


@pytest.mark.parametrize("rho, steps, floor, ceil", [(0.8, 50, 9, 10), (0.8, 5, 0, 1), (0.4, 5, 3, 3), (1.0, 50, 0, 0),
                                                      (0.0, 50, 50, 50), (0.5, 7, 3, 4)])
def test_first_guided_step_is_lamo_codes_int(tiny_pipe, rho, steps, floor, ceil):
    """LaMo's code guides from int((1 - rho) * S): 41 of 50 steps at rho = 0.8 (ceil: 40)."""
    predictor = tiny_predictor()
    with enable_motion_guidance(tiny_pipe, predictor, rho=rho) as guidance:
        assert guidance.first_guided_step(steps) == floor == int((1 - rho) * steps)
    with enable_motion_guidance(tiny_pipe, predictor, rho=rho, start_rounding="ceil") as guidance:
        assert guidance.first_guided_step(steps) == ceil
    with pytest.raises(ValueError, match="start_rounding"):
        enable_motion_guidance(tiny_pipe, predictor, start_rounding="round")


def test_guidance_rejects_bad_arguments(tiny_pipe):
    pipe = tiny_pipe
    predictor = tiny_predictor()
    with pytest.raises(ValueError, match="rho"):
        enable_motion_guidance(pipe, predictor, rho=1.5)
    with pytest.raises(ValueError, match="in_channels"):
        enable_motion_guidance(pipe, MotionPredictor(in_channels=16, channels=16, num_blocks=1, text_dim=TEXT))
    with pytest.raises(TypeError, match="MotionPredictor"):
        enable_motion_guidance(pipe, nn.Linear(2, 2))
    handle = enable_motion_guidance(pipe, predictor)
    with pytest.raises(ValueError, match="already"):
        enable_motion_guidance(pipe, predictor)
    handle.remove()
    handle.remove()
    enable_motion_guidance(pipe, predictor).remove()
