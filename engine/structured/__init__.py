"""Structured output: constrain a job's tokens to a JSON schema, a regex, a list of choices
or a grammar.

``spec`` (pure Python, no dependencies) validates the ``SamplingParams.structured`` dict
and maps the OpenAI / vLLM request fields onto it; ``compiler`` turns a spec into an
xgrammar grammar (engine process, off the event loop, cached); ``book`` holds one matcher
per constrained job in the engine process and packs the next-token bitmasks into the step
plan; ``bitmask`` applies them to the logits in the worker's sampler. See
docs/serving.md ("Structured output") for where the grammar state lives and why.
"""
