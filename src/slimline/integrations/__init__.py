"""slimline inside other libraries' loaders.

``transformers`` registers slimline's quantizer with transformers' plugin API, so that
``AutoModel*.from_pretrained`` reads a directory ``sl.save`` wrote; ``import_hook`` does that
registration as soon as transformers' quantizer registry is imported (never importing
transformers itself, which would slow ``import slimline`` down).
"""
