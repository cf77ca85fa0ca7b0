"""Hermes format (NousResearch Hermes 2 Pro, Qwen 2.5, many ChatML fine-tunes): each call
is a JSON object in its own ``<tool_call>...</tool_call>`` tags; several calls are several
blocks. A JSON list inside one block is read too."""

from __future__ import annotations

import json

from engine.tool_parsers.base import ToolParser, arguments_json, functions_json
from engine.tool_parsers.scanner import CallFormat


class HermesParser(ToolParser):
    name = "hermes"
    format = CallFormat(start=("<tool_call>",), end="</tool_call>")

    def system_prompt(self, functions: list[dict]) -> str:
        return (
            "You can call functions to help answer the user. Their signatures are listed, "
            "one JSON object per line, between <tools> and </tools>:\n"
            f"<tools>\n{functions_json(functions)}\n</tools>\n"
            "To call a function, write a JSON object with its name and arguments between "
            "<tool_call> and </tool_call>, one block per call:\n"
            '<tool_call>\n{"name": "<function name>", "arguments": {"<argument>": <value>}}\n'
            "</tool_call>\n"
            "Results come back between <tool_response> and </tool_response>. "
            "If no function fits, answer in plain text."
        )

    def render_calls(self, calls: list[dict]) -> str:
        return "\n".join(
            f'<tool_call>\n{{"name": {json.dumps(c["name"])}, '
            f'"arguments": {arguments_json(c["arguments"])}}}\n</tool_call>'
            for c in calls
        )
