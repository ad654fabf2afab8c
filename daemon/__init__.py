"""avatard.daemon"""
