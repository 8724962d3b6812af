"""The training loops of the three ways of training (the linear head on cached features, fine-tuning
on cached activations, fine-tuning end to end on decoded photos): each mode, trained on the tiny
fixture with a fixed seed, gives bit for bit the weights, history and outputs that the loops as
they were before they shared one epoch loop give in the same run (tests/training/reference_loops.py,
patched in). Same machine, same process: exact equality, no stored digests that another CPU's
kernels would not reproduce."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.training import reference_loops
from tests.training.test_train import TINY_FINETUNE, TINY_PROBE
from tests.training.test_train import cache, photos, tiny  # noqa: F401 - its fixtures (the tiny data)
from tests.training.test_train import one_thread, tiny_backbone  # noqa: F401 - autouse there: used here too
from training import train as T
from training.config import TrainConfig

CONFIGS = {
    "probe": TINY_PROBE,  # train_head
    "cached-finetune": TINY_FINETUNE,  # train_head (LP-FT's first step), then finetune_cached
    "end-to-end": TINY_FINETUNE
    | dict(name="tiny-e2e", unfrozen_blocks="all", aug_views=0, epochs=2, init_head_from_probe=False),
}


def trained(
    config: TrainConfig, training_photos, cache_dir
) -> tuple[dict[str, torch.Tensor], list[dict], np.ndarray]:
    result = T.fit(config, training_photos, cache_dir=cache_dir, progress=False)
    state = {name: value.detach().clone() for name, value in result.model.state_dict().items()}
    return state, result.history, result.logits


@pytest.mark.parametrize("mode", CONFIGS)
def test_each_mode_trains_exactly_as_before_the_shared_loop(mode, photos, cache, monkeypatch):  # noqa: F811
    # one runtime for both runs: auto's speed trial can pick another runtime for the second run on
    # a loaded machine, and a runtime's last bits are not torch's (test_features_runtime checks them)
    monkeypatch.setenv("TRAINING_RUNTIME", "torch")
    config = TrainConfig(**CONFIGS[mode])
    T.fit(config, photos, cache_dir=cache, progress=False)  # fills the feature cache: both runs read it
    state, history, logits = trained(config, photos, cache)
    with monkeypatch.context() as patch:
        for name in ("train_head", "finetune_cached", "finetune_end_to_end"):
            patch.setattr(T, name, getattr(reference_loops, name))
        ref_state, ref_history, ref_logits = trained(config, photos, cache)
    assert [h for h in history if "best_epoch" not in h], "nothing was trained"
    assert history == ref_history
    assert state.keys() == ref_state.keys()
    changed = [name for name in state if not torch.equal(state[name], ref_state[name])]
    assert not changed, f"{mode}: weights differ from the reference loop's: {changed[:5]}"
    assert np.array_equal(logits, ref_logits)
