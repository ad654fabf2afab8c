"""avatard.ipc"""
