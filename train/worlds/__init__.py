"""Built-in worlds: generators of data with a programmatic judge, so every stage's effect is measurable.

May import: nothing of train/ (pure Python and NumPy; the config imports the world's settings).
"""
