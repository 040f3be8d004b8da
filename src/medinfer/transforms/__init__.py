"""medinfer.transforms"""
