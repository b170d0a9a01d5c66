"""caching methods: a quantized key/value cache for generation (``kv_cache``)."""
