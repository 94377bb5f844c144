"""Data contracts: Pandera models of the parsed input and of the output row."""
