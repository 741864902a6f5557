"""`--help` teaches, and the command reference (docs/cli.md) says the same: every command, argument and option
has a one-line explanation and a default, and each command's section in docs/cli.md names exactly its options.

The commands are read from the typer app, so a command added later needs its docs/cli.md section
("### `rcpu-lite NAME ...`") to pass.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

from rcpu_lite.aliases import ALIASES
from rcpu_lite.cli import app

CLI_DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
HEADING = re.compile(r"^### `rcpu-lite ([a-z][a-z ]*?)(?= [A-Z\[-]|`)", re.MULTILINE)
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


# Duck-typed: typer may bring its own copy of click (typer 0.29 does), so isinstance checks on click's classes fail.
def is_group(command) -> bool:
    return hasattr(command, "commands")


def is_option(param) -> bool:
    return param.param_type_name == "option"


def leaf_commands(group, path: tuple[str, ...] = ()) -> dict:
    """'prune', 'eval', 'calib show', ...: every command that runs, by the words that call it."""
    found = {}
    for name, command in group.commands.items():
        if is_group(command):
            found.update(leaf_commands(command, (*path, name)))
        else:
            found[" ".join((*path, name))] = command
    return found


COMMANDS = leaf_commands(typer.main.get_command(app))


def options(command) -> list:
    return [p for p in command.params if is_option(p) and p.name != "help"]


def long_names(option) -> set[str]:
    return {name for name in (*option.opts, *option.secondary_opts) if name.startswith("--")}


def readme_sections() -> dict[str, str]:
    """The command reference in docs/cli.md: command words -> its section (heading included), up to the next heading."""
    text = CLI_DOC.read_text(encoding="utf-8")
    part = text[text.index("\n## Command line") :]
    part = part[: part.find("\n## ", 1)] if "\n## " in part[1:] else part
    sections = {}
    for match in HEADING.finditer(part):
        end = part.find("\n#", match.end())
        sections[match.group(1).strip()] = part[match.start() : end if end != -1 else len(part)]
    return sections


def test_the_commands_are_found():
    assert {"prune", "eval", "generate", "calib show"} <= set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_argument_and_option_explains_itself(name):
    command = COMMANDS[name]
    assert (command.help or "").strip(), f"{name}: the command has no help"
    for param in command.params:
        if param.name == "help":
            continue
        text = (getattr(param, "help", None) or "").strip()
        assert text, f"{name}: {param.name} has no help"
        assert "\n" not in text, f"{name}: {param.name}'s help is not one line"
        if is_option(param) and not (param.required or param.is_flag):
            # typer shows a real default itself; a None default (merged with a preset, or "off") says it in words
            shown = param.show_default is not False and param.default is not None
            assert shown or "(default: " in text, f"{name}: {param.opts[0]} does not give its default"


def test_every_group_explains_itself():
    root = typer.main.get_command(app)
    for name, command in root.commands.items():
        if is_group(command):
            assert (command.help or "").strip(), f"{name}: the group has no help"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_readme_section_lists_exactly_the_commands_options(name):
    sections = readme_sections()
    assert name in sections, f"docs/cli.md's 'Command line' has no section '### `rcpu-lite {name} ...`'"
    section = sections[name]
    prose = "\n".join(
        line for line in section.splitlines() if not line.startswith("    ")
    )  # examples may run other commands
    listed = set(OPTION.findall(prose)) - {"--help"}
    known = set().union(*(long_names(o) for o in options(COMMANDS[name])))
    assert known - listed == set(), f"{name}: options missing from docs/cli.md: {sorted(known - listed)}"
    assert listed - known == set(), f"{name}: docs/cli.md lists options that do not exist: {sorted(listed - known)}"


def test_readme_has_no_section_for_a_command_that_does_not_exist():
    assert set(readme_sections()) <= set(COMMANDS)


def test_readme_alias_table_is_the_code_table():
    text = CLI_DOC.read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `([^`]+)` \| `([^`/]+/[^`]+)` \|$", text, re.MULTILINE))
    assert rows == ALIASES


def test_model_help_lists_every_alias():
    help_text = next(p for p in COMMANDS["prune"].params if p.name == "model").help
    for alias, repo in ALIASES.items():
        assert f"{alias} ({repo})" in help_text
