"""The supported tag matrix, read from image/tags.json (its single source), in the shapes its users need.

    python image/matrix.py github                 # `build=` and `publish=` lines for $GITHUB_OUTPUT
    python image/matrix.py tags TAG [--date D]    # every image reference TAG is published under
    python image/matrix.py readme                 # the README's "Supported tags" block

Standard library only (runs on any CI runner's Python >= 3.8); tests/image/test_tag_matrix.py checks
that the workflow, the Dockerfile, the example project and the README agree with it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

TAGS_JSON = Path(__file__).resolve().with_name("tags.json")
README_BEGIN = (
    "<!-- BEGIN SUPPORTED TAGS: generated from image/tags.json by `python image/matrix.py readme` -->"
)
README_END = "<!-- END SUPPORTED TAGS -->"


def load(path: Path = TAGS_JSON) -> dict:
    return json.loads(path.read_text())


def images(config: dict) -> list[dict]:
    """One entry per published tag: tag, python, variant, base_image, aliases; newest Python first."""
    result = []
    for python in sorted(config["pythons"], key=lambda v: tuple(map(int, v.split("."))), reverse=True):
        for variant, spec in config["variants"].items():
            tag = spec["tag"].format(python=python)
            result.append(
                {
                    "tag": tag,
                    "python": python,
                    "variant": variant,
                    "base_image": spec["base_image"].format(python=python),
                    "aliases": sorted(alias for alias, target in config["aliases"].items() if target == tag),
                }
            )
    return result


def build_matrix(config: dict) -> list[dict]:
    """One entry per (tag, platform): what one CI build-and-test job needs."""
    return [
        {**image, "platform": platform, "arch": platform.rpartition("/")[2], "runner": spec["runner"]}
        for image in images(config)
        for platform, spec in config["platforms"].items()
    ]


def references(config: dict, tag: str, date: str) -> list[str]:
    """Every reference `tag` is published under: itself, its aliases and its dated tag."""
    entry = next((i for i in images(config) if i["tag"] == tag), None)
    if entry is None:
        raise SystemExit(f"unknown tag {tag!r}; known: {', '.join(i['tag'] for i in images(config))}")
    names = [tag, *entry["aliases"], config["date_tag"].format(tag=tag, date=date)]
    return [f"{config['image']}:{name}" for name in names]


def readme_block(config: dict) -> str:
    lines = [README_BEGIN, "", "| Tag | Python | Based on |", "| --- | --- | --- |"]
    for image in images(config):
        names = ", ".join(f"`{name}`" for name in [image["tag"], *image["aliases"]])
        lines.append(f"| {names} | {image['python']} | `{image['base_image']}` |")
    platforms = ", ".join(f"`{p}`" for p in config["platforms"])
    example = config["date_tag"].format(tag=images(config)[0]["tag"], date="2025-01-06")
    lines += [
        "",
        f"Image: `{config['image']}`. Platforms: {platforms}. Rebuilt every week; each build is also "
        f"published with its date, e.g. `{example}`, for pinning.",
        "",
        README_END,
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("github")
    tags = sub.add_parser("tags")
    tags.add_argument("tag")
    tags.add_argument("--date", default=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"))
    sub.add_parser("readme")
    args = parser.parse_args(argv)
    config = load()
    if args.command == "github":
        print(f"build={json.dumps(build_matrix(config), separators=(',', ':'))}")
        print(f"publish={json.dumps(images(config), separators=(',', ':'))}")
    elif args.command == "tags":
        print("\n".join(references(config, args.tag, args.date)))
    else:
        sys.stdout.write(readme_block(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
