"""The tab speaks in its own labels: config keys in messages and help texts become the fields the user sees.

The engine's errors and option docs name config keys (``train_data_dir``, ``max_train_steps``), which is right
for the CLI and YAML users. In the tab the user filled "Dataset folder" and "Max train steps", so every text the
tab shows goes through ``TabWording.say``. Pure Python (no gradio).
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, Mapping

# The keys with a row of their own at the top of the tab, under the labels the tab gives them.
OWN_ROW_LABELS = {
    "train_data_dir": "Dataset folder",
    "base_model": "Base model",
    "output_name": "Output name",
    "output_dir": "Output folder",
}


class TabWording:
    """Replaces whole-word config keys with the tab's quoted labels (``"Dataset folder"``)."""

    def __init__(self, labels: Mapping[str, str]) -> None:
        # Only identifiers (with an underscore): "seed", "resolution" or "optimizer" in prose are plain words.
        self.labels: Dict[str, str] = {k: v for k, v in labels.items() if "_" in k}
        keys = sorted(self.labels, key=len, reverse=True)  # longest first: unet_lr before lr
        # Not inside a longer identifier, a path or a file name ("state-10", "output_dir/logs" stays readable).
        self._pattern = re.compile(r"(?<![\w.-])(" + "|".join(map(re.escape, keys)) + r")(?![\w-])") if keys else None

    @classmethod
    def for_fields(cls, fields: Iterable[object]) -> "TabWording":
        """From the form's generated fields (``key`` and ``label`` attributes) plus the own-row labels."""
        labels = dict(OWN_ROW_LABELS)
        labels.update({f.key: f.label for f in fields})  # type: ignore[attr-defined]
        return cls(labels)

    def say(self, text: str) -> str:
        """``text`` with every config key replaced by its quoted label; other words untouched."""
        if not text or self._pattern is None:
            return text
        return self._pattern.sub(lambda m: f'"{self.labels[m.group(1)]}"', text)
