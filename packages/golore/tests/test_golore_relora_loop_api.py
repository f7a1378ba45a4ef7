"""The public face a training loop drives ReLoRaModel through: collect_full_gradients and generator."""

import torch

from loralab.core.testing import make_lm_batches, tiny_llama
from loralab.golore import ReLoRaModel

RANK, GAP, STEPS = 4, 2, 6


def _train(use_public_api: bool, restore_at: int | None = None) -> list[float]:
    """A ReLoRA loop with GoLore's random projectors; ``restore_at``: rewind the generator there."""
    model = ReLoRaModel(
        tiny_llama(), r=RANK, lora_dropout=0.0, target_modules=["attn", "mlp"], seed=3
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses, saved = [], None
    for step, batch in enumerate(make_lm_batches(STEPS)):
        reset = step % GAP == 0
        if reset and use_public_api:
            model.collect_full_gradients()
        elif reset:
            model._config.forward_type = True  # the seed loop's private switch
        if step == restore_at:
            saved = model.generator.get_state()
            model.generator.manual_seed(12345)  # disturb, then restore: what a resume does
            model.generator.set_state(saved)
        loss = model(**batch).loss
        loss.backward()
        if reset:
            model.merge_and_reinit(opt, rand=True)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_public_switch_equals_the_seed_loop_and_generator_state_round_trips():
    reference = _train(use_public_api=False)
    assert _train(use_public_api=True) == reference
    assert _train(use_public_api=True, restore_at=2) == reference


def test_generator_is_the_projector_generator():
    model = ReLoRaModel(tiny_llama(), r=RANK, lora_dropout=0.0, target_modules=["mlp"], seed=7)
    assert isinstance(model.generator, torch.Generator)
    assert torch.equal(model.generator.get_state(), torch.Generator().manual_seed(7).get_state())
