"""The knowledge base: collections of versioned documents, chunked, embedded and indexed for
vector and full-text search, which people and agents read under object permissions."""
