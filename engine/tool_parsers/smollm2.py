"""SmolLM2 Instruct (the bundled model's family): all calls of a turn as one JSON list in
a single ``<tool_call>[...]</tool_call>`` block; ``[]`` means "no call". This is the
format of SmolLM2's function-calling data (Synth-APIGen, per the model card) and of the
tool-enabled SmolLM2 chat templates; the bundled GGUF's own template has no tool support,
so the server writes the offer into the system message itself. Reading it is Hermes'
machine (which also reads a list in a block); what differs is the prompt."""

from __future__ import annotations

import json

from engine.tool_parsers.base import ToolParser, arguments_json, functions_json
from engine.tool_parsers.scanner import CallFormat


class SmolLM2Parser(ToolParser):
    name = "smollm2"
    format = CallFormat(start=("<tool_call>",), end="</tool_call>")

    def system_prompt(self, functions: list[dict]) -> str:
        return (
            "You compose function calls. Given a question and the functions below, make "
            "one or more calls that achieve it. If no function applies, or the question "
            "lacks an argument a function needs, say so instead.\n"
            f"The functions you can call:\n<tools>{functions_json(functions)}</tools>\n"
            "Write the calls in exactly this format, with nothing else around them, and "
            "arguments of the right types; write [] inside the tags if no call is needed:\n"
            '<tool_call>[\n{"name": "func_name", "arguments": {"arg1": "value1"}}\n'
            "]</tool_call>"
        )

    def render_calls(self, calls: list[dict]) -> str:
        items = ",\n".join(
            f'{{"name": {json.dumps(c["name"])}, "arguments": {arguments_json(c["arguments"])}}}'
            for c in calls
        )
        return f"<tool_call>[\n{items}\n]</tool_call>"
