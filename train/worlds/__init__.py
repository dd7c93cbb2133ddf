"""Built-in worlds: generators of data with a programmatic judge, so every stage's effect is measurable."""
