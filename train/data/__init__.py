"""Data: text sources and built-in corpora, the tokenized cache and splits (sources.py), named sharded
batches (batches.py), chat, ranked and preference batches, conversation/ranking readers, translation pairs.

May import: config/, worlds/, parallel/.
"""
