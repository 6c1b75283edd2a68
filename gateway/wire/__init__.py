"""Wire adapters: other APIs' requests in as a chat-completions body, the pipeline's answers out.

The pipeline runs on the chat-completions body (it covers every position that can carry user data:
system, user, assistant tool_calls arguments, tool results), so redaction, restoration, fallback
and mid-stream resume work unchanged for every format. An adapter only converts; it is pure.
"""
