"""Training: one loop (loop.py) that pretraining, fine-tuning and the benchmarks call; data pipelines
(data.py) kept apart from it; the pretraining recipe (pretrain.py); the SentencePiece trainer (tokenizer.py)."""
