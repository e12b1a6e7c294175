"""Token data: the .bin shard format, the GPT-2 tokenizer, the distributed loader, durable (crash-safe)
file writes, and the commands that make shards (FineWeb download, tokenizing any text corpus, the
offline demo corpus)."""
