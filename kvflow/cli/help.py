"""Parsers for every command: grouped flags, each with a sentence and its default, and --config."""

from __future__ import annotations

import argparse

from kvflow.runtime.flags import add_config_flag


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default after its sentence, unless the sentence already gives it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required:
            return f"{text} (required)"
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.default in (None, [], ()) or isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: unset)" if action.default is None and not isinstance(
                action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)) else text
        return f"{text} (default: %(default)s)"


def new_parser(prog: str, description: str, epilog: str = "") -> argparse.ArgumentParser:
    """An ArgumentParser with kvflow's help format and the --config flag."""
    parser = argparse.ArgumentParser(
        prog=prog, usage=f"{prog} [flags]", description=description, epilog=epilog,
        formatter_class=HelpFormatter,
    )
    add_config_flag(parser)
    return parser
