"""droppath's warnings (issue 27, item 8): one category, ``DropPathWarning``, attributed to the
line of the caller's code, wherever inside droppath and torch they are raised."""

import warnings

import pytest
import torch
from torch import nn

from droppath import DropPathWarning, accelerate, layer_drop


def _caught(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [w for w in caught if w.category is DropPathWarning]


class BiasAfter(nn.Module):
    """A block whose derived forward fails its check (fc2's bias after the site), so it warns
    on its first training call, from inside a ``torch.compiler.disable``d step."""

    def __init__(self):
        super().__init__()
        self.fc, self.fc2, self.drop_path = nn.Linear(4, 4), nn.Linear(4, 4), nn.Identity()

    def forward(self, x):
        return x + self.fc2(self.drop_path(self.fc(x)))


class CachingLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, cache=None):
        return x + self.lin(x)


def _stays_on_the_mask():
    model = nn.Sequential(BiasAfter())
    accelerate(model, [0.5])
    x = torch.randn(16, 4)
    return lambda: model.train()(x)


def _a_cache_in_training():
    model = nn.Module()
    model.layers = nn.ModuleList([CachingLayer()])
    layer_drop(model, 0.5, "uniform")
    x = torch.randn(8, 3, 4)
    return lambda: model.layers[0].train()(x, cache=object())


def _nothing_to_act_on():
    return lambda: accelerate(nn.Sequential(nn.Linear(4, 4)))


WARNINGS = {
    "stays on the mask": _stays_on_the_mask,
    "given a key/value cache in training": _a_cache_in_training,
    "found nothing to act on": _nothing_to_act_on,
}


@pytest.mark.parametrize("text", sorted(WARNINGS))
def test_a_warning_is_a_droppath_warning_pointed_at_the_callers_line(text):
    call = WARNINGS[text]()
    caught = _caught(call)
    assert len(caught) == 1 and text in str(caught[0].message)
    assert issubclass(DropPathWarning, UserWarning)
    # the line in this file that called the model or droppath, not torch/_dynamo's wrapper
    assert caught[0].filename == __file__


@pytest.mark.parametrize("text", sorted(WARNINGS))
def test_filters_by_category_and_by_the_callers_module_work(text):
    call = WARNINGS[text]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", module="torch")  # a filter on torch hides nothing
        warnings.filterwarnings("ignore", category=DropPathWarning)
        call()
    assert [w for w in caught if text in str(w.message)] == []
    call = WARNINGS[text]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", module=__name__)  # the caller's module
        call()
    assert [w for w in caught if text in str(w.message)] == []
    call = WARNINGS[text]()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=DropPathWarning)
        with pytest.raises(DropPathWarning, match=text):
            call()
