"""Low-rank factorization methods: svd, asvd, svd_llm, tucker."""
