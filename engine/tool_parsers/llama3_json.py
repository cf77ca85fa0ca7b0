"""Llama 3.1 / 3.2 JSON tool calling: the answer is a bare JSON object
``{"name": ..., "parameters": {...}}`` (``"arguments"`` read too), optionally after
``<|python_tag|>``; several calls are separated by ``;``. Only an output that *starts*
with ``{`` (leading whitespace aside) or a ``<|python_tag|>`` is read as calls, so a plain
answer that contains JSON later stays content."""

from __future__ import annotations

import json

from engine.tool_parsers.base import ToolParser, arguments_json, functions_json
from engine.tool_parsers.scanner import CallFormat


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    format = CallFormat(start=("<|python_tag|>",), end=None, bare_start="{", separators=";")

    def system_prompt(self, functions: list[dict]) -> str:
        return (
            "You may answer with a function call. These are the functions, one JSON "
            f"signature per line:\n{functions_json(functions)}\n"
            "To call one, reply with only a JSON object of the form "
            '{"name": <function name>, "parameters": <object of argument names and values>}; '
            "separate several calls with ';'. Use literal values, not variables. "
            "If no function fits, answer in plain text."
        )

    def render_calls(self, calls: list[dict]) -> str:
        return "; ".join(
            f'{{"name": {json.dumps(c["name"])}, "parameters": {arguments_json(c["arguments"])}}}'
            for c in calls
        )
