"""Automatic captioning of a folder of training images (BLIP, CLIP interrogation, WD14 tagger).

``run.caption_folder`` drives any ``base.Captioner``; ``registry.load_captioner`` builds one by name or from a
local path; ``editing`` holds the pure functions behind the tab's caption editor; ``cli.main`` is
``python -m lora_trainer caption``. Nothing here downloads weights: a captioner whose files are not on disk
raises ``base.CaptionerUnavailable`` saying which files are missing and where to put them.
"""
