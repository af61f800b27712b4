"""Data as the rest reads it: sources and splits, image decoders, label sampling (Cole et al.), features files."""
