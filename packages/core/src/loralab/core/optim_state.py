"""Refuse an optimizer state that belongs to another model, rank or mode before it is loaded.

``torch.optim.Optimizer.load_state_dict`` only checks that the number of parameters per group
matches: a state saved for another model (other widths), another LoRA / projection rank or another
mode loads without complaint, then fails at the first ``step()`` with a bare shape error, or silently
replaces the optimizer's settings by the saved ones (torch keeps the *saved* group hyper-parameters).
Every loralab optimizer calls :func:`check_state_dict` at the top of its ``load_state_dict``: it
compares the settings that fix the state's layout (``rank``, ``proj_type``, ``mode`` ...) and the
shape of every state tensor the optimizer knows how to predict, and raises naming the parameter,
both shapes, and the setting that differs (saved → this optimizer).

Example:
    >>> import torch
    >>> from loralab.core.optim_state import check_state_dict
    >>> small, big = torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4, 3))
    >>> saved = torch.optim.AdamW([small])
    >>> small.grad = torch.ones_like(small); saved.step()
    >>> opt = torch.optim.AdamW([big])
    >>> check_state_dict(opt, saved.state_dict(), lambda p, group: {"exp_avg": tuple(p.shape)})
    Traceback (most recent call last):
    ...
    ValueError: AdamW.load_state_dict: parameter 0 of param group 0 (shape (4, 3)): saved state 'exp_avg' has shape (2, 3), this optimizer expects (4, 3); the state was saved for another model, rank or mode: build the optimizer exactly as the one that saved it
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

__all__ = ["ExpectedShapes", "check_state_dict"]

ExpectedShapes = Callable[[Tensor, Mapping[str, Any]], Mapping[str, tuple[int, ...]]]
"""``(param, param_group) -> {state key: expected shape}`` for the keys the optimizer can predict;
keys it leaves out (step counters, per-partition entries) are not checked."""


def check_state_dict(
    optimizer: Optimizer,
    state_dict: Mapping[str, Any],
    expected_shapes: ExpectedShapes,
    *,
    settings: Sequence[str] = (),
) -> None:
    """Raise ``ValueError`` when ``state_dict`` cannot be the state of ``optimizer``.

    Args:
        optimizer: the optimizer about to load the state (its param groups are the reference).
        state_dict: what ``optimizer.state_dict()`` of the saving optimizer returned.
        expected_shapes: the shape each known state tensor must have for a parameter of this optimizer.
        settings: param-group keys that fix the layout of the state (``rank``, ``proj_type``,
            ``mode``); a saved value that differs from this optimizer's is refused rather than adopted.

    Raises:
        ValueError: another number of param groups or of parameters in a group, a differing setting
            (``rank 8 → 4``), or a state tensor of another shape; the message names the parameter.
    """
    name = f"{type(optimizer).__name__}.load_state_dict"
    advice = "build the optimizer exactly as the one that saved it"
    saved_groups = state_dict.get("param_groups")
    saved_state = state_dict.get("state")
    if not isinstance(saved_groups, list) or not isinstance(saved_state, Mapping):
        raise ValueError(
            f"{name}: not an optimizer state_dict (needs 'state' and 'param_groups'), "
            f"got keys {sorted(state_dict)!r}"
        )
    groups = optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise ValueError(
            f"{name}: the state has {len(saved_groups)} param group(s), this optimizer "
            f"{len(groups)}; the state was saved for another model or method setup: {advice}"
        )
    for gi, (saved, group) in enumerate(zip(saved_groups, groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"{name}: param group {gi} has {len(saved['params'])} parameter(s) in the state, "
                f"{len(group['params'])} in this optimizer; the state was saved for another model "
                f"(or other target layers): {advice}"
            )
        for key in settings:
            if key in saved and key in group and saved[key] != group[key]:
                raise ValueError(
                    f"{name}: param group {gi}: the state was saved with {key}={saved[key]!r}, this "
                    f"optimizer has {key}={group[key]!r} ({key} {saved[key]!r} → {group[key]!r}); "
                    f"the state's tensors only fit {key}={saved[key]!r}: build the optimizer with it, "
                    "or start without the state"
                )
        for pi, (sid, p) in enumerate(zip(saved["params"], group["params"])):
            entry = saved_state.get(sid)
            if not entry:
                continue
            expected = expected_shapes(p, group)
            for key, value in entry.items():
                if key not in expected or not isinstance(value, Tensor):
                    continue
                want = tuple(expected[key])
                if tuple(value.shape) != want:
                    raise ValueError(
                        f"{name}: parameter {pi} of param group {gi} (shape {tuple(p.shape)}): "
                        f"saved state {key!r} has shape {tuple(value.shape)}, this optimizer expects "
                        f"{want}; the state was saved for another model, rank or mode: {advice}"
                    )
