"""A child process of the Hub tests: fetch a repository through ``lora_trainer.hub`` and report on stdout, one
JSON object per line: each download progress report, then the result or the error.

    python tests/hub_client.py '{"ref": "owner/name", "required": [["config.json"], ["model.safetensors"]],
                                 "optional": ["tokenizer*"]}'

It runs in its own process because huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HOME once, when
it is imported: each test sets them in this process's environment instead.
"""

import dataclasses
import json
import sys


def main() -> int:
    spec = json.loads(sys.argv[1])
    from lora_trainer.hub.errors import HubError
    from lora_trainer.hub.fetch import fetch_repo_files
    from lora_trainer.hub.files import ListedFiles
    from lora_trainer.hub.reference import parse_hub_reference

    files = ListedFiles(
        "test model", tuple(tuple(entry) for entry in spec["required"]), tuple(spec.get("optional", ()))
    )

    def report(progress) -> None:
        print(json.dumps({"event": "progress", **dataclasses.asdict(progress)}), flush=True)

    try:
        folder = fetch_repo_files(parse_hub_reference(spec["ref"]), files, as_given=spec["ref"], on_progress=report)
    except HubError as exc:
        print(json.dumps({"event": "error", "type": type(exc).__name__, "message": str(exc)}), flush=True)
        return 2
    print(json.dumps({"event": "result", "folder": folder}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
