"""``python -m lora_trainer download MODEL...``: fill the Hugging Face cache now, with the same files a run
would fetch on first use, e.g. on a machine with internet before copying the cache to one without.

MODEL is a captioner's name (``blip``, ``clip``, ``wd14``: its default weights), ``base`` (the default SD 1.5
base model), a Hub repository ``owner/name[@revision]`` (a diffusers SD model or a transformers causal LM,
told apart by its files), or one file ``owner/name/file.safetensors``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Collection, List, Optional

from lora_trainer.errors import LoraTrainerError
from lora_trainer.hub.files import MissingRepoFiles

CAPTIONERS = ("blip", "clip", "wd14")
BASE = "base"


class ModelRepoFiles:
    """The files of a model repository of either kind training reads: a diffusers SD repository (it has
    ``model_index.json``) or a transformers causal LM (``config.json`` at its root)."""

    label = "model"

    def plan(self, names: Collection[str], cached: Collection[str] = ()) -> List[str]:
        from lora_trainer.models.hub_models import MODEL_INDEX, DiffusersSdFiles

        if MODEL_INDEX in names:
            return DiffusersSdFiles().plan(names, cached)
        if "config.json" in names:
            from lora_trainer.text.model import CausalLmFiles

            return CausalLmFiles().plan(names, cached)
        raise MissingRepoFiles(["model_index.json (a diffusers model) or config.json (a transformers model)"])

    def describe(self) -> str:
        return "a diffusers SD model or a transformers causal LM"

    def include_patterns(self) -> List[str]:
        return ["*.json", "*.safetensors", "*.txt", "tokenizer*"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora_trainer download",
        description=__doc__.replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The cache is HF_HUB_CACHE (default HF_HOME/hub, default ~/.cache/huggingface/hub). Copy that folder "
        "to another machine (or point HF_HOME at a copy) and runs there find the models without a network; set "
        "HF_HUB_OFFLINE=1 there to forbid any download. Gated repositories need HF_TOKEN.",
    )
    parser.add_argument(
        "models", nargs="+", metavar="MODEL", help="blip | clip | wd14 | base | owner/name[@revision] | owner/name/file"
    )
    return parser


def fetch_model(item: str) -> str:
    """The local path of ``item`` (see the module doc), downloading it when the cache lacks it."""
    from lora_trainer.hub.fetch import fetch_file, fetch_repo_files
    from lora_trainer.hub.reference import parse_hub_reference

    if item in CAPTIONERS:
        from lora_trainer.caption.locate import resolve_weights_folder

        if item == "blip":
            from lora_trainer.caption.blip import BLIP_WEIGHTS as spec
        elif item == "clip":
            from lora_trainer.caption.clip_interrogator import CLIP_WEIGHTS as spec
        else:
            from lora_trainer.caption.wd14 import WD14_WEIGHTS as spec
        return resolve_weights_folder(spec, None)
    if item == BASE:
        from lora_trainer.models.hub_models import DEFAULT_BASE_MODEL, resolve_base_model

        return resolve_base_model(DEFAULT_BASE_MODEL)[0]
    ref = parse_hub_reference(item)
    if ref is None:
        raise LoraTrainerError(
            f"{item!r} is not a model name ({', '.join((*CAPTIONERS, BASE))}) or a Hub id (owner/name[@revision], "
            "owner/name/file)."
        )
    if ref.filename:  # with a checkpoint's <name>.yaml when the repository has one (its original config)
        beside = [ref.filename.rsplit(".", 1)[0] + ".yaml"]
        return fetch_file(ref, "file", beside=beside, as_given=item)
    return fetch_repo_files(ref, ModelRepoFiles(), as_given=item)


def main(argv: Optional[List[str]] = None) -> int:
    """Fetch each model and print ``MODEL: local path``; raises LoraTrainerError (the CLI prints it)."""
    from lora_trainer.hub.cache import hub_cache_dir

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    for item in args.models:
        print(f"{item}: {fetch_model(item)}", flush=True)
    print(f"Hugging Face cache: {hub_cache_dir()}")
    return 0
