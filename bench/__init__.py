"""avatard.bench"""
