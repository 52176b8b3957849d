"""Imports every module of lora_trainer on its own, each in a fresh child process, and prints the failures.

The parent imports the heavy third-party libraries once (torch, diffusers, transformers, gradio...) and then
forks one child per module, before any lora_trainer module is loaded: each child starts with no module of ours
imported, as a fresh interpreter would, and imports just its one module. A module that works only after another
of ours was imported first (an import cycle, a missing import hidden by the test order) fails here.
Run by tests/test_imports.py; exits 1 when any module fails, printing ``module: error`` lines.
"""

import importlib
import os
import sys
import traceback

THIRD_PARTY = ("torch", "numpy", "PIL", "safetensors", "yaml", "transformers", "diffusers", "peft", "gradio")


def main(package_dir: str) -> int:
    root = os.path.dirname(os.path.abspath(package_dir))
    names = []
    for folder, _dirs, files in os.walk(package_dir):
        for file_name in sorted(files):
            if file_name.endswith(".py") and file_name != "__main__.py":  # __main__ runs its command on import
                rel = os.path.relpath(os.path.join(folder, file_name), root)[:-3].replace(os.sep, ".")
                names.append(rel[: -len(".__init__")] if rel.endswith(".__init__") else rel)
    for lib in THIRD_PARTY:  # optional: a library that is not installed is some module's error to report
        try:
            importlib.import_module(lib)
        except Exception:
            pass
    assert not any(n == "lora_trainer" or n.startswith("lora_trainer.") for n in sys.modules), "parent is not fresh"
    failures = []
    for name in sorted(names):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: import one module, report, leave without running the parent's cleanup
            os.close(read)
            code = 0
            try:
                importlib.import_module(name)
            except BaseException:
                os.write(write, traceback.format_exc(limit=-3).encode())
                code = 1
            os._exit(code)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            report = pipe.read().decode(errors="replace")
        _, status = os.waitpid(pid, 0)
        if status != 0:
            failures.append(f"{name}: {report.strip() or f'child ended with status {status}'}")
    for failure in failures:
        print(failure)
    print(f"imported {len(names) - len(failures)} of {len(names)} modules alone")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
