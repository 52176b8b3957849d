"""The command line as users run it: tools/auto_label.py and python -m lora_trainer caption, as subprocesses."""

import os
import subprocess
import sys

from support.captioners import build_tiny_wd14, write_test_images
from waiting import CEILING_S

from lora_trainer.data.captions import read_metadata_csv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH="")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=CEILING_S)


def test_auto_label_by_path_writes_metadata_and_summary(tmp_path):
    images = tmp_path / "data" / "x"
    write_test_images(images, 3)
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    tagger = build_tiny_wd14(str(tmp_path / "tagger"))
    output = images / "metadata.csv"
    result = _run(
        [
            os.path.join(REPO, "tools", "auto_label.py"),
            "--input",
            str(images),
            "--output",
            str(output),
            "--model",
            "wd14",
            "--model-path",
            tagger,
            "--prefix",
            "sks",
            "--sidecar",
            "--no-progress",
        ],
        cwd=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    rows = read_metadata_csv(str(output))
    assert sorted(rows) == ["000.png", "001.png", "002.png"]
    assert set(rows.values()) == {"sks, hatsune miku, 1girl, long hair, ^_^"}
    assert (images / "000.txt").read_text(encoding="utf-8") == "sks, hatsune miku, 1girl, long hair, ^_^"
    assert "warning: skipped broken.jpg" in result.stderr
    assert "captioned 3 image(s)" in result.stdout and "1girl" in result.stdout


def test_module_entry_point_prints_missing_weights_as_one_line(tmp_path):
    write_test_images(tmp_path / "x", 1)
    result = _run(
        [
            "-m",
            "lora_trainer",
            "caption",
            "--input",
            str(tmp_path / "x"),
            "--model",
            "wd14",
            "--model-path",
            str(tmp_path / "no_tagger_here"),
        ],
        cwd=REPO,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: WD14 tagger weights folder not found")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
