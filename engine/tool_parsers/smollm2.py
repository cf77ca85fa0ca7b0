"""SmolLM2 Instruct (the bundled model's family): all calls of a turn as one JSON list in
a single ``<tool_call>[...]</tool_call>`` block; ``[]`` means "no call".

Where the format comes from: SmolLM2's model card credits its function calling to
Argilla's Synth-APIGen data, and the tool-enabled SmolLM2 chat template (Ollama's
``smollm2`` library entry; ``instructions_function_calling.md`` in the 1.7B repository)
offers the tools as JSON in ``<tools>...</tools>`` and asks for exactly this list, with
results returned as a user turn in ``<tool_response>`` tags. The bundled 135M GGUF's own
template is plain ChatML with no tool support, so the server writes the offer into the
system message itself (in its own words, same format). Reading the output is Hermes'
machine, which also reads a list in a block: the two parsers differ only in the prompt."""

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
