"""Reversible edits to a live model that someone else owns (the host's ``shared.sd_model``).

Training changes a host model in three ways: it freezes parameters, it sets instance attributes (a wrapped
``forward``, a checkpointing flag) and it may switch train/eval modes. ``ModuleChanges`` records the state
before each change and ``undo()`` puts every bit of it back, in reverse order, so that afterwards the model's
flags, modes and attributes are exactly as they were (weights are never written).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

from torch import nn

_MISSING = object()


class _PropertyValue:
    """The previous value of an attribute the class defines as a property (set and restored through it)."""

    def __init__(self, value: Any):
        self.value = value


class ModuleChanges:
    """A log of temporary changes to modules, undone together."""

    def __init__(self) -> None:
        self._attributes: List[Tuple[nn.Module, str, Any]] = []  # (module, name, previous __dict__ value)
        self._requires_grad: Dict[int, Tuple[nn.Parameter, bool]] = {}
        self._modes: Dict[int, Tuple[nn.Module, bool]] = {}

    @property
    def empty(self) -> bool:
        return not (self._attributes or self._requires_grad or self._modes)

    def set_attribute(self, module: nn.Module, name: str, value: Any) -> None:
        """Set an instance attribute (e.g. ``forward``), remembering whether the instance had its own before.
        Attributes the class defines as properties (sgm's ``is_trainable``) go through their setter."""
        if isinstance(getattr(type(module), name, None), property):
            self._attributes.append((module, name, _PropertyValue(getattr(module, name))))
            setattr(module, name, value)
            return
        self._attributes.append((module, name, module.__dict__.get(name, _MISSING)))
        object.__setattr__(module, name, value) if name == "forward" else setattr(module, name, value)

    def wrap_forward(self, module: nn.Module, make: Callable[[Callable], Callable]) -> None:
        """Replace ``module.forward`` on the instance by ``make(current forward)``."""
        self.set_attribute(module, "forward", make(module.forward))

    def freeze(self, root: nn.Module) -> None:
        """``requires_grad=False`` on every parameter of ``root`` (the flags are restored by ``undo``)."""
        for param in root.parameters():
            self._requires_grad.setdefault(id(param), (param, param.requires_grad))
            param.requires_grad_(False)

    def remember_modes(self, root: nn.Module) -> None:
        """Record train/eval of every module under ``root`` so ``undo`` can restore them."""
        for module in root.modules():
            self._modes.setdefault(id(module), (module, module.training))

    def undo(self) -> None:
        """Restore everything recorded, newest first; safe to call twice."""
        while self._attributes:
            module, name, previous = self._attributes.pop()
            if isinstance(previous, _PropertyValue):
                setattr(module, name, previous.value)
            elif previous is _MISSING:
                module.__dict__.pop(name, None)
            else:
                object.__setattr__(module, name, previous)
        for param, flag in self._requires_grad.values():
            param.requires_grad_(flag)
        self._requires_grad.clear()
        for module, training in self._modes.values():
            module.training = training  # per module: .train() would also change the children
        self._modes.clear()
