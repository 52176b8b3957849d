"""ModuleChanges: temporary edits to a model someone else owns are undone exactly (runs in every env)."""

from torch import nn

from lora_trainer.hosts.module_changes import ModuleChanges


class Embedder(nn.Module):
    """Like sgm's AbstractEmbModel: ``is_trainable`` is a property over ``_is_trainable``."""

    def __init__(self):
        super().__init__()
        self._is_trainable = False
        self.linear = nn.Linear(2, 2)
        self.checkpoint = True

    @property
    def is_trainable(self):
        return self._is_trainable

    @is_trainable.setter
    def is_trainable(self, value):
        self._is_trainable = value


def test_undo_restores_properties_attributes_forwards_flags_and_modes():
    model = Embedder().eval()
    model.linear.weight.requires_grad_(False)
    before = {k: v for k, v in vars(model).items() if not k.startswith("_")}
    changes = ModuleChanges()
    changes.remember_modes(model)
    changes.freeze(model)
    changes.set_attribute(model, "is_trainable", True)
    changes.set_attribute(model, "checkpoint", False)
    changes.wrap_forward(model.linear, lambda old: lambda x: old(x) * 2)
    model.train()
    assert model.is_trainable and not model.checkpoint and "forward" in vars(model.linear)
    assert not any(p.requires_grad for p in model.parameters())
    changes.undo()
    changes.undo()  # twice is harmless
    assert model.is_trainable is False and model._is_trainable is False and "is_trainable" not in vars(model)
    assert model.checkpoint is True and "forward" not in vars(model.linear)
    assert [p.requires_grad for p in model.linear.parameters()] == [False, True]
    assert not model.training and not model.linear.training
    assert {k: v for k, v in vars(model).items() if not k.startswith("_")} == before
    assert changes.empty
