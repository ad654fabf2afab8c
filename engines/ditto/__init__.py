"""Ditto talking-head engine, reimplemented in PyTorch."""
