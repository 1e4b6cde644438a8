"""MkDocs hooks (mkdocs.yml: hooks): pages made at build time, so they cannot drift from the code.

- cli.md's `<!-- nin-cli-reference -->` becomes the help of every `nin` command, from nin.cli.build_parser().
- BENCHMARKS.md and CONTRIBUTING.md (repository root) become the site's benchmarks.md and contributing.md;
  the guides link them as ../BENCHMARKS.md and ../CONTRIBUTING.md (which also works on GitHub).
"""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
ROOT_PAGES = {"BENCHMARKS.md": "benchmarks.md", "CONTRIBUTING.md": "contributing.md"}
MARKER = "<!-- nin-cli-reference -->"
API_MARKER = "<!-- nin-api-reference -->"
API_GROUPS = [
    ("Models", ["create_model", "list_models", "model_info", "nin_block", "NiN", "list_pretrained"]),
    ("Loading, saving and exporting", ["load", "save_model", "export_model"]),
    ("Training", ["train", "TrainResult", "TrainConfig", "get_recipe", "RECIPES"]),
    ("Evaluating and predicting", ["evaluate", "predict", "Prediction", "predict_files", "read_image"]),
    ("Data", ["load_dataset", "BatchLoader"]),
    ("In a notebook", ["summary", "plot_history", "show_cam"]),
    ("Errors", ["NinError", "UsageError", "DatasetError", "CheckpointError", "ImageError", "TrainingDiverged"]),
]


def on_files(files, config):
    for source, target in ROOT_PAGES.items():
        files.append(File.generated(config, target, content=(ROOT / source).read_text(encoding="utf-8")))
    return files


def _commands(parser: argparse.ArgumentParser, path: list[str]):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, path + [name])


def cli_reference() -> str:
    """Every command's --help, as `nin COMMAND --help` prints it at 100 columns."""
    os.environ["COLUMNS"] = "100"  # argparse wraps at the terminal's width
    from nin.cli import build_parser

    out = []
    for path, parser in _commands(build_parser(), ["nin"]):
        name = " ".join(path)
        level = "#" * min(len(path) + 1, 4)
        out.append(f"{level} `{name}`\n\n```text\n$ {name} --help\n{parser.format_help().rstrip()}\n```\n")
    return "\n".join(out)


def api_reference() -> str:
    """mkdocstrings directives for every public name, at the module nin.__init__._LAZY says defines it
    (the package imports lazily, so the reference follows the map and not a copy of it)."""
    import nin

    lazy = dict(nin._LAZY)
    out = []
    for title, names in API_GROUPS + [("Other", sorted(set(nin._LAZY) - {n for _, g in API_GROUPS for n in g}))]:
        names = [n for n in names if n in lazy]
        if names:
            out.append(f"## {title}\n")
            out += [f"::: {lazy.pop(n)}.{n}\n" for n in names]
    return "\n".join(out)


def on_page_markdown(markdown, page, config, files):
    if API_MARKER in markdown:
        markdown = markdown.replace(API_MARKER, api_reference())
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, cli_reference())
    for source, target in ROOT_PAGES.items():  # a guide's link to a root page
        markdown = re.sub(rf"\]\(\.\./{source}", f"]({target}", markdown)
    if page.file.src_uri in ROOT_PAGES.values():  # a root page's links to the guides
        markdown = re.sub(r"\]\(docs/", "](", markdown)
        # links to repository files outside the site become their path, in code
        markdown = re.sub(r"\[([^\]]+)\]\(((?:benchmarks|src|tests|notebooks)/[^)]+)\)", r"\1 (`\2`)", markdown)
        for source, target in ROOT_PAGES.items():
            markdown = re.sub(rf"\]\({source}", f"]({target}", markdown)
    return markdown
