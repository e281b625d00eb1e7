"""Function builds for local mode: what `faas-cli build --shrinkwrap` produces (the template folder with
the user's handler copied into function/), run as a process instead of a container image."""

from __future__ import annotations

import shutil
from pathlib import Path

# runtime/_templates: a symlink to templates/ in a checkout, the packaged copy in an installed wheel
TEMPLATES = Path(__file__).resolve().parents[1] / "_templates"


def shrinkwrap(lang: str, handler: Path, build: Path, templates: Path = TEMPLATES) -> Path:
    """Build `build` from templates/<lang> and `handler`; replaces an older build of the same function."""
    template = templates / lang
    if not (template / "template.yml").is_file():
        known = sorted(p.name for p in templates.iterdir() if (p / "template.yml").is_file()) if templates.is_dir() \
            else []
        raise ValueError(f"unknown template (lang) {lang!r} in {templates}; known: {', '.join(known) or 'none'}")
    staging = build.with_name(build.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(template, staging)
    shutil.rmtree(staging / "function")
    shutil.copytree(handler, staging / "function")
    shutil.rmtree(build, ignore_errors=True)
    staging.rename(build)
    return build
