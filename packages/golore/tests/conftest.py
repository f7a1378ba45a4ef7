"""Shared fixtures for loralab-golore tests (importlib mode: helpers are fixtures, not imports)."""

import warnings

import pytest

from loralab.core.testing import make_lm_batches, tiny_llama


def _split_groups(model, **subspace):
    """[plain group, projected group of the 2-D *_proj weights] — the shape galore-torch users write."""
    proj = [p for n, p in model.named_parameters() if p.dim() == 2 and n.endswith("proj.weight")]
    ids = {id(p) for p in proj}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [dict(params=rest), dict(params=proj, **subspace)]


def _train(model, opt, batches):
    model.train()
    for b in batches:
        opt.zero_grad()
        model(**b).loss.backward()
        opt.step()


@pytest.fixture
def split_groups():
    return _split_groups


@pytest.fixture
def train():
    return _train


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def lm_batches():
    return make_lm_batches(6)


@pytest.fixture
def galore_torch():
    warnings.filterwarnings("ignore", category=FutureWarning)
    return pytest.importorskip("galore_torch")
