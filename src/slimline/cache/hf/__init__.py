"""The Hugging Face ``Cache`` classes of the caching methods.

They subclass transformers' cache layers, so they live one package down: loading the method
registry (which imports every module of ``slimline.cache``) does not import transformers.
"""
