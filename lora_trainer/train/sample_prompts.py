"""Sample-image prompts in sd-scripts' format (``library/train_util.py``: ``line_to_prompt_dict``, ``load_prompts``).

A prompt line is the prompt, then options each introduced by `` --``: ``--n`` negative prompt, ``--w`` width,
``--h`` height, ``--s`` steps (1-1000), ``--l`` guidance scale, ``--d`` seed, ``--ss`` sampler. For example
``a cat on a sofa --n blurry --w 768 --h 512 --d 1 --s 28 --l 6``. Options sd-scripts reads for other model
types or features (``--g`` guidance, ``--cn`` ControlNet image, ``--ctr``, ``--rcfg``, ``--fs``) are accepted
and ignored, so a prompt file made for sd-scripts works unchanged; any other option is an error.

A prompt file is ``.txt`` (one prompt line per line; blank lines and lines starting with ``#`` skipped),
``.json`` (a list of prompt lines or of objects with sd-scripts' keys: prompt, negative_prompt, width, height,
sample_steps, scale, seed, sample_sampler) or ``.toml`` (a ``[prompt]`` table of defaults and a
``[[prompt.subset]]`` table per prompt).

Two defaults differ from sd-scripts on purpose: the size defaults to the training resolution (not 512, which
SDXL renders badly), and a prompt without ``--d`` gets the seed ``seed + its index`` (sd-scripts draws a random
one), so the same prompt looks comparable from one sampling to the next.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from lora_trainer.config import SAMPLE_SAMPLERS, is_prompt_file
from lora_trainer.errors import ConfigError
from lora_trainer.io.text_files import read_text

DEFAULT_STEPS = 30
DEFAULT_SCALE = 7.5
MIN_SIDE = 64
IGNORED_OPTIONS = ("g", "cn", "ctr", "rcfg", "fs")  # sd-scripts options for other models/features
# sd-scripts' JSON/TOML keys -> ours; the ignored ones as above.
DICT_KEYS = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "width": "width",
    "height": "height",
    "sample_steps": "steps",
    "scale": "scale",
    "seed": "seed",
    "sample_sampler": "sampler",
}
IGNORED_DICT_KEYS = ("guidance_scale", "controlnet_image", "cfg_trunc_ratio", "renorm_cfg", "flow_shift", "enum")
# --flag -> (field, converter); "--s 20" is steps (clamped as sd-scripts does), "--ss euler" the sampler.
_FLAGS: Dict[str, Tuple[str, Callable[[str], object]]] = {
    "w": ("width", int),
    "h": ("height", int),
    "d": ("seed", int),
    "s": ("steps", lambda v: max(1, min(1000, int(v)))),
    "l": ("scale", float),
    "n": ("negative_prompt", str),
    "ss": ("sampler", str),
}


@dataclass(frozen=True)
class SamplePrompt:
    """One sample image to render; None fields take the run's defaults (see ``resolve``)."""

    prompt: str
    negative_prompt: str = ""
    width: Optional[int] = None
    height: Optional[int] = None
    steps: int = DEFAULT_STEPS
    scale: float = DEFAULT_SCALE
    seed: Optional[int] = None
    sampler: Optional[str] = None

    def resolve(self, index: int, resolution: int, seed: int, sampler: str) -> "SamplePrompt":
        """Every field set: size (multiples of 8, at least 64, default ``resolution``), seed (default
        ``seed + index``) and sampler (default ``sampler``)."""

        def side(value: Optional[int]) -> int:
            value = resolution if value is None else value
            return max(MIN_SIDE, value - value % 8)

        return replace(
            self,
            width=side(self.width),
            height=side(self.height),
            seed=seed + index if self.seed is None else self.seed,
            sampler=self.sampler or sampler,
        )


def _checked_sampler(value: Optional[str], where: str) -> Optional[str]:
    if value is None:
        return None
    name = value.strip().lower()
    if name not in SAMPLE_SAMPLERS:
        raise ConfigError(f"{where}: sampler {value!r} is not known; choose one of {', '.join(SAMPLE_SAMPLERS)}.")
    return name


def parse_prompt_line(line: str, where: str = "sample_prompts") -> SamplePrompt:
    """A prompt line (see the module docstring) as a ``SamplePrompt``; ``where`` names it in errors."""
    prompt, *options = line.split(" --")
    values: dict = {"prompt": prompt.strip()}
    for option in options:
        flag, _, value = option.strip().partition(" ")
        if flag.lower() in _FLAGS:
            name, convert = _FLAGS[flag.lower()]
            try:
                values[name] = convert(value.strip())
            except ValueError:
                raise ConfigError(f"{where}: --{flag} {value.strip()!r} is not a number.") from None
        elif flag.lower() not in IGNORED_OPTIONS:
            raise ConfigError(
                f"{where}: unknown option --{flag} in {line!r}; the options are --n (negative prompt), --w, --h, "
                "--s (steps), --l (guidance scale), --d (seed), --ss (sampler)."
            )
    values["sampler"] = _checked_sampler(values.get("sampler"), where)
    return SamplePrompt(**values)


def prompt_from_mapping(raw: Mapping[str, Any], where: str) -> SamplePrompt:
    """A JSON/TOML prompt object with sd-scripts' keys."""
    values: dict = {}
    for key, value in raw.items():
        if key in IGNORED_DICT_KEYS or key == "subset":
            continue
        if key not in DICT_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}; the keys are {', '.join(DICT_KEYS)}.")
        values[DICT_KEYS[key]] = value
    if not isinstance(values.get("prompt"), str):
        raise ConfigError(f"{where}: each prompt needs a 'prompt' text.")
    try:
        for name, convert in (("width", int), ("height", int), ("steps", int), ("scale", float), ("seed", int)):
            if values.get(name) is not None:
                values[name] = convert(values[name])
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {name} must be a number, got {values[name]!r}.") from None
    values["negative_prompt"] = str(values.get("negative_prompt") or "")
    values["sampler"] = _checked_sampler(values.get("sampler"), where)
    return SamplePrompt(**values)


def _load_toml(text: str, path: str) -> Any:
    try:
        import tomllib
    except ImportError:  # Python 3.10 (the WebUI's)
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError(f"{path}: reading .toml prompt files needs Python 3.11 or the tomli package.") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None


def read_prompt_file(path: str) -> List[SamplePrompt]:
    """The prompts of a .txt, .json or .toml prompt file (see the module docstring)."""
    try:
        text = read_text(path, ConfigError)
    except FileNotFoundError:
        raise ConfigError(f"sample_prompts: prompt file not found: {path}") from None
    lower = path.lower()
    if lower.endswith(".txt"):
        lines = [line.strip() for line in text.splitlines()]
        return [
            parse_prompt_line(line, f"{path}, line {i + 1}")
            for i, line in enumerate(lines)
            if line and not line.startswith("#")
        ]
    if lower.endswith(".json"):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    else:
        data = _load_toml(text, path)
        defaults = dict(data.get("prompt", {}))
        items = [{**defaults, **subset} for subset in defaults.pop("subset", [])]
    if not isinstance(items, list):
        raise ConfigError(f"{path}: expected a list of prompts.")
    return [
        parse_prompt_line(item, f"{path}, prompt {i + 1}")
        if isinstance(item, str)
        else prompt_from_mapping(item, f"{path}, prompt {i + 1}")
        for i, item in enumerate(items)
    ]


def load_sample_prompts(items: Sequence[str]) -> List[SamplePrompt]:
    """``sample_prompts`` as prompts: each item a prompt line or a prompt file; raises ``ConfigError`` naming
    the file, line and option at fault."""
    prompts: List[SamplePrompt] = []
    for i, item in enumerate(items):
        if is_prompt_file(item):
            prompts += read_prompt_file(item)
        else:
            prompts.append(parse_prompt_line(item, f"sample_prompts[{i}]"))
    if items and not prompts:
        raise ConfigError("sample_prompts: the prompt files hold no prompts.")
    return prompts
