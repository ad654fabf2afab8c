"""avatard.engines"""
