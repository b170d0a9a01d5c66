"""speculative decoding: ``generate`` drafts several tokens cheaply and verifies them in one
target forward (``speculative``: a draft model, the model itself with blocks skipped, or
n-gram lookup in the prompt)."""
