"""Training: the data pipeline (corpus, tokenizer, packing) and the trainer."""
