"""The request path's stages, one module each, in the order gateway/pipeline.py runs them.

classify -> decide -> redact -> dispatch (targets: what each target is sent) -> restore ->
charge (usage and budgets); a stream runs its dispatch and restore chunk by chunk (stream.py),
embeddings take their own dispatch (embed.py). Each stage takes the small typed objects of
call.py and gateway/features.py and returns what it found; gateway/respond.py turns the result
into headers, metrics and the audit line.
"""
