"""The artifact store: stage outputs and final images on a local directory.

Layout: ``ROOT/JOB_ID/input/{image,mask}.png`` for request images,
``ROOT/JOB_ID/stage-K/I.png`` for intermediate stage outputs and ``ROOT/JOB_ID/I.png`` for the
job's final images. Writes go to a temporary name and are renamed, so a reader never sees a
half-written file.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, PngImagePlugin


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _job_dir(self, job_id: str) -> Path:
        if not job_id or "/" in job_id or job_id.startswith("."):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.root / job_id

    def input_path(self, job_id: str, name: str) -> Path:
        return self._job_dir(job_id) / "input" / f"{name}.png"

    def stage_path(self, job_id: str, stage: int, index: int) -> Path:
        return self._job_dir(job_id) / f"stage-{stage}" / f"{index}.png"

    def final_path(self, job_id: str, index: int) -> Path:
        return self._job_dir(job_id) / f"{index}.png"

    def save(self, path: Path, image: Image.Image, metadata: dict[str, str] | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        info = PngImagePlugin.PngInfo()
        for key, value in (metadata or {}).items():
            info.add_text(key, value)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        image.save(tmp, format="PNG", pnginfo=info)
        tmp.replace(path)

    def load(self, path: Path) -> Image.Image:
        with Image.open(path) as image:
            image.load()
            return image.copy()
