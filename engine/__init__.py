"""FastServe: iteration-level preemptive LLM serving."""
